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
_QV_RE = re.compile(QV_PATTERN)

# Every rule below compares whole path components (split at '/' and '.'), never
# substrings: `text_embedder/attn/query` is a query projection, `denormalizer/query`
# too, and `patch_embed/proj` is the ViT patch projection, not an embedding table.

# Leaf names of biases (never targeted unless a user pattern names the leaf).
_BIAS_LEAF = re.compile(r"bias|b|\w*_bias|bias_\w*", re.IGNORECASE)
# Norm layers (the leaf itself or the module holding it): `norm`, `q_norm`,
# `input_layernorm`, `LayerNorm_0`, `RMSNorm_0`, `layer_norm1`, `norm_f`, `ln_1`, `ln_f`,
# `final_normalization`; not `denormalizer` or `normalizer`.
_NORM_NAME = re.compile(r"\w*norm(alization|alisation)?\d*(_\w+)?|ln\d*(_\w+|f)?|\w*_ln\d*(_\w+)?",
                        re.IGNORECASE)
# Embedding tables by leaf name: Flax `nn.Embed`'s `embedding`, Keras `embeddings`,
# gemma `input_embedding`, GPT-2 `wte`/`wpe`, ViT `pos_embed`/`pos_embedding`.
_EMBED_LEAF = re.compile(r"embed|embeds|embedding|embeddings|emb|emb_var|wte|wpe|token_embd|"
                         r"\w+_embed|\w+_embeds|\w+_embedding|\w+_embeddings|\w+_emb|"
                         r"embed_\w+|embedding_\w+", re.IGNORECASE)
# Embedding modules, whose `weight` (or any leaf but a `kernel`) is the table:
# `embed_tokens.weight`, `wte.weight`, `token_embd.weight`, `Embed_0/embedding`.
_EMBED_MODULE = re.compile(r"embed|embeds|embedding|embeddings|embedder|emb|wte|wpe|token_embd|"
                           r"embed_\w+|\w+_embeddings?|\w+_emb|Embed(_\d+)?", re.IGNORECASE)
# A leaf name that says "this is a kernel" (Flax/Keras `kernel`, PyTorch `weight`, `w`).
_KERNEL_LEAF = re.compile(r"kernel|weight|w", re.IGNORECASE)
# The LM head: `lm_head` anywhere; `output`/`logits` only as a top-level module (GGUF
# `output.weight`), since `attention/output/dense` in BERT is an ordinary linear layer.
_HEAD_RE = re.compile(r"(^|[/.])lm_head([/.]|$)|^(output|logits)([/.]|$)")

# Components that wrap a value without naming it: Flax NNX `Variable.value` and friends.
_WRAPPER_KEYS = {"value", "raw_value"}

_SEP = re.compile(r"[/.]")

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


def components(path: str) -> list[str]:
  """The components of a path, split at '/' and at '.' (flat checkpoint names).

  Example:
    >>> components("model.layers.0.self_attn/q_proj/kernel")
    ['model', 'layers', '0', 'self_attn', 'q_proj', 'kernel']
  """
  return _SEP.split(path)


def parent_prefix(path: str) -> str:
  """The path up to and including the separator before the leaf name ('' at the top)."""
  cut = max(path.rfind("/"), path.rfind("."))
  return path[:cut + 1]


def is_floating(x) -> bool:
  dt = getattr(x, "dtype", None)
  return dt is not None and jax.dtypes.issubdtype(dt, np.floating)


def _leaf_and_parent(path: str) -> tuple[str, str]:
  comps = components(path)
  return comps[-1], (comps[-2] if len(comps) > 1 else "")


def is_bias_like(path: str) -> bool:
  """The leaf is named as a bias (`bias`, `b`, `out_bias`, ...)."""
  return bool(_BIAS_LEAF.fullmatch(_leaf_and_parent(path)[0]))


def is_norm(path: str) -> bool:
  """The leaf is a norm's parameter: it, or the module holding it, is named as a norm.

  Example:
    >>> is_norm("layers/input_layernorm/scale"), is_norm("denormalizer/query/kernel")
    (True, False)
  """
  leaf, parent = _leaf_and_parent(path)
  return bool(_NORM_NAME.fullmatch(leaf) or _NORM_NAME.fullmatch(parent))


