"""Key paths as '/'-joined strings, and the patterns that select leaves by path."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

# A path component equal to one of these names a query or value projection under
# a common convention: Keras/Flax/MaxText (`query`, `value`), Keras BERT
# (`query_dense`), Hugging Face (`q_proj`, `v_proj`), llama.cpp GGUF (`attn_q`,
# `attn_v`), Meta Llama (`wq`, `wv`), T5 (`q`, `v`), gemma (`q_einsum`). A component
# ends at '/' or at '.', so flat checkpoint names (`blk.0.attn_q.weight`,
# `model.layers.0.self_attn.q_proj.weight`) match too.
_QV_NAMES = ("query", "value", "query_dense", "value_dense", "q_proj", "v_proj", "attn_q",
             "attn_v", "wq", "wv", "q", "v", "q_einsum")
QV_PATTERN = r"(^|[/.])(" + "|".join(_QV_NAMES) + r")([/.]|$)"

# Never targeted unless named explicitly by a user pattern.
_BIAS_RE = re.compile(r"(^|[/.])(bias|b|[\w]*_bias|bias_[\w]*)$", re.IGNORECASE)
_EMBED_RE = re.compile(r"(^|/)[\w.]*(embed|embedding|embeddings|wte|wpe|token_embd)[\w.]*(/|$)",
                       re.IGNORECASE)
# The LM head: `lm_head` anywhere; `output`/`logits` only as a top-level module (GGUF
# `output.weight`), since `attention/output/dense` in BERT is an ordinary linear layer.
_HEAD_RE = re.compile(r"(^|[/.])lm_head([/.]|$)|^(output|logits)([/.]|$)")
_NORM_RE = re.compile(r"(^|/)[\w.]*(norm|ln_\w*|layernorm)[\w.]*(/|$)", re.IGNORECASE)

# Components that wrap a value without naming it: Flax NNX `Variable.value` and friends.
_WRAPPER_KEYS = {"value", "raw_value"}

Pattern = str | re.Pattern | Sequence[Any] | Callable[[str, Any], bool] | None


def key_str(key) -> str:
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return str(key.name)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def path_str(path) -> str:
  """`('a', 0, 'kernel')`-style key path -> `'a/0/kernel'`.

  Attribute keys that only unwrap a container (NNX `Variable.value`) are dropped,
  so a kernel reads `linear/kernel` in a Linen dict and in an NNX state alike.

  Example:
    >>> import jax
    >>> tree = {"layers": [{"query": {"kernel": 1.0}}]}
    >>> path_str(jax.tree_util.tree_flatten_with_path(tree)[0][0][0])
    'layers/0/query/kernel'
  """
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.GetAttrKey) and k.name in _WRAPPER_KEYS:
      continue
    parts.append(key_str(k))
  return "/".join(parts)


def is_floating(x) -> bool:
  dt = getattr(x, "dtype", None)
  return dt is not None and jax.dtypes.issubdtype(dt, np.floating)


def is_bias_like(path: str) -> bool:
  return bool(_BIAS_RE.search(path))


def is_embedding(path: str) -> bool:
  return bool(_EMBED_RE.search(path))


def qualifies(path: str, leaf) -> bool:
  """A kernel-like leaf: floating, ndim >= 2, not a bias or norm."""
  return (hasattr(leaf, "shape") and len(leaf.shape) >= 2 and is_floating(leaf)
          and not is_bias_like(path) and not _NORM_RE.search(path))


def compile_pattern(pattern: Pattern, what: str) -> Callable[[str, Any], bool]:
  """Turns a user pattern into a predicate `(path_str, leaf) -> bool`."""
  if pattern is None:
    return lambda p, x: False
  if callable(pattern) and not isinstance(pattern, re.Pattern):
    return lambda p, x: bool(pattern(p, x))
  if isinstance(pattern, (str, re.Pattern)):
    try:
      rx = re.compile(pattern)
    except re.error as e:
      raise ValueError(f"jlora: {what}={pattern!r} is not a valid regular expression: {e}") from e
    return lambda p, x: rx.search(p) is not None
  if isinstance(pattern, Sequence):
    preds = [compile_pattern(p, what) for p in pattern]
    return lambda p, x: any(f(p, x) for f in preds)
  raise TypeError(f"jlora: {what} must be a regular expression, a list of them or a callable "
                  f"(path, leaf) -> bool; got {type(pattern).__name__}.")


def lookup(mapping_or_value, path: str, what: str, default=None):
  """Resolves a value that may be given per target as {pattern: value}."""
  if isinstance(mapping_or_value, Mapping):
    for pat, v in mapping_or_value.items():
      if re.search(pat, path):
        return v
    if default is not None:
      return default
    raise ValueError(
        f"jlora: no {what} pattern matches target {path!r}; patterns: {list(mapping_or_value)}. "
        f"Add a pattern for it, e.g. {what}={{**{what}, {path!r}: ...}}, or a catch-all '.*'.")
  return default if mapping_or_value is None else mapping_or_value


def nearest(paths: Sequence[str], hint: str, n: int = 5) -> list[str]:
  """Paths that look most like `hint`, for error messages."""
  if not paths:
    return []
  close = difflib.get_close_matches(hint, paths, n=n, cutoff=0.0)
  return close or list(paths)[:n]
