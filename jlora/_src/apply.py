"""`jlora.apply`: turn chosen kernels of a parameter tree into `LoRA` leaves."""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import operator
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jlora._src import paths as P
from jlora._src.leaf import LoRA, Trainable, dora_norm, is_node
from jlora._src.qarray import KINDS as QKINDS, Quantized, quantize_array
from jlora._src.specs import adapter_specs

LAYOUTS = ("keras", "fan")
INITS = ("he_uniform", "gaussian", "pissa", "olora")  # and "pissa_niter_<n>"
RESIDUAL_INITS = ("pissa", "olora")


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
    dora: bool = False,
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
      `"all-linear"`: every kernel except embedding tables and the LM head; a
      regular expression searched in the '/'-joined key path (such as
      `"block_3/attention/query/kernel"`); a list of them; or a callable
      `(path, leaf) -> bool`. Only floating leaves with ndim >= 2 (after stack
      axes) are adapted. Biases (`bias`, `b`, `*_bias`) and norm parameters are
      left out unless a pattern names the leaf itself (`"attn/b"`, not just the
      module `"attn"`); embedding tables (`embed_tokens/embedding`, `wte`, ...)
      only when a pattern selects them. Names are compared as whole path
      components: `text_embedder/attn/query` is a query projection.
    alpha: the LoRA alpha (default: the rank, so the scale is 1), or
      `{regex: alpha}`: a finite, non-zero number (negative flips the sign of
      the update, as PEFT allows; 0 would never train).
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
      slice gets its own adapter. It must match some leaf, and leave every
      kernel it matches with ndim >= 2.
    trainable: a pattern of leaves to train in full (wrapped in
      `jlora.Trainable`), such as a new classifier head. It must match some
      leaf, and only floating (or complex) leaves.
    key: a PRNG key for the init of `a` (default `jax.random.key(0)`); each
      target folds in a hash of its path, so inits don't repeat across leaves.
    dtype: the adapters' dtype (default float32, whatever the kernel's dtype).
    init: `"he_uniform"` (default, as Keras and Flax) or `"gaussian"`
      (normal with std 1/rank, as PEFT's `init_lora_weights="gaussian"`), with
      `b` zeros; or an init that moves the weight's principal part into the
      adapters and leaves the frozen `w` as the residual (the model is
      unchanged; the leaf records it in `LoRA.residual`), as PEFT's
      `init_lora_weights` of the same name computes it, in float32:
      `"pissa"` (`a`, `b` from the top `rank` singular triplets, each factor
      taking the square root of the singular values divided by the scale),
      `"pissa_niter_<n>"` (the same from a randomized SVD with `n` power
      iterations, seeded by `key`: fast for large kernels) or `"olora"` (`b`
      the first `rank` rows of Q and `a` of R in the QR decomposition of the
      `(out, in)` weight). N-d kernels are factored as the matrix of their A
      axes by their B axes.
    rslora: scale by alpha/sqrt(rank) (rank-stabilized LoRA) instead of
      alpha/rank.
    dora: make each target a DoRA leaf (weight-decomposed LoRA): a trainable
      magnitude `m`, one value per element of the kernel's B axes (per output
      feature of a 2-D kernel), initialised to the norm of the weight over its
      A axes, so the model is unchanged; see `jlora.LoRA`.

  Returns:
    The same tree structure with `LoRA` (and `Trainable`) nodes in place of
    the chosen leaves.

  Raises:
    ValueError: no leaf matched (`targets`, `stacked` or `trainable`), a named
      leaf that cannot carry LoRA, a stack that leaves a kernel with fewer than
      2 axes, a bad rank or alpha, a layout that does not fit the kernel, a
      leaf that is already LoRA, an invalid regular expression; each message
      names the key path (or the argument) and the fix.
    TypeError: a pattern matched a non-floating leaf (or `trainable` one without
      a gradient), or an argument of the wrong type.

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
  init = _check_init(init)
  rslora = _check_rslora(rslora)
  dora = _check_flag(dora, "dora")
  dtype = _adapter_dtype(dtype)
  key = _prng_key(key)
  select = _Targets(targets, stacked)
  trainable_sel = P.compile_pattern(trainable, "trainable")
  stack = _Stack(stacked)
  per_target = dict(rank=P.PerTarget(rank, "rank"), alpha=P.PerTarget(alpha, "alpha"),
                    layout=P.PerTarget(layout, "layout"), in_axes=P.PerTarget(in_axes, "in_axes"))

  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_node)
  leaves = [(P.path_str(path), leaf) for path, leaf in flat]
  # Patterns that select nothing are typos: say so before anything else is checked.
  if stacked is not None and not any(stack.matches(ps) for ps, _ in leaves):
    _raise_no_match("stacked", stacked, stack.hint, [ps for ps, _ in leaves],
                    "the '/'-joined key paths of the leaves with leading stack axes (layers "
                    "stacked for lax.scan), e.g. stacked=r'^layers/'")
  train_flags = [trainable_sel(ps, leaf) for ps, leaf in leaves]
  if trainable is not None and not any(train_flags):
    _raise_no_match("trainable", trainable, trainable_sel.hint, [ps for ps, _ in leaves],
                    "the '/'-joined key paths, e.g. trainable=r'^classifier/'")

  out, matched, candidates, rejects = [], 0, [], []
  used = {"fan": False}
  for (ps, leaf), is_trainable in zip(leaves, train_flags):
    if isinstance(leaf, (LoRA, Trainable)):
      if select.selects_node(ps, leaf) or is_trainable:
        kind = type(leaf).__name__
        raise ValueError(
            f"jlora.apply: the leaf at {ps!r} is already a jlora.{kind}. Apply LoRA to the "
            f"base tree instead: jlora.apply(jlora.base(tree), ...), or fold it in first with "
            f"jlora.merge(tree).")
      out.append(leaf)
      continue
    n_stack = stack.count(ps)
    if P.qualifies(ps, _KernelView(leaf, n_stack)) and not P.is_embedding(ps):
      candidates.append(ps)
    if is_trainable:
      if select.is_preset:
        decision = _SKIP  # an explicit `trainable` pattern wins over a preset
      else:
        decision = select.decide(ps, leaf, n_stack)
      if decision is not _SKIP:
        raise ValueError(f"jlora.apply: {ps!r} matches both `targets` and `trainable`; a leaf is "
                         f"either adapted or trained in full. Narrow one of the two patterns.")
      _check_trainable(trainable, ps, leaf)
      out.append(Trainable(leaf))
      continue
    decision = select.decide(ps, leaf, n_stack)
    if decision is _ADAPT:
      matched += 1
      if isinstance(leaf, Quantized) and (init in RESIDUAL_INITS or _niter(init) is not None):
        raise ValueError(
            f"jlora.apply: init={init!r} replaces the weight at {ps!r} by its residual, and "
            f"that weight is quantized (its codes cannot hold a residual). Apply first, then "
            f"quantize the residual: jlora.quantize(jlora.apply(params, ..., init={init!r})).")
      made = _make_lora(ps, leaf, n_stack, key=key, dtype=dtype, init=_random_init(init),
                        rslora=rslora, used=used, **per_target)
      out.append(_variant(made, init, dora, _path_key(key, ps)))
      continue
    if decision is not _SKIP:
      rejects.append(decision)
    out.append(leaf)
  select.raise_for(rejects, matched, candidates)
  if in_axes is not None and not used["fan"]:
    raise ValueError(
        f"jlora.apply: in_axes={in_axes!r} is used only by layout='fan', and no target has "
        f"layout 'fan' (layout={layout!r}). Pass layout='fan' as well, or leave in_axes out.")
  return jax.tree_util.tree_unflatten(treedef, out)


