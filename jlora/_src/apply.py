"""`jlora.apply`: turn chosen kernels of a parameter tree into `LoRA` leaves."""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jlora._src import paths as P
from jlora._src import sharding as S
from jlora._src.leaf import LoRA, Trainable, is_node

LAYOUTS = ("keras", "fan")
INITS = ("he_uniform", "gaussian")


def apply(
    params: Any,
    rank: int | Mapping[str, int] = 4,
    *,
    targets: P.Pattern = None,
    alpha: float | Mapping[str, float] | None = None,
    layout: str | Mapping[str, str] = "keras",
    in_axes: Sequence[int] | Mapping[str, Sequence[int]] | None = None,
    stacked: P.Pattern | Mapping[str, int] = None,
    trainable: P.Pattern = None,
    key: jax.Array | None = None,
    dtype: Any = jnp.float32,
    init: str = "he_uniform",
    rslora: bool = False,
) -> Any:
  """Returns `params` with every targeted kernel replaced by a `jlora.LoRA` leaf.

  Each target keeps its weight as the frozen `w` and gains trainable `a` and `b`;
  `b` is zeros, so the model computes exactly what it computed before.

  Args:
    params: any pytree of arrays: a Flax Linen `params` dict, an NNX `State`,
      plain dicts and lists.
    rank: the LoRA rank, or `{regex: rank}` resolved per target (first match).
    targets: which leaves to adapt. `None`: the attention query and value
      projections under the common naming conventions (`query`/`value`,
      `q_proj`/`v_proj`, `attn_q`/`attn_v`, `wq`/`wv`, `q_einsum`, ...);
      `"all-linear"`: every kernel except embeddings and the LM head; a regular
      expression searched in the '/'-joined key path (such as
      `"block_3/attention/query/kernel"`); a list of them; or a callable
      `(path, leaf) -> bool`. Only floating leaves with ndim >= 2 qualify (after
      stack axes); biases and norms never; embedding tables only when a
      pattern names them.
    alpha: the LoRA alpha (default: the rank, so the scale is 1), or
      `{regex: alpha}`.
    layout: how an N-d kernel is factored. `"keras"` (default): `a` spans all
      kernel axes but the last, `b` the last (Keras `EinsumDense.enable_lora`;
      for a 2-D `(in, out)` kernel this is the usual `a (in, r)`, `b (r, out)`).
      `"fan"`: `a` spans the input axes, `b` the output axes (PEFT, Flax NNX);
      the input axes are `(0,)` for 2-D kernels and must be given in `in_axes`
      for N-d ones. May be `{regex: layout}`.
    in_axes: the input axes of N-d kernels for `layout="fan"`: a tuple, or
      `{regex: tuple}`.
    stacked: leaves with leading stack axes (layers stacked for `lax.scan`),
      as a pattern (one stack axis) or `{regex: number_of_stack_axes}`. Each
      slice gets its own adapter.
    trainable: a pattern of leaves to train in full (wrapped in
      `jlora.Trainable`), such as a new classifier head.
    key: a PRNG key for the init of `a` (default `jax.random.key(0)`); each
      target folds in a hash of its path, so inits don't repeat across leaves.
    dtype: the adapters' dtype (default float32, whatever the kernel's dtype).
    init: `"he_uniform"` (default, as Keras and Flax) or `"gaussian"`
      (normal with std 1/rank, as PEFT's `init_lora_weights="gaussian"`).
    rslora: scale by alpha/sqrt(rank) (rank-stabilized LoRA) instead of
      alpha/rank.

  Returns:
    The same tree structure with `LoRA` (and `Trainable`) nodes in place of
    the chosen leaves.

  Raises:
    ValueError: no leaf matched, a bad rank, a layout that does not fit the
      kernel, a leaf that is already LoRA; each message names the key path.
    TypeError: a pattern matched a non-floating leaf.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> params = {"attn": {"query": {"kernel": jnp.ones((8, 16))},
    ...                    "value": {"kernel": jnp.ones((8, 16))}}}
    >>> lp = jlora.apply(params, rank=2)
    >>> lp["attn"]["query"]["kernel"].a.shape, lp["attn"]["query"]["kernel"].b.shape
    ((8, 2), (2, 16))
    >>> jlora.count(lp)
    Count(total=352, trainable=96, frozen=256)
  """
  if init not in INITS:
    raise ValueError(f"jlora.apply: init={init!r} is not one of {INITS}.")
  key = jax.random.key(0) if key is None else key
  targets_fn = _targets_fn(targets)
  trainable_fn = P.compile_pattern(trainable, "trainable")
  if isinstance(stacked, Mapping):
    stack_fn = lambda p, x: P.lookup(stacked, p, "stacked", default=0)
  else:
    stacked_pred = P.compile_pattern(stacked, "stacked")
    stack_fn = lambda p, x: 1 if stacked_pred(p, x) else 0

  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_node)
  out, matched, candidates = [], 0, []
  for path, leaf in flat:
    ps = P.path_str(path)
    if isinstance(leaf, (LoRA, Trainable)):
      if targets_fn(ps, leaf, explicit_check=False) or trainable_fn(ps, leaf):
        kind = type(leaf).__name__
        raise ValueError(
            f"jlora.apply: the leaf at {ps!r} is already a jlora.{kind}. Apply LoRA to the "
            f"base tree instead: jlora.apply(jlora.base(tree), ...), or fold it in first with "
            f"jlora.merge(tree).")
      out.append(leaf)
      continue
    n_stack = int(stack_fn(ps, leaf) or 0)
    kernel_view = _KernelView(leaf, n_stack)
    if P.qualifies(ps, kernel_view) and not P.is_embedding(ps):
      candidates.append(ps)
    is_target = targets_fn(ps, leaf, n_stack=n_stack)
    is_trainable = trainable_fn(ps, leaf)
    if is_target and is_trainable and (targets is None or targets == "all-linear"):
      is_target = False  # an explicit `trainable` pattern wins over a preset
    if is_target and is_trainable:
      raise ValueError(f"jlora.apply: {ps!r} matches both `targets` and `trainable`; a leaf is "
                       f"either adapted or trained in full. Narrow one of the two patterns.")
    if is_trainable:
      out.append(Trainable(leaf))
    elif is_target:
      matched += 1
      out.append(_make_lora(ps, leaf, n_stack, rank=rank, alpha=alpha, layout=layout,
                            in_axes=in_axes, key=key, dtype=dtype, init=init, rslora=rslora))
    else:
      out.append(leaf)
  if matched == 0 and targets_fn.requires_match:
    hint = targets if isinstance(targets, str) else "query"
    near = P.nearest(candidates, hint)
    raise ValueError(
        f"jlora.apply: targets={targets!r} matched no kernel (a floating leaf with ndim >= 2 "
        f"that is not a bias or norm). Nearest candidate paths: {near}. Pass a regular "
        f"expression searched in these '/'-joined paths, e.g. targets={near[0] if near else '...'!r}"
        f", or targets='all-linear'.")
  return jax.tree_util.tree_unflatten(treedef, out)


