"""Gemma 1 and Gemma 2 architectures as keras-hub builds them, for abstract parameter trees.

keras-hub's preset files carry metadata and a Kaggle handle but no layer sizes;
this module holds the sizes of each architecture and maps every Gemma 1 and
Gemma 2 preset name of keras-hub (keras-nlp) to one of them. From a
configuration, `abstract_params` builds the parameter tree of keras-hub's
`GemmaBackbone` — keyed by Keras variable path, shapes and dtypes exactly as
Keras creates them — out of `jax.ShapeDtypeStruct` leaves, so counting the
parameters of a 27B model allocates nothing:

>>> import jax, jlora
>>> from recipes.models import gemma
>>> shapes = gemma.abstract_params("gemma2_2b_en")
>>> shapes["decoder_block_0/attention/query/kernel"].shape
(8, 2304, 256)
>>> lora = jax.eval_shape(lambda p: jlora.apply(p, rank=4), shapes)
>>> jlora.count(lora).trainable
2928640

`GemmaConfig.backbone_kwargs()` gives the arguments of
`keras_hub.models.GemmaBackbone`, so the same configuration builds the real
Keras model. Nothing heavy is imported at module import time.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

__all__ = [
    "GEMMA2_27B",
    "GEMMA2_2B",
    "GEMMA2_9B",
    "GEMMA_2B",
    "GEMMA_7B",
    "PRESETS",
    "GemmaConfig",
    "abstract_params",
    "config",
    "encode",
    "greedy",
    "lm_loss",
    "remat_scope",
    "small_config",
]


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
  """One Gemma architecture, in the terms of keras-hub's `GemmaBackbone`.

  The fields are the backbone's constructor arguments (plus `generation`, a
  label), so `GemmaBackbone(**cfg.backbone_kwargs())` builds the Keras model.

  Attributes:
    generation: 1 or 2 (Gemma 1 or Gemma 2); informational.
    vocabulary_size: the token vocabulary; the embedding is tied to the output.
    num_layers: the number of decoder blocks.
    num_query_heads: attention query heads.
    num_key_value_heads: key and value heads (grouped-query attention).
    hidden_dim: the model width.
    intermediate_dim: the feed-forward width *in Keras's terms*: twice the
      width of each of the two gating projections (Hugging Face's
      `intermediate_size * 2`).
    head_dim: the width of each attention head.
    query_head_dim_normalize: scale queries by `head_dim ** -0.5` (else by
      `(hidden_dim / num_query_heads) ** -0.5`).
    use_post_ffw_norm: an RMSNorm after the feed-forward block (Gemma 2).
    use_post_attention_norm: an RMSNorm after attention (Gemma 2).
    attention_logit_soft_cap: the attention logit soft cap, or None.
    final_logit_soft_cap: the output logit soft cap, or None.
    use_sliding_window_attention: local attention in every other block.
    sliding_window_size: the local attention window.
    layer_norm_epsilon: RMSNorm epsilon.
    dtype: the weights' dtype in the released checkpoints.
  """

  generation: int
  vocabulary_size: int
  num_layers: int
  num_query_heads: int
  num_key_value_heads: int
  hidden_dim: int
  intermediate_dim: int
  head_dim: int
  query_head_dim_normalize: bool = True
  use_post_ffw_norm: bool = False
  use_post_attention_norm: bool = False
  attention_logit_soft_cap: float | None = None
  final_logit_soft_cap: float | None = None
  use_sliding_window_attention: bool = False
  sliding_window_size: int = 4096
  layer_norm_epsilon: float = 1e-6
  dtype: str = "bfloat16"

  def __post_init__(self):
    for name in ("vocabulary_size", "num_layers", "num_query_heads", "num_key_value_heads",
                 "hidden_dim", "intermediate_dim", "head_dim"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"GemmaConfig: {name} must be a positive int, got {v!r}.")
    if self.intermediate_dim % 2:
      raise ValueError(
          f"GemmaConfig: intermediate_dim={self.intermediate_dim} must be even: in Keras's terms "
          f"it is twice the width of each gating projection (Hugging Face intermediate_size * 2).")
    if self.num_query_heads % self.num_key_value_heads:
      raise ValueError(
          f"GemmaConfig: num_query_heads={self.num_query_heads} must be a multiple of "
          f"num_key_value_heads={self.num_key_value_heads} (grouped-query attention).")

  def backbone_kwargs(self, **overrides: Any) -> dict[str, Any]:
    """The keyword arguments of `keras_hub.models.GemmaBackbone` for this architecture.

    Args:
      **overrides: replace any argument, e.g. `dtype="float32"` or `dropout=0.1`.
    """
    kw = dataclasses.asdict(self)
    del kw["generation"]
    kw.update(overrides)
    return kw

  def replace(self, **changes: Any) -> GemmaConfig:
    """A copy with some fields changed (e.g. fewer layers for a test)."""
    return dataclasses.replace(self, **changes)


# Gemma 1 (https://arxiv.org/abs/2403.08295, table 1): multi-query attention in
# the 2B model, multi-head in the 7B; GeGLU feed-forward; tied embeddings.
GEMMA_2B = GemmaConfig(generation=1, vocabulary_size=256_000, num_layers=18, num_query_heads=8,
                       num_key_value_heads=1, hidden_dim=2048, intermediate_dim=32_768,
                       head_dim=256)
GEMMA_7B = GemmaConfig(generation=1, vocabulary_size=256_000, num_layers=28, num_query_heads=16,
                       num_key_value_heads=16, hidden_dim=3072, intermediate_dim=49_152,
                       head_dim=256)


def _gemma2(**kw) -> GemmaConfig:
  # Gemma 2 (https://arxiv.org/abs/2408.00118): post-attention and post-ffw
  # RMSNorms, logit soft caps 50 (attention) and 30 (output), local sliding
  # window attention (4096) in every other block, grouped-query attention.
  return GemmaConfig(generation=2, vocabulary_size=256_000, use_post_ffw_norm=True,
                     use_post_attention_norm=True, attention_logit_soft_cap=50.0,
                     final_logit_soft_cap=30.0, use_sliding_window_attention=True,
                     sliding_window_size=4096, **kw)


GEMMA2_2B = _gemma2(num_layers=26, num_query_heads=8, num_key_value_heads=4, hidden_dim=2304,
                    intermediate_dim=18_432, head_dim=256)
GEMMA2_9B = _gemma2(num_layers=42, num_query_heads=16, num_key_value_heads=8, hidden_dim=3584,
                    intermediate_dim=28_672, head_dim=256)
# The 27B model scales queries by (hidden_dim / num_query_heads) ** -0.5 = 144 ** -0.5,
# not by head_dim ** -0.5.
GEMMA2_27B = _gemma2(num_layers=46, num_query_heads=32, num_key_value_heads=16, hidden_dim=4608,
                     intermediate_dim=73_728, head_dim=128, query_head_dim_normalize=False)

_FAMILIES: dict[GemmaConfig, tuple[str, ...]] = {
    GEMMA_2B: ("gemma_2b_en", "gemma_instruct_2b_en", "gemma_1.1_instruct_2b_en",
               "code_gemma_2b_en", "code_gemma_1.1_2b_en"),
    GEMMA_7B: ("gemma_7b_en", "gemma_instruct_7b_en", "gemma_1.1_instruct_7b_en",
               "code_gemma_7b_en", "code_gemma_instruct_7b_en", "code_gemma_1.1_instruct_7b_en"),
    GEMMA2_2B: ("gemma2_2b_en", "gemma2_instruct_2b_en", "shieldgemma_2b_en",
                "c2s_scale_gemma_2_2b_en"),
    GEMMA2_9B: ("gemma2_9b_en", "gemma2_instruct_9b_en", "shieldgemma_9b_en"),
    GEMMA2_27B: ("gemma2_27b_en", "gemma2_instruct_27b_en", "shieldgemma_27b_en",
                 "c2s_scale_gemma_2_27b_en"),
}

PRESETS: dict[str, GemmaConfig] = {name: cfg for cfg, names in _FAMILIES.items()
                                   for name in names}
"""keras-hub (keras-nlp) Gemma 1 and Gemma 2 preset names -> architecture."""


def config(preset: str | GemmaConfig) -> GemmaConfig:
  """The architecture of a keras-hub Gemma 1 or Gemma 2 preset.

  Args:
    preset: a preset name such as `"gemma2_2b_en"` or `"gemma_instruct_7b_en"`,
      or a `GemmaConfig` (returned as is).

  Raises:
    ValueError: an unknown preset name; the message lists the closest names.
  """
  if isinstance(preset, GemmaConfig):
    return preset
  if not isinstance(preset, str):
    raise TypeError(f"gemma.config: preset must be a preset name or a GemmaConfig, got "
                    f"{type(preset).__name__}.")
  try:
    return PRESETS[preset]
  except KeyError:
    close = difflib.get_close_matches(preset, PRESETS, n=4, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(
        f"gemma.config: {preset!r} is not a Gemma 1 or Gemma 2 preset of keras-hub.{hint} "
        f"Known presets: {', '.join(sorted(PRESETS))}. For another size, build a "
        f"GemmaConfig(...) and pass it instead.") from None


def small_config(generation: int = 2, *, num_layers: int = 2, vocabulary_size: int = 256,
                 dtype: str = "float32", **changes: Any) -> GemmaConfig:
  """A tiny Gemma 1 or Gemma 2 configuration for tests, CI and CPU demos.

  Keeps every architectural switch of the generation (post-norms, soft caps,
  sliding window, grouped-query attention) at toy width: hidden 32, 4 query
  heads, 2 key/value heads, head_dim 8, feed-forward 2 x 32.

  Args:
    generation: 1 or 2.
    num_layers: decoder blocks.
    vocabulary_size: the vocabulary.
    dtype: the weights' dtype.
    **changes: any other `GemmaConfig` field.
  """
  if generation not in (1, 2):
    raise ValueError(f"gemma.small_config: generation must be 1 or 2, got {generation!r}.")
  base = GEMMA_2B if generation == 1 else GEMMA2_2B
  kw = dict(vocabulary_size=vocabulary_size, num_layers=num_layers, num_query_heads=4,
            num_key_value_heads=2, hidden_dim=32, intermediate_dim=64, head_dim=8, dtype=dtype)
  if generation == 2:
    kw["sliding_window_size"] = 4
  kw.update(changes)
  return base.replace(**kw)


def abstract_params(preset: str | GemmaConfig, *, dtype: Any = None) -> dict[str, Any]:
  """The parameter tree of keras-hub's `GemmaBackbone`, as `jax.ShapeDtypeStruct`s.

  Keys are Keras variable paths (`variable.path`), e.g.
  `"decoder_block_0/attention/query/kernel"`; shapes are those Keras creates:
  query `(num_query_heads, hidden_dim, head_dim)`, key and value
  `(num_key_value_heads, hidden_dim, head_dim)`, attention output
  `(num_query_heads, head_dim, hidden_dim)`, gating `(hidden_dim,
  intermediate_dim // 2)` twice, linear `(intermediate_dim // 2, hidden_dim)`,
  RMSNorm scales `(hidden_dim,)`, the tied embedding `(vocabulary_size,
  hidden_dim)`. No memory is allocated.

  Args:
    preset: a preset name (see `PRESETS`) or a `GemmaConfig`.
    dtype: the leaves' dtype (default: the configuration's, bfloat16 for the
      released models).

  Returns:
    A flat dict `{variable path: jax.ShapeDtypeStruct}`; `jlora.apply` and
    `jlora.count` work on it under `jax.eval_shape`.
  """
  import jax
  import jax.numpy as jnp

  cfg = config(preset)
  dt = jnp.dtype(cfg.dtype if dtype is None else dtype)
  d, f = cfg.hidden_dim, cfg.intermediate_dim // 2
  h, k, hd = cfg.num_query_heads, cfg.num_key_value_heads, cfg.head_dim
  shapes: dict[str, tuple[int, ...]] = {"token_embedding/embeddings": (cfg.vocabulary_size, d)}
  for i in range(cfg.num_layers):
    b = f"decoder_block_{i}"
    shapes[f"{b}/pre_attention_norm/scale"] = (d,)
    if cfg.use_post_attention_norm:
      shapes[f"{b}/post_attention_norm/scale"] = (d,)
    shapes[f"{b}/attention/query/kernel"] = (h, d, hd)
    shapes[f"{b}/attention/key/kernel"] = (k, d, hd)
    shapes[f"{b}/attention/value/kernel"] = (k, d, hd)
    shapes[f"{b}/attention/attention_output/kernel"] = (h, hd, d)
    shapes[f"{b}/pre_ffw_norm/scale"] = (d,)
    if cfg.use_post_ffw_norm:
      shapes[f"{b}/post_ffw_norm/scale"] = (d,)
    shapes[f"{b}/ffw_gating/kernel"] = (d, f)
    shapes[f"{b}/ffw_gating_2/kernel"] = (d, f)
    shapes[f"{b}/ffw_linear/kernel"] = (f, d)
  shapes["final_normalization/scale"] = (d,)
  return {path: jax.ShapeDtypeStruct(s, dt) for path, s in shapes.items()}


# --------------------------------------------------------------------------- training on one chip
#
# What the Gemma notebook trains with, so that its 16 GB fit is measured on the same code
# (benchmarks/gemma2_16gb.py): per-block remat, a loss that never holds float32 logits over the
# whole 256k vocabulary, and Gemma's SentencePiece tokenizer through `sentencepiece` alone
# (keras-hub's own GemmaTokenizer needs tensorflow-text, which the Colab TPU runtime does not have).


def remat_scope(cfg: GemmaConfig):
  """A `keras.RematScope` that rematerializes each decoder block (build the backbone inside it).

  The backward pass then keeps one `(batch, seq, hidden)` activation per block and recomputes
  the rest of the block: the memory of 26 blocks' attention and feed-forward intermediates
  is what does not fit 16 GB.
  """
  import keras
  return keras.RematScope(mode="list_of_layers",
                          layer_names=[f"decoder_block_{i}" for i in range(cfg.num_layers)])


def lm_loss(hidden, embeddings, labels, weights, *, soft_cap: float | None, chunk: int = 512):
  """Mean next-token cross-entropy of a tied-embedding LM head, `chunk` tokens at a time.

  `logits = soft_cap·tanh(hidden·Eᵀ / soft_cap)` (Gemma 2's final soft cap; none when
  `soft_cap` is None) are formed in float32 for `chunk` tokens at once and recomputed in the
  backward pass (`jax.checkpoint`), so the step holds `chunk × vocabulary` float32 values,
  never `batch·seq × vocabulary` (8.4 GB for 8k tokens of Gemma's 256k vocabulary).

  Args:
    hidden: the backbone's output, `(batch, seq, hidden_dim)`.
    embeddings: the tied embedding table, `(vocabulary, hidden_dim)`.
    labels: the next tokens, `(batch, seq)` ints.
    weights: per-token loss weights, `(batch, seq)` (0 on padding).
    soft_cap: the final logit soft cap (`cfg.final_logit_soft_cap`).
    chunk: tokens per chunk.

  Returns:
    `sum(weights · ce) / sum(weights)`, a float32 scalar.

  Example:
    >>> import jax, jax.numpy as jnp, numpy as np
    >>> rng = np.random.default_rng(0)
    >>> h = jnp.asarray(rng.normal(size=(2, 5, 8)), jnp.float32)
    >>> e = jnp.asarray(rng.normal(size=(11, 8)), jnp.float32)
    >>> y, w = jnp.asarray(rng.integers(0, 11, (2, 5))), jnp.ones((2, 5))
    >>> full = jax.nn.log_softmax(30 * jnp.tanh(h @ e.T / 30))
    >>> ref = -jnp.take_along_axis(full, y[..., None], -1).mean()
    >>> bool(jnp.allclose(lm_loss(h, e, y, w, soft_cap=30.0, chunk=4), ref, atol=1e-5))
    True
  """
  import jax
  import jax.numpy as jnp

  d = hidden.shape[-1]
  h = hidden.reshape(-1, d)
  y = labels.reshape(-1).astype(jnp.int32)
  w = weights.reshape(-1).astype(jnp.float32)
  n = h.shape[0]
  chunk = max(1, min(chunk, n))
  pad = -n % chunk
  if pad:
    h = jnp.pad(h, ((0, pad), (0, 0)))
    y, w = jnp.pad(y, (0, pad)), jnp.pad(w, (0, pad))
  h, y, w = (v.reshape(-1, chunk, *v.shape[1:]) for v in (h, y, w))

  @jax.checkpoint
  def one(hc, yc, wc):
    z = jnp.einsum("cd,vd->cv", hc, embeddings.astype(hc.dtype),
                   preferred_element_type=jnp.float32)
    if soft_cap:
      z = soft_cap * jnp.tanh(z / soft_cap)
    ce = jax.nn.logsumexp(z, axis=-1) - jnp.take_along_axis(z, yc[:, None], -1)[:, 0]
    return jnp.sum(ce * wc)

  def body(total, xs):
    return total + one(*xs), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), (h, y, w))
  return total / jnp.maximum(w.sum(), 1.0)


def encode(sp, texts, seq_len: int):
  """Gemma's causal-LM batch from raw text, with a `sentencepiece.SentencePieceProcessor`.

  As keras-hub's `GemmaCausalLMPreprocessor` lays it out: `<bos>` (id 2), the pieces, `<eos>`
  (id 1), right-padded with 0 (`<pad>`) to `seq_len + 1`, truncated there; inputs are the first
  `seq_len` ids, labels the next ones, weights 1 where the label is not padding.

  Returns:
    `({"token_ids": (b, seq_len), "padding_mask": (b, seq_len)}, labels, weights)` as numpy.
  """
  import numpy as np

  ids = np.zeros((len(texts), seq_len + 1), np.int32)
  for i, t in enumerate(texts):
    row = ([2] + list(sp.encode(t)) + [1])[:seq_len + 1]
    ids[i, :len(row)] = row
  x = {"token_ids": ids[:, :-1], "padding_mask": (ids[:, :-1] != 0).astype(np.int32)}
  return x, ids[:, 1:], (ids[:, 1:] != 0).astype(np.float32)


def greedy(forward, tree, embeddings, prompt_ids, *, max_new_tokens: int, soft_cap, eos_id=1):
  """Greedy continuation of one prompt with a backbone `forward(tree, inputs) -> hidden`.

  The sequence lives in a fixed-length buffer (prompt + `max_new_tokens`), so the jitted
  forward compiles once; each step runs the whole buffer (no key/value cache: a demo, not a
  server). Stops at `eos_id`. Returns the new ids.
  """
  import jax
  import jax.numpy as jnp
  import numpy as np

  n = len(prompt_ids)
  buf = np.zeros((1, n + max_new_tokens), np.int32)
  buf[0, :n] = prompt_ids

  @jax.jit
  def next_id(tree, ids, pos):
    hidden = forward(tree, {"token_ids": ids, "padding_mask": (ids != 0).astype(jnp.int32)})
    h = jax.lax.dynamic_index_in_dim(hidden[0], pos, keepdims=False)
    z = jnp.dot(h, embeddings.T.astype(h.dtype), preferred_element_type=jnp.float32)
    if soft_cap:
      z = soft_cap * jnp.tanh(z / soft_cap)
    return jnp.argmax(z)

  out = []
  for pos in range(n - 1, n + max_new_tokens - 1):
    t = int(next_id(tree, jnp.asarray(buf), pos))
    if t == eos_id:
      break
    buf[0, pos + 1] = t
    out.append(t)
  return out