# ----------------------------------------------------------------------------- arguments


def _check_init(init):
  if isinstance(init, str) and (init in INITS or _niter(init) is not None):
    return init
  raise ValueError(f"jlora.apply: init={init!r} is not one of {INITS} or 'pissa_niter_<n>' "
                   f"(n >= 0 power iterations, e.g. 'pissa_niter_4').")


def _niter(init) -> int | None:
  """`n` of `"pissa_niter_<n>"`, else None."""
  m = re.fullmatch(r"pissa_niter_(\d+)", init) if isinstance(init, str) else None
  return None if m is None else int(m[1])


def _random_init(init) -> str:
  return init if init in ("he_uniform", "gaussian") else "he_uniform"


def _check_rslora(rslora):
  return _check_flag(rslora, "rslora")


def _check_flag(v, name):
  if not isinstance(v, (bool, np.bool_)):
    raise TypeError(f"jlora.apply: {name}={v!r} must be True or False.")
  return bool(v)


# ----------------------------------------------------------------------------- variants


def _variant(leaf: LoRA, init: str, dora: bool, key) -> LoRA:
  """`leaf` with a residual init (PiSSA/OLoRA) and/or DoRA's magnitude."""
  if init in ("pissa", "olora") or _niter(init) is not None:
    w, a, b = residual_init(leaf.w, init, leaf.rank, leaf.scale, leaf.a_axes, leaf.stack, key)
    leaf = dataclasses.replace(leaf, w=w, a=a.astype(leaf.a.dtype), b=b.astype(leaf.b.dtype),
                               residual=init)
  if dora:
    leaf = dataclasses.replace(leaf, m=dora_magnitude(leaf).astype(leaf.a.dtype))
  return leaf


def dora_magnitude(leaf: LoRA) -> jax.Array:
  """DoRA's initial magnitude: the norm of `w + s·a@b` over the A axes (float32)."""
  return dora_norm(dataclasses.replace(leaf, m=None).effective(), leaf.a_axes, leaf.stack)