class _KernelView:
  """Shape/dtype of a leaf with its stack axes dropped (for `qualifies`)."""

  def __init__(self, leaf, n_stack):
    shape = tuple(getattr(leaf, "shape", ()))
    self.shape = shape[n_stack:] if len(shape) >= n_stack else ()
    self.dtype = getattr(leaf, "dtype", None)


def _targets_fn(targets):
  """Returns `f(path, leaf, n_stack=0, explicit_check=True) -> bool` with `.requires_match`."""
  if targets is None or targets == "all-linear":
    qv = P.compile_pattern(P.QV_PATTERN, "targets")
    preset = targets

    def f(ps, leaf, n_stack=0, explicit_check=True):
      if isinstance(leaf, (LoRA, Trainable)):
        return preset is None and qv(ps, leaf) or preset == "all-linear"
      view = _KernelView(leaf, n_stack)
      if not P.qualifies(ps, view) or P.is_embedding(ps):
        return False
      if preset == "all-linear":
        return not P._HEAD_RE.search(ps)
      return qv(ps, leaf)
  else:
    if isinstance(targets, str) and targets in ("all_linear", "all"):
      raise ValueError(f"jlora.apply: unknown preset targets={targets!r}; did you mean "
                       f"'all-linear'?")
    user = P.compile_pattern(targets, "targets")
    is_callable = callable(targets) and not isinstance(targets, (str, Sequence))

    def f(ps, leaf, n_stack=0, explicit_check=True):
      if not user(ps, leaf):
        return False
      if isinstance(leaf, (LoRA, Trainable)) or not explicit_check:
        return True
      view = _KernelView(leaf, n_stack)
      if not hasattr(leaf, "shape"):
        return False
      if not P.is_floating(leaf):
        if len(view.shape) >= 2 or is_callable:
          raise TypeError(
              f"jlora.apply: targets={targets!r} matched {ps!r} of dtype {leaf.dtype}; only "
              f"floating kernels can carry LoRA. Narrow the pattern so it excludes this leaf.")
        return False
      if len(view.shape) < 2:
        if is_callable:
          raise ValueError(
              f"jlora.apply: the targets callable selected {ps!r} with kernel shape "
              f"{view.shape}; LoRA needs ndim >= 2 (after {n_stack} stack axes). Return False "
              f"for it.")
        return False
      if P.is_bias_like(ps) or P._NORM_RE.search(ps):
        return is_callable
      return True

  f.requires_match = True
  return f