def is_embedding(path: str) -> bool:
  """The leaf is an embedding table: named as one, or held by an embedding module.

  A `kernel` is a Dense or conv kernel wherever it sits (`patch_embed/proj/kernel`,
  `embeddings/patch_embeddings/projection/kernel`).

  Example:
    >>> [is_embedding(p) for p in ("embed_tokens/embedding", "model.embed_tokens.weight",
    ...                            "text_embedder/attn/query/kernel", "patch_embed/proj/kernel")]
    [True, True, False, False]
  """
  leaf, parent = _leaf_and_parent(path)
  if _EMBED_LEAF.fullmatch(leaf):
    return True
  if leaf.lower() == "kernel":
    return False
  return bool(parent) and bool(_EMBED_MODULE.fullmatch(parent))


def is_head(path: str) -> bool:
  """The LM head (`lm_head`, or a top-level `output`/`logits` module)."""
  return bool(_HEAD_RE.search(path))


def is_qv(path: str) -> bool:
  """A component names a query or value projection (the default targets)."""
  return bool(_QV_RE.search(path))


def is_kernel_named(path: str) -> bool:
  """The leaf is named as a kernel (`kernel`, `weight`, `w`) or is a query/value projection."""
  return bool(_KERNEL_LEAF.fullmatch(_leaf_and_parent(path)[0])) or is_qv(path)


def qualifies(path: str, leaf) -> bool:
  """A kernel-like leaf: floating, ndim >= 2, not a bias or norm."""
  return (hasattr(leaf, "shape") and len(leaf.shape) >= 2 and is_floating(leaf)
          and not is_bias_like(path) and not is_norm(path))


def _compile_regex(pat, fn: str, what: str, shown: str):
  try:
    return re.compile(pat)
  except re.error as e:
    raise ValueError(f"{fn}: {shown} regular expression {pat!r}: {e}. Fix it, or escape "
                     f"literal text with re.escape(...).") from e
  except TypeError as e:
    raise TypeError(f"{fn}: {what} must be a regular expression, a list of them or a callable "
                    f"(path, leaf) -> bool; got {type(pat).__name__}.") from e


class Selector:
  """A compiled user pattern: `sel(path, leaf) -> bool` and `sel.names(path, leaf)`.

  A pattern *names* a leaf when a match spans the leaf's whole name and the
  pattern does not select the module holding it: `"attn/b"` and `r"/b$"` name the
  leaf `attn/b`; `"attn"` (the module) and `"head"` in `head_bias` (part of a
  name) only select it. A callable always names what it selects.
  """

  def __init__(self, pattern: Pattern, what: str, fn: str = "jlora.apply"):
    self.pattern = pattern
    self.what = what
    self._rxs: list[re.Pattern] = []
    self._fn = None
    if pattern is None:
      return
    if callable(pattern) and not isinstance(pattern, re.Pattern):
      self._fn = pattern
    elif isinstance(pattern, str):
      try:
        self._rxs = [re.compile(pattern)]
      except re.error as e:
        raise ValueError(f"{fn}: {what}={pattern!r} is not a valid regular expression: {e}. "
                         f"Fix it, or escape literal text with re.escape(...).") from e
    elif isinstance(pattern, re.Pattern):
      self._rxs = [pattern]
    elif isinstance(pattern, Sequence):
      for p in pattern:
        if not isinstance(p, (str, re.Pattern)):
          raise TypeError(f"{fn}: {what} must be a regular expression, a list of them or a "
                          f"callable (path, leaf) -> bool; got a list holding "
                          f"{type(p).__name__}.")
        self._rxs.append(_compile_regex(p, fn, what, f"{what}={pattern!r} holds an invalid"))
    else:
      raise TypeError(f"{fn}: {what} must be a regular expression, a list of them or a callable "
                      f"(path, leaf) -> bool; got {type(pattern).__name__}.")

  @property
  def is_callable(self) -> bool:
    return self._fn is not None

  @property
  def hint(self) -> str | None:
    """The first regular expression's text, for nearest-match suggestions."""
    return self._rxs[0].pattern if self._rxs else None

  def __call__(self, path: str, leaf=None) -> bool:
    if self._fn is not None:
      return bool(self._fn(path, leaf))
    return any(rx.search(path) is not None for rx in self._rxs)

  def names(self, path: str, leaf=None) -> bool:
    if self._fn is not None:
      return bool(self._fn(path, leaf))
    head = parent_prefix(path)
    return any(rx.search(path) is not None and rx.search(head) is None
               and any(rx.fullmatch(path, s) for s in range(len(head) + 1))
               for rx in self._rxs)