def _as_matrix(w, a_axes, stack):
  """`w` as `stack_shape + (fan_in, fan_out)` (A axes, then B axes, each in kernel order)."""
  nd = w.ndim - stack
  b_axes = [i for i in range(nd) if i not in a_axes]
  perm = list(range(stack)) + [stack + i for i in a_axes] + [stack + i for i in b_axes]
  wt = jnp.transpose(w, perm)
  s = wt.shape[:stack]
  fan_in = math.prod(w.shape[stack + i] for i in a_axes)
  return wt.reshape(s + (fan_in, -1)), perm


def residual_init(w, init, rank, scale, a_axes, stack, key=None):
  """`(w - scale·a@b, a, b)` of PiSSA (`"pissa"`, `"pissa_niter_<n>"`) or OLoRA (`"olora"`).

  As PEFT's `init_lora_weights` computes them (peft.tuners.lora.LoraLayer.pissa_init and
  olora_init), in float32, with PEFT's `(out, in)` weight the transpose of the `(fan_in,
  fan_out)` matrix here: PiSSA `a = U_r·sqrt(S_r/s)`, `b = sqrt(S_r/s)·V_rᵀ`; OLoRA `b = Q_rᵀ`,
  `a = R_rᵀ` for `wᵀ = Q·R`. The residual is cast back to `w`'s dtype; `a`, `b` are float32.
  """
  mat, perm = _as_matrix(w, a_axes, stack)
  mat = mat.astype(jnp.float32)
  r = rank
  if init == "olora":
    q, rr = jnp.linalg.qr(jnp.swapaxes(mat, -1, -2))  # (out, k), (k, in)
    b = jnp.swapaxes(q[..., :r], -1, -2)               # (r, out)
    a = jnp.swapaxes(rr[..., :r, :], -1, -2)           # (in, r)
  else:
    n = _niter(init)
    if n is None:
      u, sv, vh = jnp.linalg.svd(mat, full_matrices=False)
      u, sv, vh = u[..., :r], sv[..., :r], vh[..., :r, :]
    else:
      u, sv, vh = _svd_lowrank(mat, r, n, jax.random.key(0) if key is None else key)
    root = jnp.sqrt(sv / scale)
    a = u * root[..., None, :]
    b = root[..., :, None] * vh
  res = mat - scale * jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
  inv = np.argsort(perm)
  shaped = jnp.transpose(w, perm).shape
  w_res = jnp.transpose(res.reshape(shaped), inv).astype(w.dtype)
  k = w.shape[stack:]
  a_dims = tuple(k[i] for i in a_axes)
  b_dims = tuple(k[i] for i in range(len(k)) if i not in a_axes)
  s = w.shape[:stack]
  return w_res, a.reshape(s + a_dims + (r,)), b.reshape(s + (r,) + b_dims)


def _svd_lowrank(mat, r, niter, key):
  """A randomized rank-`r` SVD (Halko et al., as torch.svd_lowrank: oversampling to
  min(r + 10, ...) columns and `niter` subspace iterations), truncated to `r`."""
  m, n = mat.shape[-2:]
  q_cols = min(r + 10, m, n)
  hi = jax.lax.Precision.HIGHEST
  g = jax.random.normal(key, mat.shape[:-2] + (n, q_cols), jnp.float32)
  q, _ = jnp.linalg.qr(jnp.matmul(mat, g, precision=hi))
  mt = jnp.swapaxes(mat, -1, -2)
  for _ in range(niter):
    z, _ = jnp.linalg.qr(jnp.matmul(mt, q, precision=hi))
    q, _ = jnp.linalg.qr(jnp.matmul(mat, z, precision=hi))
  bmat = jnp.matmul(jnp.swapaxes(q, -1, -2), mat, precision=hi)
  u, sv, vh = jnp.linalg.svd(bmat, full_matrices=False)
  u = jnp.matmul(q, u, precision=hi)
  return u[..., :r], sv[..., :r], vh[..., :r, :]


def _adapter_dtype(dtype):
  if dtype is None:
    return np.dtype(jnp.float32)
  try:
    dt = jnp.dtype(dtype)
  except TypeError as e:
    raise TypeError(f"jlora.apply: dtype={dtype!r} is not a dtype. Pass a floating dtype such as "
                    f"jnp.float32 (the default) or jnp.bfloat16.") from e
  if not jnp.issubdtype(dt, jnp.floating):
    raise ValueError(f"jlora.apply: dtype={dt.name} is not a floating dtype; the adapters a and "
                     f"b are trained by gradient. Pass jnp.float32 (the default) or "
                     f"jnp.bfloat16.")
  return dt


def _describe(x) -> str:
  dt, shape = getattr(x, "dtype", None), getattr(x, "shape", None)
  if dt is not None and shape is not None:
    return f"{dt}{list(shape)}"
  return repr(x)


def _prng_key(key):
  if key is None:
    return jax.random.key(0)
  dt, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
  if dt is not None and shape is not None:
    if jax.dtypes.issubdtype(dt, jax.dtypes.prng_key) and tuple(shape) == ():
      return key
    if dt == np.uint32 and len(shape) == 1:  # a raw key of jax.random.PRNGKey(seed)
      return key
  raise TypeError(f"jlora.apply: key={_describe(key)} is not a PRNG key. Pass one key, "
                  f"jax.random.key(seed), or leave key=None (jax.random.key(0)).")


