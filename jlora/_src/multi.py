"""Many adapters over one base: `jlora.stack`, `jlora.select`, `jlora.unstack`."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jlora._src import paths as P
from jlora._src.leaf import LoRA, LoRAStack, Trainable, is_node


def stack(trees: Sequence[Any], *, rank: int | None = None) -> Any:
  """Stacks adapters made over one base into one tree, each example picking its own.

  Every tree must come from the same base (the same frozen leaves) and adapt the
  same kernels with the same layout (`jlora.apply` with the same `targets`,
  `layout`, `stacked`); ranks and alphas may differ. Each `jlora.LoRA` leaf
  becomes a `jlora.LoRAStack`: the adapters stacked on a new axis after the
  stack axes, ranks zero-padded to `rank` (default: the largest), alphas and
  ranks kept as arrays. Run it with `jlora.lora(fn)(jlora.select(tree, ids),
  ...)`: example `e` of the batch computes with adapter `ids[e]` (-1: none).
  Stacking another set of adapters of the same count and padded rank gives a
  tree of the same shapes: a jitted function does not recompile.

  Args:
    trees: the single-adapter trees.
    rank: the padded rank (at least each tree's rank); fix it to swap in
      adapters of other ranks later without recompiling.

  Returns:
    One tree with `jlora.LoRAStack` leaves (and the shared base leaves).

  Raises:
    ValueError: fewer than one tree, trees of different structures, adapted
      kernels or layouts, different base weights (naming the path), a
      `Trainable` leaf (trained in full: not per example), a rank too small,
      or trees that mix `rslora`.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> base = {"q_proj": jax.random.normal(jax.random.key(0), (8, 16))}
    >>> t1 = jlora.apply(base, rank=2, key=jax.random.key(1))
    >>> t2 = jlora.apply(base, rank=4, key=jax.random.key(2))
    >>> s = jlora.stack([t1, t2])
    >>> s["q_proj"].a.shape, s["q_proj"].b.shape
    ((2, 8, 4), (2, 4, 16))
    >>> x = jnp.ones((3, 8))
    >>> y = jlora.lora(lambda p, x: x @ p["q_proj"])(jlora.select(s, jnp.array([0, 1, -1])), x)
    >>> bool(jnp.allclose(y[1], x[1] @ jlora.merge(t2)["q_proj"], atol=1e-5))
    True
  """
  trees = list(trees)
  if not trees:
    raise ValueError("jlora.stack: no trees given. Pass a list of trees made by jlora.apply.")
  flats = [jax.tree_util.tree_flatten_with_path(t, is_leaf=is_node) for t in trees]
  treedef = flats[0][1]
  for i, (_, d) in enumerate(flats[1:], 1):
    if d != treedef:
      raise ValueError(
          f"jlora.stack: tree {i} does not have the structure of tree 0 (other paths, leaf "
          f"kinds or LoRA layouts). Make every adapter with jlora.apply over the same base with "
          f"the same targets, layout and stacked.")
  out = []
  for j, (path, first) in enumerate(flats[0][0]):
    ps = P.path_str(path)
    leaves = [f[0][j][1] for f in flats]
    if isinstance(first, Trainable):
      raise ValueError(
          f"jlora.stack: the leaf at {ps!r} is a jlora.Trainable (trained in full), which cannot "
          f"differ per example. Stack trees without `trainable=` leaves, or keep that leaf "
          f"frozen.")
    if isinstance(first, LoRAStack):
      raise ValueError(f"jlora.stack: the leaf at {ps!r} is already a jlora.LoRAStack. Stack "
                       f"single-adapter trees (jlora.unstack gives them back).")
    if isinstance(first, LoRA):
      out.append(_stack_leaf(ps, leaves, rank))
      continue
    for i, x in enumerate(leaves[1:], 1):
      _check_same_base(ps, first, x, i)
    out.append(first)
  return jax.tree_util.tree_unflatten(treedef, out)


def _check_same_base(ps, x, y, i):
  if x is y:
    return
  lx, ly = jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)
  same = len(lx) == len(ly) and all(
      np.shape(u) == np.shape(v) and jnp.result_type(u) == jnp.result_type(v)
      and bool(jnp.array_equal(u, v)) for u, v in zip(lx, ly))
  if not same:
    raise ValueError(
        f"jlora.stack: tree {i} has another base weight than tree 0 at {ps!r}; stacked adapters "
        f"share one frozen base. Make every adapter with jlora.apply over the same base params.")


def _stack_leaf(ps, leaves: list[LoRA], rank):
  first = leaves[0]
  for i, x in enumerate(leaves[1:], 1):
    if (x.a_axes, x.stack) != (first.a_axes, first.stack):
      raise ValueError(f"jlora.stack: tree {i} factors the kernel at {ps!r} another way (a_axes "
                       f"{x.a_axes}, stack {x.stack}; tree 0: {first.a_axes}, {first.stack}). "
                       f"Use the same layout and stacked in every jlora.apply.")
    if x.rslora != first.rslora:
      raise ValueError(f"jlora.stack: the trees mix rslora at {ps!r}; build them with one "
                       f"setting.")
    _check_same_base(ps, first.w, x.w, i)
  ranks = [x.rank for x in leaves]
  r = max(ranks) if rank is None else rank
  if r < max(ranks):
    raise ValueError(f"jlora.stack: rank={rank} is below the rank {max(ranks)} of an adapter at "
                     f"{ps!r}. Pass rank >= {max(ranks)} (or leave it out: the largest).")
  s = first.stack
  a = jnp.stack([jnp.pad(x.a, [(0, 0)] * (x.a.ndim - 1) + [(0, r - x.rank)]) for x in leaves],
                axis=s)
  b = jnp.stack([jnp.pad(x.b, [(0, 0)] * s + [(0, r - x.rank)] + [(0, 0)] * (x.b.ndim - s - 1))
                 for x in leaves], axis=s)
  return LoRAStack(w=first.w, a=a, b=b, alphas=jnp.asarray([x.alpha for x in leaves],
                                                          jnp.float32),
                   ranks=jnp.asarray(ranks, jnp.int32), ids=None, a_axes=first.a_axes, stack=s,
                   rslora=first.rslora)


def select(tree: Any, ids: Any) -> Any:
  """`tree` with each `jlora.LoRAStack` leaf routing example `e` to adapter `ids[e]`.

  Args:
    tree: a tree made by `jlora.stack`.
    ids: one adapter index per example (int, shape `(batch,)`); -1 runs the base
      alone. A traced array is fine (pass it with the batch).

  Returns:
    The same tree with `ids` set (data, not structure: new ids do not recompile).

  Raises:
    ValueError: no `LoRAStack` leaf, `ids` not 1-D integers, or (when concrete)
      an index outside [-1, number of adapters).
  """
  ids = jnp.asarray(ids)
  if ids.ndim != 1 or not jnp.issubdtype(ids.dtype, jnp.integer):
    raise ValueError(f"jlora.select: ids must be a 1-D integer array (one adapter index per "
                     f"example), got {ids.dtype}{list(ids.shape)}.")
  ids = ids.astype(jnp.int32)
  found = []

  def put(x):
    if isinstance(x, LoRAStack):
      found.append(x.n_adapters)
      return dataclasses.replace(x, ids=ids)
    return x

  out = jax.tree_util.tree_map(put, tree, is_leaf=is_node)
  if not found:
    raise ValueError("jlora.select: the tree holds no jlora.LoRAStack leaf. Make one with "
                     "jlora.stack([tree_1, tree_2, ...]).")
  if not isinstance(ids, jax.core.Tracer):
    lo, hi = int(ids.min(initial=0)), int(ids.max(initial=0))
    if lo < -1 or hi >= min(found):
      raise ValueError(f"jlora.select: ids hold {lo if lo < -1 else hi}; each must be in [-1, "
                       f"{min(found)}) (an adapter of the stack, or -1 for none).")
  return out


def unstack(tree: Any, index: int) -> Any:
  """Adapter `index` of a stacked tree, as a single-adapter tree (its own rank and alpha).

  What `jlora.save`, `jlora.hf.export_peft` and `jlora.merge` take.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> base = {"q_proj": jnp.ones((8, 16))}
    >>> t = jlora.apply(base, rank=2, alpha=4.0)
    >>> one = jlora.unstack(jlora.stack([t, jlora.apply(base, rank=4)]), 0)
    >>> one["q_proj"].rank, one["q_proj"].alpha
    (2, 4.0)
  """
  def take(x):
    if not isinstance(x, LoRAStack):
      return x
    n = x.n_adapters
    if not -n <= index < n:
      raise IndexError(f"jlora.unstack: index {index} is out of range for {n} adapters.")
    r = int(np.asarray(x.ranks)[index])
    s = x.stack
    a = jnp.take(x.a, index, axis=s)[..., :r]
    b = jax.lax.slice_in_dim(jnp.take(x.b, index, axis=s), 0, r, axis=s)
    return LoRA(w=x.w, a=a, b=b, alpha=float(np.asarray(x.alphas)[index]), a_axes=x.a_axes,
                stack=s, rslora=x.rslora)

  return jax.tree_util.tree_map(take, tree, is_leaf=is_node)