def _path_key(key, ps):
  return jax.random.fold_in(key, zlib.crc32(ps.encode()) & 0x7FFFFFFF)


def _make_lora(ps, leaf, n_stack, *, rank, alpha, layout, in_axes, key, dtype, init, rslora):
  shape = tuple(leaf.shape)  # `_targets_fn` let through only kernels with ndim >= 2
  stack_shape, kshape = shape[:n_stack], shape[n_stack:]
  r = P.lookup(rank, ps, "rank")
  if isinstance(r, bool) or not isinstance(r, int):
    raise TypeError(f"jlora.apply: rank for {ps!r} must be an int, got {r!r}.")
  lay = P.lookup(layout, ps, "layout")
  if lay == "keras":
    a_axes = tuple(range(len(kshape) - 1))
  elif lay == "fan":
    ia = P.lookup(in_axes, ps, "in_axes", default=(0,) if len(kshape) == 2 else None)
    if ia is None:
      raise ValueError(
          f"jlora.apply: layout='fan' needs the input axes of the {len(kshape)}-d kernel at "
          f"{ps!r} (shape {kshape}). Pass them, e.g. in_axes={{{ps!r}: (0,)}}, or use "
          f"layout='keras'.")
    ia = (ia,) if isinstance(ia, int) else tuple(ia)
    nd = len(kshape)
    a_axes = tuple(sorted(i % nd if -nd <= i < nd else i for i in ia))
    if (len(set(a_axes)) != len(a_axes) or any(not 0 <= i < nd for i in a_axes)
        or not 0 < len(a_axes) < nd):
      raise ValueError(
          f"jlora.apply: in_axes={ia} does not fit the kernel at {ps!r} of shape {kshape}: "
          f"give between 1 and {nd - 1} distinct axes in [0, {nd}).")
  else:
    raise ValueError(f"jlora.apply: layout={lay!r} for {ps!r} is not one of {LAYOUTS}.")
  a_dims = tuple(kshape[i] for i in a_axes)
  b_dims = tuple(kshape[i] for i in range(len(kshape)) if i not in a_axes)
  fan_in, fan_out = math.prod(a_dims), math.prod(b_dims)
  if r < 1:
    raise ValueError(f"jlora.apply: rank {r} for {ps!r} must be >= 1 (the number of columns of "
                     f"a); use e.g. rank=4, or leave {ps!r} out of `targets`.")
  if r >= min(fan_in, fan_out):
    raise ValueError(
        f"jlora.apply: rank {r} for {ps!r} (kernel {kshape}, factored as {fan_in} x {fan_out} "
        f"in layout {lay!r}) must be >= 1 and < {min(fan_in, fan_out)}; a rank that large is "
        f"no longer low-rank. Give this kernel a smaller rank, e.g. rank={{{ps!r}: "
        f"{max(1, min(fan_in, fan_out) - 1)}, '.*': {r}}}, or leave it out of `targets`.")
  al = P.lookup(alpha, ps, "alpha", default=r)
  al = float(r if al is None else al)
  k = _path_key(key, ps)
  a_shape = stack_shape + a_dims + (r,)
  b_shape = stack_shape + (r,) + b_dims
  # A weight sharded on a mesh: the adapters are created sharded after it (jlora.shardings).
  lim = math.sqrt(6.0 / fan_in) if init == "he_uniform" else 1.0 / r
  placed = S.init_adapters_like(leaf, k, a_shape, b_shape, dtype, init, lim, a_axes, n_stack)
  if placed is not None:
    a, b = placed
    return LoRA(w=leaf, a=a, b=b, alpha=al, a_axes=a_axes, stack=n_stack, rslora=rslora)
  if init == "he_uniform":
    lim = math.sqrt(6.0 / fan_in)
    a = jax.random.uniform(k, a_shape, dtype, -lim, lim)
  else:
    a = jax.random.normal(k, a_shape, dtype) * jnp.asarray(1.0 / r, dtype)
  b = jnp.zeros(stack_shape + (r,) + b_dims, dtype)
  return LoRA(w=leaf, a=a, b=b, alpha=al, a_axes=a_axes, stack=n_stack, rslora=rslora)