def _as_int(x):
  """`x` as a Python int if it is an integer (Python, NumPy, 0-d JAX), not a bool; else None."""
  if isinstance(x, (bool, np.bool_)):
    return None
  try:
    return operator.index(x)
  except TypeError:
    return None


def _check_trainable(trainable, ps, leaf):
  dt = getattr(leaf, "dtype", None)
  if dt is not None and hasattr(leaf, "shape"):
    if jnp.issubdtype(dt, jnp.inexact):
      return
    what = f"of dtype {dt} ({_kind(dt)} array)"
  elif isinstance(leaf, (float, complex)) and not isinstance(leaf, bool):
    return
  else:
    what = f"of type {type(leaf).__name__}"
  raise TypeError(
      f"jlora.apply: trainable={trainable!r} matched {ps!r} {what}: it has no gradient, so it "
      f"cannot be trained (only floating or complex leaves can). Narrow the pattern so it "
      f"leaves {ps!r} out.")


def _kind(dt) -> str:
  if jnp.issubdtype(dt, jnp.bool_):
    return "a boolean"
  if jnp.issubdtype(dt, jnp.integer):
    return "an integer"
  if jnp.issubdtype(dt, jnp.complexfloating):
    return "a complex"
  return f"a {dt}"


def _raise_no_match(what, pattern, hint, paths, example, who="jlora.apply"):
  near = P.nearest(P.prefixes(paths), hint)
  raise ValueError(
      f"{who}: {what}={pattern!r} matched no leaf. Nearest paths: {near}. Pass a "
      f"regular expression searched in {example}.")


class _Stack:
  """The number of leading stack axes of each leaf (`stacked=`)."""

  def __init__(self, stacked):
    self.stacked = stacked
    if isinstance(stacked, Mapping):
      self.sel, self.counts = None, P.PerTarget(stacked, "stacked")
    else:
      self.sel, self.counts = P.compile_pattern(stacked, "stacked"), None

  @property
  def hint(self) -> str | None:
    if self.counts is None:
      return self.sel.hint
    return self.counts.rules[0][0].pattern if self.counts.rules else None

  def matches(self, ps) -> bool:
    return self.counts.matches_any(ps) if self.counts is not None else self.sel(ps)

  def count(self, ps) -> int:
    if self.counts is None:
      return 1 if self.sel(ps) else 0
    n, _ = self.counts.get(ps, 0)
    k = _as_int(n)
    if k is None or k < 0:
      raise (TypeError if k is None else ValueError)(
          f"jlora.apply: stacked={self.stacked!r} gives {n!r} stack axes for {ps!r}; it must be "
          f"an int >= 0 (the number of leading stack axes), e.g. stacked={{'^layers/': 1}}.")
    return k


# ----------------------------------------------------------------------------- targets


class _KernelView:
  """Shape/dtype of a leaf with its stack axes dropped (for `qualifies`)."""

  def __init__(self, leaf, n_stack):
    shape = tuple(getattr(leaf, "shape", ()))
    self.shape = shape[n_stack:] if len(shape) >= n_stack else ()
    self.dtype = getattr(leaf, "dtype", None)


_ADAPT, _SKIP = "adapt", "skip"


