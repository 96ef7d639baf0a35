"""Whole-tree operations: split/combine, merge/base, count/summary."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax

from jlora._src import paths as P
from jlora._src.leaf import LoRA, LoRAStack, Trainable, is_node
from jlora._src.qarray import Quantized


class Split(NamedTuple):
  """The two halves of a jlora tree, each with `None` holes where the other has data."""

  trainable: Any
  frozen: Any


def _map_nodes(fn, tree):
  return jax.tree_util.tree_map(lambda x: fn(x), tree, is_leaf=is_node)


def split(tree: Any) -> Split:
  """Splits a jlora tree into `(trainable, frozen)` halves with `None` holes.

  `trainable` keeps `LoRA.a`/`LoRA.b` (and DoRA's `LoRA.m`) and `Trainable` values; `frozen` keeps
  `LoRA.w` and every plain leaf. `jlora.combine(*jlora.split(t))` is `t`.

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> t = jlora.apply({"q_proj": jnp.ones((4, 6)), "norm": jnp.ones(4)}, rank=2)
    >>> trainable, frozen = jlora.split(t)
    >>> trainable["norm"] is None, frozen["q_proj"].a is None
    (True, True)
  """
  def train(x):
    if isinstance(x, LoRA):
      return dataclasses.replace(x, w=None)
    if isinstance(x, LoRAStack):  # the adapters train; their alphas, ranks and routing do not
      return dataclasses.replace(x, w=None, alphas=None, ranks=None, ids=None)
    if isinstance(x, Trainable):
      return x
    return None

  def frozen(x):
    if isinstance(x, LoRAStack):
      return dataclasses.replace(x, a=None, b=None)
    if isinstance(x, LoRA):
      return dataclasses.replace(x, a=None, b=None, m=None)
    if isinstance(x, Trainable):
      return Trainable(None)
    return x

  return Split(_map_nodes(train, tree), _map_nodes(frozen, tree))


def combine(trainable: Any, frozen: Any) -> Any:
  """The exact inverse of `jlora.split`: fills each half's `None` holes from the other.

  Raises:
    ValueError: the halves do not come from the same tree (the message names
      the first differing path), or both or neither hold data at a path.
  """
  hole = lambda x: x is None or isinstance(x, Quantized)  # a quantized weight is frozen whole
  t_def = jax.tree_util.tree_structure(trainable, is_leaf=hole)
  f_def = jax.tree_util.tree_structure(frozen, is_leaf=hole)
  if t_def != f_def:
    what, fix = _first_difference(trainable, frozen)
    raise ValueError(
        f"jlora.combine: the trainable and frozen trees do not have the same structure "
        f"({what}). {fix}")

  def pick(path, t, f):
    if t is None:
      return f
    if f is None:
      return t
    raise ValueError(f"jlora.combine: both halves hold a value at {P.path_str(path)!r}; "
                     f"the halves of jlora.split hold each leaf in exactly one of them.")

  return jax.tree_util.tree_map_with_path(pick, trainable, frozen, is_leaf=hole)


_SAME_TREE = ("Pass the two halves of one jlora.split(tree), or trees built from them with the "
              "same structure.")


def _kind(x) -> str:
  if isinstance(x, LoRA):
    return "a jlora.LoRA"
  if isinstance(x, Trainable):
    return "a jlora.Trainable"
  return "a plain leaf"


def _first_difference(a, b) -> tuple[str, str]:
  """What differs first between the two halves (with its key path), and the fix."""
  is_leaf = lambda x: x is None or is_node(x)
  fa = {P.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(a, is_leaf=is_leaf)[0]}
  fb = {P.path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(b, is_leaf=is_leaf)[0]}
  only_a = sorted(set(fa) - set(fb))
  only_b = sorted(set(fb) - set(fa))
  if only_a or only_b:
    return f"paths only in trainable: {only_a[:5]}; only in frozen: {only_b[:5]}", _SAME_TREE
  head = ("same paths but different node types or static LoRA metadata (alpha, a_axes, stack, "
          "rslora, residual)")
  for ps, x in fa.items():
    y = fb[ps]
    if _kind(x) != _kind(y):
      return f"{head}: at {ps!r}: {_kind(x)} in trainable, {_kind(y)} in frozen", _SAME_TREE
    if not isinstance(x, LoRA):
      continue
    for name in ("alpha", "a_axes", "stack", "rslora", "residual"):
      u, v = getattr(x, name), getattr(y, name)
      if isinstance(u, float) and isinstance(v, float) and math.isnan(u) and math.isnan(v):
        return (f"{head}: at {ps!r}: alpha nan in both halves, and nan is never equal to itself",
                "Rebuild the tree with a finite alpha: jlora.apply(jlora.base(tree), ..., "
                "alpha=16.0) (jlora.apply refuses a nan alpha).")
      if u != v:
        return f"{head}: at {ps!r}: {name} {u!r} in trainable, {v!r} in frozen", _SAME_TREE
  return head, _SAME_TREE


def _merge_leaf(x):
  if isinstance(x, LoRAStack):
    raise ValueError(
        "jlora.merge: a jlora.LoRAStack holds several adapters (one per example); there is no "
        "single merged weight. Merge one adapter: jlora.merge(jlora.unstack(tree, i)).")
  if isinstance(x, Quantized):
    return x.dequantize()
  if isinstance(x, LoRA):
    return x.effective()
  if isinstance(x, Trainable):
    return x.value
  return x


def _base_leaf(x):
  if isinstance(x, (LoRA, LoRAStack)):
    return x.w
  if isinstance(x, Trainable):
    return x.value
  return x


@jax.jit
def _merge_jit(tree):
  return _map_nodes(_merge_leaf, tree)


@functools.partial(jax.jit, donate_argnums=1)
def _merge_jit_donate(trainable, frozen):
  # Only the frozen half is donated: its buffers (each `w`) have the shapes of the
  # outputs; the adapters' buffers could not be reused (and jax warns if donated).
  return _map_nodes(_merge_leaf, combine(trainable, frozen))


def merge(tree: Any, *, donate: bool = False) -> Any:
  """Folds every adapter into its weight: `w + scale * a @ b`, cast to `w`'s dtype.

  A DoRA leaf folds to `(w + scale * a @ b) * m / norm`, the norm over the A axes.

  `Trainable` leaves are unwrapped; plain leaves pass through. A quantized
  weight (`jlora.quantize`) is dequantized to its dtype (the compute dtype),
  with or without an adapter: the result is a plain tree, never re-quantized
  (to quantize the merged weights again: `jlora.quantize(jlora.merge(tree))`). The sum is taken
  in the promoted dtype of `w` and the adapters, then cast back. Jitted; with
  `donate=True` the buffers of the frozen weights are donated to the result
  (don't use `tree` afterwards).
  Shardings follow the weights: the result of each leaf is laid out as its `w`.

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> t = jlora.apply({"q_proj": jnp.ones((4, 6))}, rank=2)
    >>> bool((jlora.merge(t)["q_proj"] == 1).all())  # b == 0 at init
    True
  """
  if not donate or any(isinstance(x, Quantized) for x in
                       jax.tree_util.tree_leaves(tree, is_leaf=lambda x: isinstance(x, Quantized))):
    return _merge_jit(tree)  # (codes are not the weight's size: nothing to donate them to)
  trainable, frozen = split(tree)
  return _merge_jit_donate(trainable, _distinct_buffers(frozen))


def _distinct_buffers(frozen: Any) -> Any:
  """`frozen` with a copy of every array that repeats (a tied weight at two paths): a buffer
  can be donated once only. The first occurrence is donated, the repeat's copy is not kept."""
  leaves, treedef = jax.tree_util.tree_flatten(frozen)
  seen, out = set(), []
  for x in leaves:
    if isinstance(x, jax.Array) and id(x) in seen:
      x = jax.device_put(x, x.sharding, may_alias=False)
    seen.add(id(x))
    out.append(x)
  return jax.tree_util.tree_unflatten(treedef, out)


def base(tree: Any) -> Any:
  """The base weights: every `LoRA` leaf replaced by its frozen `w` (exact undo of apply)."""
  return _map_nodes(_base_leaf, tree)


class Count(NamedTuple):
  total: int
  trainable: int
  frozen: int


def _size(x) -> int:
  return 0 if x is None else int(math.prod(getattr(x, "shape", ())))


def count(tree: Any) -> Count:
  """Parameter counts `(total, trainable, frozen)`; works on abstract trees too."""
  t = f = 0
  for x in jax.tree_util.tree_leaves(tree, is_leaf=is_node):
    if isinstance(x, LoRAStack):
      t += _size(x.a) + _size(x.b)
      f += _size(x.w)
    elif isinstance(x, LoRA):
      t += _size(x.a) + _size(x.b) + _size(x.m)
      f += _size(x.w)
    elif isinstance(x, Trainable):
      t += _size(x.value)
    else:
      f += _size(x)
  return Count(t + f, t, f)


def summary(tree: Any, *, max_rows: int | None = None) -> str:
  """A table of the tree in the spirit of Keras's `model.summary()`.

  One row per leaf (path, shape, dtype, rank, params), LoRA leaves showing their
  adapter shapes, then `Total params`, `Trainable params`, `Non-trainable params`.

  Args:
    tree: a jlora tree (concrete or abstract).
    max_rows: show at most this many rows (the totals always count everything).

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> t = jlora.apply({"q_proj": jnp.ones((4, 6)), "norm": jnp.ones(4)}, rank=2)
    >>> print(jlora.summary(t).splitlines()[-1])
    Non-trainable params: 28
  """
  rows = []
  for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_node)[0]:
    ps = P.path_str(path)
    if isinstance(x, LoRA):
      rank = "" if x.rank is None else str(x.rank)
      rows.append((ps, _fmt_shape(x.shape), str(x.dtype), rank,
                   f"{_size(x.a) + _size(x.b) + _size(x.m):,} + {_size(x.w):,} frozen"))
      for name in ("a", "b", "m"):
        v = getattr(x, name)
        if v is not None:
          rows.append((f"  .{name}", _fmt_shape(v.shape), str(v.dtype), "", ""))
    elif isinstance(x, LoRAStack):
      rows.append((ps, _fmt_shape(x.shape), str(x.dtype), f"{x.n_adapters} x {x.rank}",
                   f"{_size(x.a) + _size(x.b):,} + {_size(x.w):,} frozen"))
    elif isinstance(x, Quantized):
      rows.append((ps, _fmt_shape(x.shape), f"{x.kind}->{x.dtype_name}", "",
                   f"{_size(x):,} frozen"))
    elif isinstance(x, Trainable) and x.value is None:
      continue  # the frozen half of jlora.split: the value lives in the trainable half
    elif isinstance(x, Trainable):
      rows.append((ps, _fmt_shape(x.value.shape), str(x.value.dtype), "full",
                   f"{_size(x.value):,}"))
    else:
      rows.append((ps, _fmt_shape(getattr(x, "shape", ())), str(getattr(x, "dtype", "")), "",
                   f"{_size(x):,} frozen"))
  shown = rows if max_rows is None else rows[:max_rows]
  head = ("Path", "Shape", "Dtype", "Rank", "Params")
  widths = [max(len(r[i]) for r in [head, *shown]) for i in range(5)]
  line = "─" * (sum(widths) + 2 * 4)
  fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
  out = [line, fmt(head), line, *map(fmt, shown)]
  if len(shown) < len(rows):
    out.append(f"... {len(rows) - len(shown)} more rows")
  c = count(tree)
  out += [line, f"Total params: {c.total:,}", f"Trainable params: {c.trainable:,}",
          f"Non-trainable params: {c.frozen:,}"]
  return "\n".join(out)


def _fmt_shape(s) -> str:
  return "(" + ", ".join(str(d) for d in s) + ")"