def compile_pattern(pattern: Pattern, what: str, fn: str = "jlora.apply") -> Selector:
  """Turns a user pattern into a predicate `(path_str, leaf) -> bool` (a `Selector`).

  Example:
    >>> sel = compile_pattern(["q_proj", r"mlp/kernel$"], "targets")
    >>> sel("block/q_proj/kernel"), sel("block/k_proj/kernel"), sel.names("block/q_proj/bias")
    (True, False, False)
    >>> sel.names("block/mlp/kernel"), compile_pattern("mlp", "targets").names("block/mlp/kernel")
    (True, False)
  """
  return Selector(pattern, what, fn)


class PerTarget:
  """A value given once or per target as `{regex: value}` (first match wins).

  `get(path)` returns `(value, pattern)`: the pattern that chose the value, or
  None for a value given once (or the default).
  """

  def __init__(self, value: Any, what: str, fn: str = "jlora.apply"):
    self.value = value
    self.what = what
    self.fn = fn
    self.rules: list[tuple[re.Pattern, Any]] | None = None
    if isinstance(value, Mapping):
      self.rules = []
      for pat, v in value.items():
        if not isinstance(pat, (str, re.Pattern)):
          raise TypeError(f"{fn}: the keys of {what}= must be regular expressions (str); got "
                          f"{pat!r}. Write e.g. {what}={{'q_proj': ..., '.*': ...}}.")
        try:
          rx = re.compile(pat)
        except re.error as e:
          raise ValueError(f"{fn}: {what}={value!r} has an invalid regular expression {pat!r} "
                           f"as a key: {e}. Fix it, or escape literal text with "
                           f"re.escape(...).") from e
        self.rules.append((rx, v))

  @property
  def is_mapping(self) -> bool:
    return self.rules is not None

  def matches_any(self, path: str) -> bool:
    if self.rules is None:
      return self.value is not None
    return any(rx.search(path) for rx, _ in self.rules)

  def get(self, path: str, default: Any = None, *, required: bool = False):
    if self.rules is None:
      return (default if self.value is None else self.value), None
    for rx, v in self.rules:
      if rx.search(path):
        return v, rx.pattern
    if required and default is None:
      raise ValueError(
          f"{self.fn}: no {self.what} pattern matches target {path!r}; patterns: "
          f"{[rx.pattern for rx, _ in self.rules]}. Add a pattern for it, e.g. "
          f"{self.what}={{**{self.what}, {re.escape(path)!r}: ...}}, or a catch-all '.*'.")
    return default, None


def prefixes(paths: Sequence[str]) -> list[str]:
  """Every path and every module path above it, without repeats, in order.

  Example:
    >>> prefixes(["a/b/kernel", "a/c"])
    ['a', 'a/b', 'a/b/kernel', 'a/c']
  """
  out: dict[str, None] = {}
  for p in paths:
    parts = p.split("/")
    for i in range(1, len(parts) + 1):
      out.setdefault("/".join(parts[:i]), None)
  return list(out)


def nearest(paths: Sequence[str], hint: str | None, n: int = 5) -> list[str]:
  """Paths that look most like `hint`, for error messages."""
  if not paths:
    return []
  if not hint:
    return list(paths)[:n]
  close = difflib.get_close_matches(hint, paths, n=n, cutoff=0.0)
  return close or list(paths)[:n]