class _Targets:
  """Decides, leaf by leaf, whether `targets` adapts it (`decide`), and raises for misses."""

  def __init__(self, targets, stacked, who="jlora.apply"):
    self.targets = targets
    self.stacked = stacked
    self.who = who
    self.needs = "LoRA needs" if who == "jlora.apply" else "quantization needs"
    self.is_preset = targets is None or (isinstance(targets, str) and targets == "all-linear")
    self.sel = None
    if not self.is_preset:
      if isinstance(targets, str) and targets in ("all_linear", "all"):
        raise ValueError(f"{self.who}: unknown preset targets={targets!r}; did you mean "
                         f"'all-linear'?")
      self.sel = P.compile_pattern(targets, "targets")

  def selects_node(self, ps, leaf) -> bool:
    """Whether the targets select a leaf that is already a `LoRA`/`Trainable`."""
    if self.targets is None:
      return P.is_qv(ps)
    return True if self.is_preset else self.sel(ps, leaf)

  def decide(self, ps, leaf, n_stack):
    """`_ADAPT`, `_SKIP`, or `(kind, path, description)` for a leaf the targets ask for in vain."""
    return self._preset(ps, leaf, n_stack) if self.is_preset else self._explicit(ps, leaf, n_stack)

  def _stack_reject(self, ps, shape, kshape, n_stack):
    return ("stack", ps, f"{ps!r} of shape {shape} with kernel shape {kshape} after {n_stack} "
                         f"stack {'axis' if n_stack == 1 else 'axes'}")

  def _preset(self, ps, leaf, n_stack):
    shape = getattr(leaf, "shape", None)
    if shape is None or not P.is_floating(leaf):
      return _SKIP
    if P.is_bias_like(ps) or P.is_norm(ps) or P.is_embedding(ps):
      return _SKIP
    if self.targets is None and not P.is_qv(ps):
      return _SKIP
    if self.targets == "all-linear" and P.is_head(ps):
      return _SKIP
    shape = tuple(shape)
    kshape = _KernelView(leaf, n_stack).shape
    if len(kshape) >= 2:
      return _ADAPT
    if n_stack > 0 and len(shape) >= 2 and P.is_kernel_named(ps):
      return self._stack_reject(ps, shape, kshape, n_stack)
    return _SKIP

  def _explicit(self, ps, leaf, n_stack):
    if not self.sel(ps, leaf):
      return _SKIP
    named = self.sel.names(ps, leaf)
    shape, dt = getattr(leaf, "shape", None), getattr(leaf, "dtype", None)
    if shape is None or dt is None:
      what = f"{ps!r}, a {type(leaf).__name__} (not an array)"
      return ("select", ps, what, None, n_stack) if named else _SKIP
    shape = tuple(shape)
    kshape = _KernelView(leaf, n_stack).shape
    if not P.is_floating(leaf):
      if named or len(kshape) >= 2:
        can = "carry LoRA" if self.who == "jlora.apply" else "be quantized"
        raise TypeError(
            f"{self.who}: {self._what()} matched {ps!r} of dtype {dt}; only floating kernels "
            f"can {can} (this is {_kind(dt)} array). Narrow the pattern so it excludes this "
            f"leaf.")
      return _SKIP
    bias, norm = P.is_bias_like(ps), P.is_norm(ps)
    if len(kshape) < 2:
      kernel_named = P.is_kernel_named(ps) and not bias and not norm
      if n_stack > 0 and len(shape) >= 2 and (named or kernel_named):
        return self._stack_reject(ps, shape, kshape, n_stack)
      if named:
        what = " (a bias)" if bias else " (a norm parameter)" if norm else ""
        return ("select", ps, f"{ps!r} of shape {shape}{what}", kshape, n_stack)
      return _SKIP
    if (bias or norm) and not named:
      return _SKIP
    return _ADAPT

  def _what(self) -> str:
    return "the targets callable" if self.sel is not None and self.sel.is_callable else (
        f"targets={self.targets!r}")

  def raise_for(self, rejects, matched, candidates):
    """Raises for the targets asked for in vain, or for no target at all."""
    for r in rejects:
      if r[0] == "stack":
        raise ValueError(
            f"{self.who}: stacked={self.stacked!r} leaves {r[2]}; {self.needs} a kernel with "
            f"ndim >= 2 after the stack axes. Match only leaves with leading stack axes (layers "
            f"stacked for lax.scan) in `stacked`, or leave {r[1]!r} out of `targets`.")
    selected = [r for r in rejects if r[0] == "select"]
    if matched == 0:
      hint = self.targets if isinstance(self.targets, str) else (
          self.sel.hint if self.sel is not None and self.sel.hint else "query")
      near = P.nearest(candidates, hint)
      why = ""
      if selected:
        why = (f": it selected {', '.join(r[2] for r in selected[:3])}"
               f"{' and more' if len(selected) > 3 else ''}, and {self.needs} ndim >= 2")
      raise ValueError(
          f"{self.who}: targets={self.targets!r} matched no kernel (a floating leaf with ndim "
          f">= 2 that is not a bias or norm){why}. Nearest candidate paths: {near}. Pass a "
          f"regular expression searched in these '/'-joined paths, e.g. "
          f"targets={near[0] if near else '...'!r}, or targets='all-linear'.")
    if selected:
      r = selected[0]
      if self.sel.is_callable:
        what = r[2] if r[3] is None else f"{r[1]!r} with kernel shape {r[3]}"
        raise ValueError(
            f"{self.who}: the targets callable selected {what}; {self.needs} ndim >= 2 (after "
            f"{r[4]} stack axes). Return False for it.")
      raise ValueError(
          f"{self.who}: targets={self.targets!r} selects {r[2]}; {self.needs} a kernel with "
          f"ndim >= 2. Narrow the pattern so it leaves {r[1]!r} out.")


# ----------------------------------------------------------------------------- one target


def _path_key(key, ps):
  return jax.random.fold_in(key, zlib.crc32(ps.encode()) & 0x7FFFFFFF)


def _from(pattern) -> str:
  return "" if pattern is None else f" (from the pattern {pattern!r})"


def _check_alpha(al, ps, pattern) -> float:
  real = isinstance(al, numbers.Real) or (
      hasattr(al, "dtype") and np.ndim(al) == 0
      and (jnp.issubdtype(al.dtype, jnp.floating) or jnp.issubdtype(al.dtype, jnp.integer)))
  if isinstance(al, (bool, np.bool_)) or not real:
    raise TypeError(f"jlora.apply: alpha for {ps!r}{_from(pattern)} must be a real number, got "
                    f"{al!r}. Pass e.g. alpha=16.0, or alpha=None for the rank (scale 1).")
  try:
    f = float(al)
  except (TypeError, jax.errors.ConcretizationTypeError) as e:
    raise TypeError(f"jlora.apply: alpha for {ps!r}{_from(pattern)} must be a concrete number "
                    f"(it is static metadata of the LoRA leaf), not a traced value. Pass a "
                    f"Python float.") from e
  if not math.isfinite(f):
    raise ValueError(
        f"jlora.apply: alpha {f!r} for {ps!r}{_from(pattern)} is not finite: the scale "
        f"alpha/rank would turn every adapted weight into nan. Pass a finite alpha (e.g. "
        f"alpha=16.0), or alpha=None for the rank (scale 1).")
  if f == 0:
    raise ValueError(
        f"jlora.apply: alpha {f!r} for {ps!r}{_from(pattern)} makes the scale 0: the adapter "
        f"never changes the model and gets no gradient, so it never trains. Pass a non-zero "
        f"alpha (e.g. alpha=16.0), or alpha=None for the rank (scale 1).")
  return f


def _in_axes(ia, ps):
  bad = TypeError(f"jlora.apply: in_axes={ia!r} for {ps!r} must be an int or a tuple of ints "
                  f"(the kernel's input axes), e.g. in_axes=(0,).")
  one = _as_int(ia)
  if one is not None:
    return (one,)
  if isinstance(ia, (str, bytes, bool, np.bool_)) or not hasattr(ia, "__iter__"):
    raise bad
  axes = tuple(_as_int(i) for i in ia)
  if any(i is None for i in axes):
    raise bad
  return axes


def _make_lora(ps, leaf, n_stack, *, rank, alpha, layout, in_axes, key, dtype, init, rslora,
               used):
  shape = tuple(leaf.shape)  # `_Targets` let through only kernels with ndim >= 2
  stack_shape, kshape = shape[:n_stack], shape[n_stack:]
  r_given, _ = rank.get(ps, required=True)
  r = _as_int(r_given)
  if r is None:
    raise TypeError(f"jlora.apply: rank for {ps!r} must be an int, got {r_given!r}.")
  lay, _ = layout.get(ps, required=True)
  if isinstance(lay, str) and lay == "keras":
    a_axes = tuple(range(len(kshape) - 1))
  elif isinstance(lay, str) and lay == "fan":
    used["fan"] = True
    ia, _ = in_axes.get(ps, (0,) if len(kshape) == 2 else None, required=True)
    if ia is None:
      raise ValueError(
          f"jlora.apply: layout='fan' needs the input axes of the {len(kshape)}-d kernel at "
          f"{ps!r} (shape {kshape}). Pass them, e.g. in_axes={{{re.escape(ps)!r}: (0,)}}, or use "
          f"layout='keras'.")
    ia = _in_axes(ia, ps)
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
  low = min(fan_in, fan_out)
  if r < 1:
    raise ValueError(f"jlora.apply: rank {r} for {ps!r} must be >= 1 (the number of columns of "
                     f"a); use e.g. rank=4, or leave {ps!r} out of `targets`.")
  if low < 2:
    other = (", or factor it another way: layout='fan' with in_axes naming its input axes"
             if len(kshape) > 2 else "")
    raise ValueError(
        f"jlora.apply: the kernel at {ps!r} of shape {kshape} cannot carry a LoRA adapter: "
        f"factored as {fan_in} x {fan_out} in layout {lay!r}, no rank r fits 1 <= r < {low}; "
        f"leave it out of `targets`{other}.")
  if r >= low:
    rest = ({rx.pattern: v for rx, v in rank.rules} if rank.is_mapping else {".*": r})
    fix = {re.escape(ps): low - 1, **rest}
    raise ValueError(
        f"jlora.apply: rank {r} for {ps!r} (kernel {kshape}, factored as {fan_in} x {fan_out} "
        f"in layout {lay!r}) must be >= 1 and < {low}; a rank that large is no longer "
        f"low-rank. Give this kernel a smaller rank, e.g. rank={fix!r}, or leave it out of "
        f"`targets`.")
  al, al_pattern = alpha.get(ps)
  al = float(r) if al is None else _check_alpha(al, ps, al_pattern)
  k = _path_key(key, ps)
  a_shape = stack_shape + a_dims + (r,)
  b_shape = stack_shape + (r,) + b_dims
  lim = math.sqrt(6.0 / fan_in) if init == "he_uniform" else 1.0 / r
  if isinstance(leaf, Quantized) and leaf.stack != n_stack:
    if leaf.double_quant:
      raise ValueError(
          f"jlora.apply: the weight at {ps!r} was quantized with double quantization over "
          f"{leaf.stack} stack axes, and jlora.apply gives it {n_stack}; the second-level "
          f"scales are per stack slice. Pass the same `stacked=` to jlora.quantize and "
          f"jlora.apply.")
    leaf = dataclasses.replace(leaf, stack=n_stack)
  a, b = make_adapters(leaf, k, a_shape, b_shape, dtype, init, lim, a_axes, n_stack)
  return LoRA(w=leaf, a=a, b=b, alpha=al, a_axes=a_axes, stack=n_stack, rslora=rslora)


# ----------------------------------------------------------------------------- placement


def _init_adapters(key, a_shape, b_shape, dtype, init, lim):
  if init == "he_uniform":
    a = jax.random.uniform(key, a_shape, dtype, -lim, lim)
  else:
    a = jax.random.normal(key, a_shape, dtype) * np.asarray(lim, dtype)
  return a, jnp.zeros(b_shape, dtype)


@functools.lru_cache(maxsize=256)
def _adapter_maker(a_sharding, b_sharding):
  # out_shardings (not with_sharding_constraint) works on Auto and Explicit meshes alike.
  return jax.jit(_init_adapters, static_argnums=(1, 2, 3, 4, 5),
                 out_shardings=(a_sharding, b_sharding))


def adapter_shardings_like(w: Any, a_axes: Sequence[int], stack: int
                           ) -> tuple[NamedSharding, NamedSharding] | None:
  """`(a_sharding, b_sharding)` for a concrete weight with a `NamedSharding`, else None."""
  if isinstance(w, jax.core.Tracer) or not isinstance(w, jax.Array):
    return None
  sh = getattr(w, "sharding", None)
  if not isinstance(sh, NamedSharding) or not isinstance(sh.mesh, Mesh):
    return None
  a, b = adapter_specs(sh.spec, a_axes, stack, w.ndim)
  return NamedSharding(sh.mesh, a), NamedSharding(sh.mesh, b)


def make_adapters(w, key, a_shape, b_shape, dtype, init, lim, a_axes, stack):
  """`(a, b)` for the weight `w`, laid out after it when it is a sharded array.

  `a` is `uniform(-lim, lim)` (`init="he_uniform"`) or `normal * lim`
  (`init="gaussian"`), `b` zeros; a sharded weight's adapters hold the same values,
  with the layout `jlora.sharding.adapter_specs` derives from the weight's. On one
  host they are made and then placed with `jax.device_put`; when the mesh spans
  several hosts they are made under `jax.jit` with those `out_shardings`, so each
  process creates only its own shards.
  """
  args = (key, tuple(a_shape), tuple(b_shape), np.dtype(dtype), init, float(lim))
  shs = adapter_shardings_like(w, a_axes, stack)
  if shs is None:
    return _init_adapters(*args)
  if all(s.is_fully_addressable for s in shs):  # one host: make, then lay out (no compile)
    a, b = _init_adapters(*args)
    return jax.device_put(a, shs[0]), jax.device_put(b, shs[1])
  return _adapter_maker(*shs)(*args)  # several hosts: each makes only its own shards


# ----------------------------------------------------------------------------- quantize


def quantize(
    params: Any,
    kind: str = "nf4",
    *,
    block_size: int = 64,
    targets: P.Pattern = "all-linear",
    stacked: P.Pattern | Mapping[str, int] = None,
    double_quant: bool = False,
) -> Any:
  """Returns `params` with the chosen frozen kernels stored block-quantized (QLoRA's base).

  Each target becomes a `jlora.Quantized` leaf: codes plus one scale per block of
  `block_size` consecutive elements of the kernel's last axis. A `jlora.LoRA`
  leaf keeps its adapters and gets a quantized `w`, so `quantize` and `apply`
  compose in either order. `jlora.lora(fn)` runs matmuls with a quantized weight
  dequantizing it inside the computation (no full-precision copy is kept, in the
  step or between steps; the backward pass dequantizes again rather than saving
  it); `jlora.merge` gives the dequantized weight plus the adapters' delta.

  Args:
    params: a parameter tree (plain, or made by `jlora.apply`).
    kind: `"nf4"` (QLoRA's 4-bit NormalFloat: the code book of the QLoRA paper,
      block-wise absmax scaling, bit-exact with bitsandbytes' NF4), `"int8"`
      (symmetric, scale = absmax/127 per block) or `"fp8"` (`float8_e4m3fn`
      codes, scale = absmax/448 per block).
    block_size: elements per block (default 64, as QLoRA); it must divide
      each target's last axis (and be even, for NF4's two codes per byte).
    targets: which kernels, as in `jlora.apply`: `"all-linear"` (default, every
      kernel except embedding tables and the LM head, as QLoRA quantizes every
      linear layer), `None` (the query and value projections), a regular
      expression of '/'-joined key paths, a list of them, or a callable
      `(path, leaf) -> bool`. Embeddings and norms stay as they are unless a
      pattern names them. A `jlora.LoRA` leaf qualifies by its weight.
    stacked: leading stack axes of plain leaves, as in `jlora.apply` (a LoRA
      leaf knows its own); they matter for the double quantization, which
      works per stack slice so `lax.scan` can slice it.
    double_quant: also quantize the scales (8-bit, blocks of 256, after
      subtracting their mean), as QLoRA's double quantization: 8.1 bits per
      block of 64 instead of 32.

  Returns:
    The same tree with `jlora.Quantized` weights.

  Raises:
    ValueError: an unknown kind, a bad block size, no target, a block size
      that does not divide a target's last axis (naming the path and the fix),
      a leaf that is already quantized.
    TypeError: a target that is `jlora.Trainable` (it is trained, so it cannot
      be frozen into codes).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> k = jax.random.split(jax.random.key(0), 2)
    >>> params = {"q_proj": {"kernel": jax.random.normal(k[0], (64, 128))},
    ...           "mlp": {"kernel": jax.random.normal(k[1], (64, 128))}}
    >>> t = jlora.apply(jlora.quantize(params, "nf4"), rank=4)
    >>> type(t["q_proj"]["kernel"].w).__name__, type(t["mlp"]["kernel"]).__name__
    ('Quantized', 'Quantized')
    >>> x = jnp.ones((2, 64))
    >>> y = jlora.lora(lambda p, x: x @ p["q_proj"]["kernel"])(t, x)
    >>> bool(jnp.allclose(y, x @ jlora.merge(t)["q_proj"]["kernel"], atol=1e-4))
    True
  """
  if not isinstance(kind, str) or kind not in QKINDS:
    raise ValueError(f"jlora.quantize: kind={kind!r} is not one of {QKINDS}.")
  bs = _as_int(block_size)
  if bs is None or bs < 1 or (kind == "nf4" and bs % 2):
    raise ValueError(f"jlora.quantize: block_size={block_size!r} must be a positive "
                     f"{'even ' if kind == 'nf4' else ''}int, e.g. 64.")
  if not isinstance(double_quant, (bool, np.bool_)):
    raise TypeError(f"jlora.quantize: double_quant={double_quant!r} must be True or False.")
  select = _Targets(targets, stacked, who="jlora.quantize")
  stack = _Stack(stacked)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_node)
  leaves = [(P.path_str(path), leaf) for path, leaf in flat]
  if stacked is not None and not any(stack.matches(ps) for ps, _ in leaves):
    _raise_no_match("stacked", stacked, stack.hint, [ps for ps, _ in leaves],
                    "the '/'-joined key paths of the leaves with leading stack axes (layers "
                    "stacked for lax.scan), e.g. stacked=r'^layers/'", who="jlora.quantize")
  out, matched, candidates, rejects = [], 0, [], []
  for ps, leaf in leaves:
    if isinstance(leaf, Quantized) or (isinstance(leaf, LoRA) and isinstance(leaf.w, Quantized)):
      if not select.is_preset and select.sel(ps, leaf):
        raise ValueError(f"jlora.quantize: the weight at {ps!r} is already quantized "
                         f"({leaf.w if isinstance(leaf, LoRA) else leaf!r}). Quantize the "
                         f"float tree once; to re-quantize, jlora.quantize(jlora.merge(tree)).")
      out.append(leaf)
      continue
    if isinstance(leaf, Trainable):
      if not select.is_preset and select.sel(ps, leaf):
        raise TypeError(f"jlora.quantize: targets={targets!r} matched {ps!r}, a "
                        f"jlora.Trainable leaf: it is trained in full, so it cannot be frozen "
                        f"into codes. Narrow the pattern so it leaves {ps!r} out.")
      out.append(leaf)
      continue
    w, n_stack = (leaf.w, leaf.stack) if isinstance(leaf, LoRA) else (leaf, stack.count(ps))
    if P.qualifies(ps, _KernelView(w, n_stack)) and not P.is_embedding(ps):
      candidates.append(ps)
    decision = select.decide(ps, w, n_stack)
    if decision is _ADAPT:
      matched += 1
      q = _quantize_leaf(ps, w, kind, bs, bool(double_quant), n_stack)
      out.append(dataclasses.replace(leaf, w=q) if isinstance(leaf, LoRA) else q)
      continue
    if decision is not _SKIP:
      rejects.append(decision)
    out.append(leaf)
  select.raise_for(rejects, matched, candidates)
  return jax.tree_util.tree_unflatten(treedef, out)


def _quantize_leaf(ps, w, kind, bs, double_quant, n_stack) -> Quantized:
  n = int(w.shape[-1])
  if n % bs:
    divisors = [d for d in (256, 128, 64, 32, 16, 8, 4, 2) if n % d == 0]
    fix = f"block_size={divisors[0]}" if divisors else "leave it out of `targets`"
    raise ValueError(
        f"jlora.quantize: block_size={bs} does not divide the last axis ({n}) of the kernel at "
        f"{ps!r} of shape {tuple(w.shape)}; blocks run along the last axis. Pass {fix}, or "
        f"leave {ps!r} out of `targets`.")
  return _quantize_jit(w, kind, bs, double_quant, n_stack)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _quantize_jit(w, kind, bs, double_quant, n_stack):
  return quantize_array(w, kind, bs, double_quant, n_stack)
