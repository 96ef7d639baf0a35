"""`jlora.lora(fn)`: run any JAX function with LoRA leaves kept factored.

How it works. `lora(fn)` traces `fn` to a jaxpr with every `LoRA` leaf standing in
as its (effective) weight, then evaluates that jaxpr with a small interpreter in
which a LoRA weight is a value of its own (`_LV`: `w`, `a`, `b`, scale, layout).
Each equation without a LoRA operand is bound unchanged. Equations with one are
rewritten by rules:

* `dot_general` (what Flax Dense/DenseGeneral/Einsum, `jnp.einsum` and Keras
  EinsumDense lower to), with any contracting and batch dimensions:
  `x·W + s·((x·A)·B)`, in the leaf's own layout (per-head `a` included), or
  `x·W + s·((x·B)·A)` when `x` contracts the axes of `B` (`x @ w.T`, a tied LM
  head's `nn.Embed.attend`, the backward pass of a `jax.grad` inside `fn`):
  whichever rank-wide intermediate is smaller, so none has more than
  `r·max(|x|, |W|, |y|)` elements (a kernel with two stack axes, one
  contracted and one kept, has no such order and materializes). The adapters
  are cast to the weight's compute dtype (a bf16 model with float32
  adapters computes the adapter branch in bf16, as it computes `x·W`). On GPUs,
  a plain 2-D kernel with `N >= 2·K` (a feed-forward up-projection) runs as one
  matmul `[x, s·x·A]·[W; B]`, because XLA there writes the adapter's output and
  adds it in separate kernels; the backward pass is the same either way (no
  full weight gradient). See `_fold_pays`.
* `gather` of whole rows (`nn.Embed`, `jnp.take`): `w[i] + s·(a[i]·B)`.
* `conv_general_dilated` (`nn.Conv`, `lax.conv_transpose`) when `a` or `b`
  spans one feature axis alone: `conv(x, W) + s·(conv(x, A)·B)` when `b` spans
  the output features (the Keras layout of a conv kernel), `s·conv(x·A, B)`
  when `a` spans the input features (fan-in), and the same with `a` and `b`
  swapped (the kernel in a backward pass); other layouts and grouped
  convolutions materialize.
* weight-only ops keep the factoring: `convert_element_type`, `transpose`,
  axis-regrouping `reshape`/`squeeze`, `sharding_constraint`, `copy`, `rev`,
  and `slice`/`dynamic_slice` along any axes (a fused QKV kernel cut in three).
* a DoRA weight's matmul output, rescaled per output feature, is named `"jlora_dora"`
  (the magnitude's gradient reads it, so a remat policy that keeps it, as a model that saves
  its projections' outputs would, spares the backward pass the matmul);
* the rank-wide adapter activation `x·A` (or `x·B`, and their conv forms) is named
  `"jlora_xa"` (`jax.ad_checkpoint.checkpoint_name`), so a remat policy such as
  `jax.checkpoint_policies.save_only_these_names("jlora_xa", ...)` can keep it
  (r values per token) instead of recomputing it, and its input, in the
  backward pass.
* control flow is rebuilt around the interpreter with JAX's public API:
  nested `jit` is inlined, `lax.scan` (stacked leaves are sliced per layer and
  stay factored), `jax.checkpoint`/`nn.remat` (policy kept), `lax.cond`/`switch`,
  `lax.while_loop`.

Anything else that touches a LoRA weight (an elementwise op on the kernel, a
custom_jvp/custom_vjp function taking the kernel as input, a weight returned as
output) materializes `w + s·a@b` for that use and warns once per path and
operation (`jlora.MaterializeWarning`); `strict=True` raises instead. Custom
derivative functions keep their own rules this way.

Why an in-house interpreter: it is ~400 lines on `jax.make_jaxpr` and
`jax.extend.core`, the public jaxpr API, and every rule is tested through scan,
remat, cond, while, custom_jvp/vjp and nested jit. The maintained alternative,
quax, was measured to materialize kernels under `nn.remat` (no rule for the
checkpoint primitive) and brings equinox, jaxtyping and plum-dispatch; qax and
lorax are unmaintained and break on current JAX.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Any, Callable

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.ad_checkpoint import checkpoint_name

from jlora._src import compat, paths as P
from jlora._src.leaf import LoRA, LoRAStack, Trainable, dora_scale, is_node, lora_delta
from jlora._src.qarray import Quantized


class MaterializeWarning(UserWarning):
  """A LoRA weight was materialized (`w + s·a@b`) for an operation jlora cannot factor."""


class _Value:
  """What the interpreter's own values share (each is a frozen dataclass and a pytree)."""

  def replace(self, **kw):
    return dataclasses.replace(self, **kw)

  @property
  def b_axes(self):  # (of a weight with adapters: `_LV`, `_SV`)
    n = self.w.ndim - self.stack
    return tuple(i for i in range(n) if i not in self.a_axes)


@dataclasses.dataclass(frozen=True)
class _LV(_Value):
  """A LoRA weight inside the interpreter (a pytree, so it crosses control flow)."""

  w: Any
  a: Any
  b: Any
  scale: float = dataclasses.field(metadata=dict(static=True))
  a_axes: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  stack: int = dataclasses.field(metadata=dict(static=True))
  path: str = dataclasses.field(metadata=dict(static=True))
  v: Any = None  # DoRA: m / norm (float32, constant for the gradient), stack + B axes; else None


jax.tree_util.register_dataclass(_LV)


@dataclasses.dataclass(frozen=True)
class _QV(_Value):
  """A quantized weight without adapters inside the interpreter."""

  q: Quantized
  path: str = dataclasses.field(metadata=dict(static=True))

  shape = property(lambda self: self.q.shape)
  ndim = property(lambda self: self.q.ndim)
  dtype = property(lambda self: self.q.dtype)
  size = property(lambda self: self.q.size)


jax.tree_util.register_dataclass(_QV)


@dataclasses.dataclass(frozen=True)
class _SV(_Value):
  """A stack of adapters (`jlora.LoRAStack`) inside the interpreter."""

  w: Any
  a: Any
  b: Any
  scales: Any  # (n,) float32: each adapter's alpha/rank
  ids: Any  # (examples,) int32, or None before jlora.select
  a_axes: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  stack: int = dataclasses.field(metadata=dict(static=True))
  path: str = dataclasses.field(metadata=dict(static=True))


jax.tree_util.register_dataclass(_SV)

# The rules that take a stack of adapters (any other use of one raises).
_S_RULES = {"dot_general", "convert_element_type", "copy", "copy_p", "sharding_constraint",
            "pjit", "jit", "closed_call", "core_call", "remat2", "checkpoint", "remat", "cond",
            "scan", "while"}


def _is_q(x) -> bool:
  return isinstance(x, Quantized)


def _weight(w) -> jax.Array:
  """A weight as an array: a quantized one dequantized (to its dtype)."""
  return w.dequantize() if _is_q(w) else w


class _Ctx:
  def __init__(self, strict: bool, fold: str, values: list, stack_kernel: str = "gather"):
    self.strict = strict
    self.fold = fold
    self.stack_kernel = stack_kernel
    self.warned: set[tuple[str, str]] = set()
    self._values = values  # the function's array arguments (each LoRA leaf's w among them)
    self._platform = None

  @property
  def platform(self) -> str:
    """Where the function runs (read once, when a rule first asks): see `platform_of`."""
    if self._platform is None:
      self._platform = platform_of(self._values)
    return self._platform

  def materialize(self, lv: _LV | _QV | _SV, op: str) -> jax.Array:
    if isinstance(lv, _QV):
      return self.dequantize(lv, op)
    if isinstance(lv, _SV):
      raise ValueError(
          f"jlora.lora: the stack of adapters at {lv.path!r} reaches `{op}`, which cannot run "
          f"per example (a stack has one weight per adapter). Use it through a matmul "
          f"(dot_general/einsum) on activations whose leading axis is the batch, or run one "
          f"adapter alone: jlora.unstack(tree, i).")
    if self.strict:
      raise ValueError(
          f"jlora.lora(strict=True): the LoRA weight at {lv.path!r} reaches `{op}`, which "
          f"cannot run factored. Use it through a matmul (dot_general/einsum) or an embedding "
          f"lookup, or pass strict=False to materialize w + s*a@b there (with a warning).")
    if (lv.path, op) not in self.warned:
      self.warned.add((lv.path, op))
      warnings.warn(
          f"jlora.lora: materializing the LoRA weight at {lv.path!r} (w + s*a@b, full size "
          f"{tuple(lv.w.shape)}) for `{op}`, which cannot run factored; its gradient there is "
          f"full-size. Pass strict=True to make this an error.", MaterializeWarning,
          stacklevel=4)
    return _dense(lv)

  def dequantize(self, qv: _QV, op: str) -> jax.Array:
    if self.strict:
      raise ValueError(
          f"jlora.lora(strict=True): the quantized weight at {qv.path!r} reaches `{op}`, which "
          f"cannot run on its codes. Use it through a matmul (dot_general/einsum) or an "
          f"embedding lookup, or pass strict=False to dequantize it there (with a warning).")
    if (qv.path, op) not in self.warned:
      self.warned.add((qv.path, op))
      warnings.warn(
          f"jlora.lora: dequantizing the {qv.q.kind} weight at {qv.path!r} (full size "
          f"{tuple(qv.shape)}, {qv.dtype}) for `{op}`, which cannot run on its codes; that "
          f"copy is live while it is used. Pass strict=True to make this an error.",
          MaterializeWarning, stacklevel=4)
    return qv.q.dequantize()


def _dense(lv: _LV) -> jax.Array:
  w = _weight(lv.w)
  d = lora_delta(lv.a, lv.b, lv.a_axes, lv.stack, lv.scale)
  ct = jnp.promote_types(w.dtype, d.dtype)
  dense = w.astype(ct) + d.astype(ct)
  if lv.v is not None:  # DoRA: the columns rescaled (v broadcast over the A axes)
    dense = dense * jnp.expand_dims(lv.v, tuple(lv.stack + i for i in lv.a_axes)).astype(ct)
  return dense.astype(w.dtype)


def _is_lv(x) -> bool:
  return isinstance(x, _LV)


def _is_qv(x) -> bool:
  return isinstance(x, _QV)


def _special(x) -> bool:
  """A value the rules handle: a LoRA weight, a stack of them or a quantized weight."""
  return isinstance(x, (_LV, _QV, _SV))


def _has_q(x) -> bool:
  """A quantized weight, alone or under an adapter."""
  return isinstance(x, _QV) or (isinstance(x, (_LV, _SV)) and _is_q(x.w))


# The name of every adapter activation `x·a` (rank-wide), for remat policies.
XA_NAME = "jlora_xa"

# When `x·W + (s·x·A)·B` runs as one matmul `[x, s·x·A]·[W; B]`: see `lora`'s `fold`.
FOLDS = ("auto", "never", "always", "bytes")
# How a stack of adapters (`jlora.stack`) runs: see `lora`'s `stack_kernel`.
STACK_KERNELS = ("gather", "dense")


def platform_of(values) -> str:
  """The platform (`"cpu"`, `"gpu"`, `"tpu"`, ...) a computation on `values` runs on.

  That of the devices holding the first concrete `jax.Array` among `values`. Under a
  trace (`jax.jit`, `jax.grad`: the values are tracers, which carry no devices), the
  platform of the mesh set with `jax.set_mesh`, else of JAX's default device
  (`jax.default_device`), else of the default backend (`jax.devices()[0]`), which is
  where `jax.jit` runs a function whose arguments are not committed elsewhere.
  """
  for v in values:
    if isinstance(v, jax.Array) and not isinstance(v, jax.core.Tracer):
      return next(iter(v.sharding.device_set)).platform
  platform = compat.mesh_platform()
  if platform is not None:
    return platform
  dev = jax.config.jax_default_device
  if dev is not None:
    return dev if isinstance(dev, str) else dev.platform
  return jax.devices()[0].platform


# --------------------------------------------------------------------------- entry point


def lora(fn: Callable[..., Any], *, strict: bool = False, fold: str = "auto",
         stack_kernel: str = "gather") -> Callable[..., Any]:
  """Returns `fn` with `jlora.LoRA` leaves in its arguments run factored.

  Matmuls with a LoRA weight compute `x·w + s·((x·a)·b)` (or `s·((x·b)·a)` when
  `x` contracts `b`'s axes, as `x @ w.T` does), so the backward pass never forms
  a full weight gradient; `jlora.Trainable` leaves are passed as
  their values. Works through `jax.jit`, `lax.scan` (leaves made with
  `stacked=` are sliced per layer), `jax.checkpoint`/`nn.remat`,
  `lax.cond`/`switch` and `lax.while_loop`; see the module docstring for the
  full rule set. Call it under `jax.jit` (or `jlora.train_step`): each call
  traces `fn`. Each adapter activation `x·a` is named `"jlora_xa"` for remat
  policies (`jax.checkpoint_policies.save_only_these_names("jlora_xa", ...)`).

  Args:
    fn: any function of pytrees of arrays, e.g. a Flax `model.apply`.
    strict: raise instead of warning when a LoRA weight must be materialized.
    fold: when a plain 2-D kernel's matmul `x·W + (s·x·A)·B` runs as one
      matmul `[x, s·x·A]·[W; B]` (same values, same backward pass; it saves
      writing and re-reading the adapter's output where XLA does not fuse the
      add into the matmul). `"auto"` (default): on GPUs, when `N >= 2·K` (a
      feed-forward up-projection); `"bytes"`: on GPUs, when the elements moved
      say so (`4·M·N > 2·M·K + 2·K·N`); `"always"`: wherever the layout allows
      (any platform); `"never"`. The platform is that of the arrays' devices
      when `fn` is called on concrete arrays; under `jax.jit` (tracers carry no
      devices) that of the mesh set with `jax.set_mesh`, else of
      `jax.default_device`, else of the default backend.

    stack_kernel: how a stack of adapters (`jlora.stack`) runs its adapter
      branch, with the same numbers either way. `"gather"` (default): each
      example's `a` and `b` gathered, both products batched over the examples
      (one adapter's FLOPs); measured at a single adapter's speed on an H200
      (benchmarks/results/variants_h200.jsonl) and 1.5x to 2.4x faster than
      `"dense"` on two CPU cores (benchmarks/results/multi_cpu.json).
      `"dense"`: every adapter's `x·a` in one matmul, masked to each example's
      own, then one matmul with all the `b`s (all adapters' FLOPs, no
      gathers), for backends where gathers are dear.

  Returns:
    A function with `fn`'s signature.

  Raises:
    ValueError: an unknown `fold` or `stack_kernel` (at once), or, with `strict=True`, a LoRA
      weight that would be materialized (when the function runs).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> t = jlora.apply({"q_proj": jnp.ones((4, 6))}, rank=2)
    >>> f = lambda p, x: x @ p["q_proj"]
    >>> x = jnp.ones((3, 4))
    >>> bool(jnp.allclose(jlora.lora(f)(t, x), f(jlora.merge(t), x)))
    True
  """

  if not isinstance(fold, str) or fold not in FOLDS:
    raise ValueError(f"jlora.lora: fold={fold!r} is not one of {FOLDS}.")
  if not isinstance(stack_kernel, str) or stack_kernel not in STACK_KERNELS:
    raise ValueError(f"jlora.lora: stack_kernel={stack_kernel!r} is not one of "
                     f"{STACK_KERNELS}.")

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    leaves, treedef = jax.tree_util.tree_flatten_with_path((args, kwargs), is_leaf=is_node)
    dyn_pos, dyn_vals, trace_vals, statics, where = [], [], [], [], []
    for i, (path, x) in enumerate(leaves):
      if isinstance(x, Quantized):
        dyn_pos.append(i), dyn_vals.append(_QV(x, _arg_path(path)))
        trace_vals.append(jax.ShapeDtypeStruct(x.shape, x.dtype)), where.append(x.codes)
      elif isinstance(x, LoRAStack):
        if x.w is None or x.a is None or x.b is None:
          raise ValueError(
              f"jlora.lora: the LoRAStack leaf at {_arg_path(path)!r} has a missing field: it "
              f"is one half of jlora.split. Pass jlora.combine(trainable, frozen).")
        sv = _SV(x.w, x.a, x.b, x.scales(), x.ids, x.a_axes, x.stack, _arg_path(path))
        w = jax.ShapeDtypeStruct(x.w.shape, x.w.dtype) if _is_q(x.w) else x.w
        dyn_pos.append(i), dyn_vals.append(sv), trace_vals.append(w)
        where.append(x.w.codes if _is_q(x.w) else x.w)
      elif isinstance(x, LoRA):
        if x.w is None or x.a is None or x.b is None:
          raise ValueError(
              f"jlora.lora: the LoRA leaf at {_arg_path(path)!r} has a missing field (w, a or "
              f"b is None): it is one half of jlora.split. Pass jlora.combine(trainable, "
              f"frozen).")
        lv = _lv_of(x, _arg_path(path))
        w = jax.ShapeDtypeStruct(x.w.shape, x.w.dtype) if _is_q(x.w) else x.w
        dyn_pos.append(i), dyn_vals.append(lv), trace_vals.append(w)
        where.append(x.w.codes if _is_q(x.w) else x.w)
      elif isinstance(x, Trainable):
        dyn_pos.append(i), dyn_vals.append(x.value), trace_vals.append(x.value)
        where.append(x.value)
      elif isinstance(x, (jax.Array, np.ndarray, np.generic)):
        dyn_pos.append(i), dyn_vals.append(x), trace_vals.append(x), where.append(x)
    statics = [x for _, x in leaves]
    ctx = _Ctx(strict, fold, where, stack_kernel)
    if not any(_special(v) for v in dyn_vals):
      warnings.warn("jlora.lora: no jlora.LoRA or jlora.Quantized leaf in the arguments; the "
                    "function runs unchanged.", UserWarning, stacklevel=2)

    def flat_fn(*dyn):
      vals = list(statics)
      for p, v in zip(dyn_pos, dyn):
        vals[p] = v
      a, kw = jax.tree_util.tree_unflatten(treedef, vals)
      return fn(*a, **kw)

    closed, out_shape = jax.make_jaxpr(flat_fn, return_shape=True)(*trace_vals)
    outs = _eval(ctx, closed.jaxpr, closed.consts, dyn_vals)
    outs = [ctx.materialize(o, "output of the function") if _special(o) else o for o in outs]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

  return wrapped


def _lv_of(x: LoRA, path: str) -> _LV:
  """The interpreter's value of a LoRA leaf; for DoRA with `v = m / norm`, the norm computed
  factored (`dora_norm_factored`)."""
  v = None
  if x.m is not None:
    w = x.w.dequantize() if _is_q(x.w) else x.w  # (a quantized base: dequantized for the norm)
    v = dora_scale(x.m, dora_norm_factored(w, x.a, x.b, x.a_axes, x.stack, x.scale))
  return _LV(x.w, x.a, x.b, x.scale, x.a_axes, x.stack, path, v)


def dora_norm_factored(w, a, b, a_axes, stack, scale) -> jax.Array:
  """The norm of `w + s·a@b` over the A axes, per stack and B-axes element, without forming
  the sum: `‖w_j‖² + 2s·(aᵀw)_j·b_j + s²·b_jᵀ(aᵀa)b_j` (float32; `aᵀw` is rank x B, `aᵀa`
  rank x rank). The adapters enter with `stop_gradient`: DoRA's norm is a constant for the
  gradient."""
  a = lax.stop_gradient(a).astype(jnp.float32)
  b = lax.stop_gradient(b).astype(jnp.float32)
  nd = w.ndim - stack
  b_axes = [i for i in range(nd) if i not in a_axes]
  st = _LETTERS[:stack]
  k = _LETTERS[stack:stack + nd]
  ka = "".join(k[i] for i in a_axes)
  kb = "".join(k[i] for i in b_axes)
  hi = lax.Precision.HIGHEST
  f32 = jnp.float32
  ww = jnp.sum(jnp.square(w.astype(f32)), axis=tuple(stack + i for i in a_axes))
  aw = jnp.einsum(f"{st}{ka}r,{st}{k}->{st}r{kb}", a.astype(w.dtype), w, precision=hi,
                  preferred_element_type=f32)
  g = jnp.einsum(f"{st}{ka}r,{st}{ka}R->{st}rR", a, a, precision=hi)  # 'R' is not a letter
  gb = jnp.einsum(f"{st}rR,{st}R{kb}->{st}r{kb}", g, b, precision=hi)  # of _LETTERS
  sq = ww + 2.0 * scale * jnp.sum(aw * b, axis=stack) + scale * scale * jnp.sum(gb * b, axis=stack)
  return jnp.sqrt(jnp.maximum(sq, 0.0))


def _arg_path(path) -> str:
  """The path inside the argument: `args[i]` + its own path, or the keyword's name + path."""
  if path and P.key_str(path[0]) == "0":  # positional: drop the args-tuple index
    return P.path_str(path[2:]) if len(path) > 2 else P.path_str(path[1:])
  return P.path_str(path[1:])


# --------------------------------------------------------------------------- the interpreter


def _eval(ctx: _Ctx, jaxpr, consts, args) -> list:
  env: dict = {}

  def read(v):
    return v.val if isinstance(v, jex.core.Literal) else env[v]

  def write(v, x):  # a dropped output (DropVar) is written and never read
    env[v] = x

  for v, x in zip(jaxpr.constvars, consts):
    write(v, x)
  for v, x in zip(jaxpr.invars, args):
    write(v, x)
  for eqn in jaxpr.eqns:
    invals = [read(v) for v in eqn.invars]
    if any(_special(x) for x in invals):
      rule = _RULES.get(eqn.primitive.name)
      if rule is not None and eqn.primitive.name not in _Q_RULES and any(map(_has_q, invals)):
        rule = None  # a rule for LoRA weights that has no form for quantized ones
      if rule is not None and eqn.primitive.name not in _S_RULES and any(
          isinstance(x, _SV) for x in invals):
        rule = None
      outvals = rule(ctx, eqn, invals) if rule is not None else None
      if outvals is None:  # no factored form: materialize the LoRA operands for this use
        invals = [ctx.materialize(x, eqn.primitive.name) if _special(x) else x for x in invals]
        outvals = _bind(eqn, invals)
    else:
      outvals = _bind(eqn, invals)
    if not eqn.primitive.multiple_results:
      outvals = [outvals]
    for v, x in zip(eqn.outvars, outvals):
      write(v, x)
  return [read(v) for v in jaxpr.outvars]


def _bind(eqn, invals):
  bp = eqn.primitive.get_bind_params(eqn.params)
  subfuns = ()
  if isinstance(bp, tuple) and len(bp) == 2 and isinstance(bp[1], dict):  # older JAX
    subfuns, bp = bp
  ctx = getattr(getattr(eqn, "ctx", None), "manager", None)
  if ctx is None:
    return eqn.primitive.bind(*subfuns, *invals, **bp)
  with ctx:
    return eqn.primitive.bind(*subfuns, *invals, **bp)


def _materialize_all(ctx, vals, op):
  return [ctx.materialize(v, op) if _special(v) else v for v in vals]


# --------------------------------------------------------------------------- rules

_RULES: dict[str, Callable] = {}
_Q_RULES: set[str] = set()  # the rules that also take quantized weights


def _rule(*names, quantized=False):
  def deco(f):
    for n in names:
      _RULES[n] = f
      if quantized:
        _Q_RULES.add(n)
    return f
  return deco


_LETTERS = "abcdefghijklmnopqstuvwxyzABCDEFGHIJKLMNOPQSTUVWXYZ"  # 'r' is the rank


def _broadcast_to_axes(v, positions, ndim):
  """`v` with its axes moved to `positions` of an `ndim`-axis array, ones elsewhere."""
  order = sorted(range(len(positions)), key=lambda k: positions[k])
  vt = jnp.transpose(v, order)
  shape = [1] * ndim
  for k in order:
    shape[positions[k]] = v.shape[k]
  return vt.reshape(shape)


# The name of a DoRA weight's rescaled matmul output (for remat policies).
DORA_NAME = "jlora_dora"


@jax.custom_jvp
def _dora_out(y, v):
  """`y * v` (a DoRA matmul's output rescaled per output feature), named `"jlora_dora"`.

  Its derivative for `v` reads the rescaled output (`y·v / v`) rather than `y`: a remat
  policy that keeps `"jlora_dora"` (the value the model keeps when it saves the matmul's
  output) then spares the backward pass the matmul again. Where `v` is 0 (a magnitude of 0),
  that derivative is taken as 0.
  """
  return checkpoint_name(y * v, DORA_NAME)


@_dora_out.defjvp
def _dora_out_jvp(primals, tangents):
  y, v = primals
  dy, dv = tangents
  out = checkpoint_name(y * v, DORA_NAME)  # (bound here: the policy sees this name's output)
  safe = jnp.where(v == 0, jnp.ones_like(v), v)
  return out, dy * v + out * jnp.where(v == 0, jnp.zeros_like(dv), dv / safe)


def _dora_dot_general(ctx, eqn, lhs, rhs):
  """A DoRA weight `W·v` (v over the stack and B axes): the plain factored matmul of `W`, with
  `v` multiplying the output where it keeps all of v's axes (`x·W`), else `x` where it holds
  them all (`x·Wᵀ`: the B axes contracted); None (materialize) when they are split."""
  lv_is_lhs = _is_lv(lhs)
  lv, x = (lhs, rhs) if lv_is_lhs else (rhs, lhs)
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  wc, xc = (lc, rc) if lv_is_lhs else (rc, lc)
  wb, xb = (lb, rb) if lv_is_lhs else (rb, lb)
  v_axes = list(range(lv.stack)) + [lv.stack + i for i in lv.b_axes]
  w_free = [i for i in range(lv.w.ndim) if i not in wc and i not in wb]
  n_x_free = x.ndim - len(xc) - len(xb)
  plain = lv.replace(v=None)
  if not any(i in wc for i in v_axes):  # all of v's axes reach the output
    first = 0 if lv_is_lhs else n_x_free
    pos = [wb.index(i) if i in wb else len(wb) + first + w_free.index(i) for i in v_axes]
    y = _dot_general(ctx, eqn, [plain, x] if lv_is_lhs else [x, plain])
    return _dora_out(y, _broadcast_to_axes(lv.v, pos, y.ndim).astype(y.dtype))
  if all(i in wc or i in wb for i in v_axes):  # all of them are x's axes
    pos = [xc[list(wc).index(i)] if i in wc else xb[list(wb).index(i)] for i in v_axes]
    xs = x * _broadcast_to_axes(lv.v, pos, x.ndim).astype(x.dtype)
    return _dot_general(ctx, eqn, [plain, xs] if lv_is_lhs else [xs, plain])
  return None


@_rule("dot_general", quantized=True)
def _dot_general(ctx, eqn, invals):
  lhs, rhs = invals
  if _special(lhs) and _special(rhs):
    rhs = ctx.materialize(rhs, "dot_general of two LoRA or quantized weights")
  if isinstance(lhs, _SV) or isinstance(rhs, _SV):
    sv_is_lhs = isinstance(lhs, _SV)
    return _stack_dot(ctx, eqn, *((lhs, rhs) if sv_is_lhs else (rhs, lhs)), sv_is_lhs)
  if _is_qv(lhs) or _is_qv(rhs):
    q_is_lhs = _is_qv(lhs)
    qv, x = (lhs, rhs) if q_is_lhs else (rhs, lhs)
    return _qdot(eqn, qv.q, x, q_is_lhs)
  if _is_lv(lhs) and lhs.v is not None or _is_lv(rhs) and rhs.v is not None:
    return _dora_dot_general(ctx, eqn, lhs, rhs)
  lv_is_lhs = _is_lv(lhs)
  lv, x = (lhs, rhs) if lv_is_lhs else (rhs, lhs)
  params = dict(eqn.params)
  (lc, rc), (lb, rb) = params["dimension_numbers"]
  wc, xc = (lc, rc) if lv_is_lhs else (rc, lc)
  wb, xb = (lb, rb) if lv_is_lhs else (rb, lb)

  letters = iter(_LETTERS)
  x_lab = [next(letters) for _ in range(x.ndim)]
  w_lab = [None] * lv.w.ndim
  for i, j in zip(wc, xc):
    w_lab[i] = x_lab[j]
  for i, j in zip(wb, xb):
    w_lab[i] = x_lab[j]
  w_lab = [l if l is not None else next(letters) for l in w_lab]
  batch = [x_lab[j] for j in xb]
  x_free = [x_lab[j] for j in range(x.ndim) if j not in xc and j not in xb]
  w_free = [w_lab[i] for i in range(lv.w.ndim) if i not in wc and i not in wb]
  out = batch + (w_free + x_free if lv_is_lhs else x_free + w_free)

  s = lv.stack
  a_lab = w_lab[:s] + [w_lab[s + i] for i in lv.a_axes] + ["r"]
  b_lab = w_lab[:s] + ["r"] + [w_lab[s + i] for i in lv.b_axes]
  # Two orders: T = x·A then T·B, or U = x·B then U·A. Each keeps the labels of its two
  # operands that the third operand or the output still needs. T keeps the kernel's B axes
  # that x contracts and the A axes it does not (U the other way round), so x·A first is the
  # skinny order when x contracts A's axes (x·W) and x·B first when it contracts B's (x·Wᵀ,
  # a tied head, a backward pass). |T|·|U| = r²·|x|·|y| with at most one stack axis, so the
  # smaller one has at most r·max(|x|, |y|) elements.
  t_lab = _pair_labels(x_lab, a_lab, b_lab, out)
  u_lab = _pair_labels(x_lab, b_lab, a_lab, out)
  dims = dict(zip(x_lab, x.shape)) | dict(zip(w_lab, lv.w.shape)) | {"r": lv.a.shape[-1]}
  size = lambda labels: math.prod(dims[l] for l in labels)
  xa_first = size(t_lab) <= size(u_lab)
  mid_lab, first_lab, second_lab = (t_lab, a_lab, b_lab) if xa_first else (u_lab, b_lab, a_lab)
  if size(mid_lab) > dims["r"] * max(x.size, lv.w.size, size(out)):
    # Only with two stack axes, one contracted with x and one kept: both orders keep both.
    lv = ctx.materialize(lv, "dot_general contracting one stack axis and keeping another")
    return eqn.primitive.bind(*((lv, x) if lv_is_lhs else (x, lv)), **params)
  cdt = lv.w.dtype
  pet = params.get("preferred_element_type")
  prec = params.get("precision")
  a, b = lv.a.astype(cdt), lv.b.astype(cdt)
  first, second = (a, b) if xa_first else (b, a)
  # The rank-wide intermediate (x·A or x·B) carries the scale and the remat name.
  t = jnp.einsum(f"{''.join(x_lab)},{''.join(first_lab)}->{''.join(mid_lab)}", x, first,
                 precision=prec, preferred_element_type=pet)
  if lv.scale != 1.0:
    t = t * jnp.asarray(lv.scale, t.dtype)
  t = checkpoint_name(t.astype(jnp.result_type(x.dtype, cdt)), XA_NAME)
  if xa_first and not lv_is_lhs and _fold_pays(ctx, x, lv, t, wc, xc, wb, params):
    return _folded_matmul(x, t, lv.w, b, pet, prec)
  if _is_q(lv.w):
    base = _qdot(eqn, lv.w, x, lv_is_lhs)
  else:
    base = eqn.primitive.bind(*((lv.w, x) if lv_is_lhs else (x, lv.w)), **params)
  y = jnp.einsum(f"{''.join(mid_lab)},{''.join(second_lab)}->{''.join(out)}", t, second,
                 precision=prec, preferred_element_type=pet)
  return base + y.astype(base.dtype)


def _qdot(eqn, q: Quantized, x, q_is_lhs: bool):
  """`dot_general` with a quantized weight, dequantized inside the computation.

  A custom VJP keeps only the codes (already live) for the backward pass, which
  dequantizes again for `dx`; no weight gradient is formed (the weight is
  frozen). Each dequantization waits, through an optimization barrier, for its
  matmul's other operand (`x` forward, the output's cotangent backward), so XLA
  cannot hoist all layers' dequantizations to the start of a pass and hold them
  all at once.
  """
  def dot(x, w):
    return eqn.primitive.bind(*((w, x) if q_is_lhs else (x, w)), **eqn.params)

  @jax.custom_vjp
  def qdot(x, q):
    x, q = lax.optimization_barrier((x, q))
    return dot(x, q.dequantize())

  x_shape, x_dtype = x.shape, x.dtype

  def fwd(x, q):
    return qdot(x, q), q

  def bwd(q, dy):
    dy, q = lax.optimization_barrier((dy, q))
    w = q.dequantize()
    _, vjp = jax.vjp(lambda x: dot(x, w), jnp.zeros(x_shape, x_dtype))
    (dx,) = vjp(dy)
    return dx, None

  qdot.defvjp(fwd, bwd)
  return qdot(x, q)


def _stack_dot(ctx, eqn, sv: _SV, x, sv_is_lhs: bool):
  """`x·W + s[e]·(x·A[e])·B[e]` with each example `e` of `x` through its own adapter.

  The examples lead `x` (its first axis is `len(ids)` examples, or `len(ids)`
  groups of rows, example by example, as a reshaped `(batch * tokens, ...)`
  array is): the adapters of each example are gathered (`ids` picks them) and
  both products run batched over the examples, in the skinny order, as for one
  adapter. Gradients reach each adapter from its own examples only.
  """
  if sv.ids is None:
    raise ValueError(
        f"jlora.lora: the stack of adapters at {sv.path!r} has no example ids. Route the batch "
        f"first: jlora.lora(fn)(jlora.select(tree, ids), ...), ids one adapter index per "
        f"example (-1: none).")
  params = dict(eqn.params)
  (lc, rc), (lb, rb) = params["dimension_numbers"]
  wc, xc = (lc, rc) if sv_is_lhs else (rc, lc)
  wb, xb = (lb, rb) if sv_is_lhs else (rb, lb)
  n_ex = sv.ids.shape[0]
  if sv.stack or wb or xb or 0 in xc or x.ndim == 0 or x.shape[0] % n_ex:
    what = ("its stack axes (slice them with lax.scan)" if sv.stack else
            f"an activation of shape {tuple(x.shape)} whose first axis is not {n_ex} examples "
            f"(or groups of rows of them)")
    raise ValueError(
        f"jlora.lora: the stack of adapters at {sv.path!r} meets {what} in `dot_general`; "
        f"each example must lead the activations (batch first, or rows of (batch * tokens, "
        f"...), example by example). Keep the batch axis first, or run one adapter alone "
        f"with jlora.unstack(tree, i).")
  letters = iter(_LETTERS)
  x_lab = [next(letters) for _ in range(x.ndim)]
  w_lab = [None] * sv.w.ndim
  for i, j in zip(wc, xc):
    w_lab[i] = x_lab[j]
  w_lab = [l if l is not None else next(letters) for l in w_lab]
  e, f = next(letters), next(letters)
  x_free = [x_lab[j] for j in range(x.ndim) if j not in xc]
  w_free = [w_lab[i] for i in range(sv.w.ndim) if i not in wc]
  out = w_free + x_free if sv_is_lhs else x_free + w_free
  ex = lambda labels: [l for k in labels for l in ((e, f) if k == x_lab[0] else (k,))]
  x2, x2_lab, out2 = x.reshape((n_ex, x.shape[0] // n_ex) + x.shape[1:]), ex(x_lab), ex(out)
  a_lab = [e] + [w_lab[i] for i in sv.a_axes] + ["r"]
  b_lab = [e, "r"] + [w_lab[i] for i in sv.b_axes]
  t_lab = _pair_labels(x2_lab, a_lab, b_lab, out2)
  u_lab = _pair_labels(x2_lab, b_lab, a_lab, out2)
  dims = dict(zip(x2_lab, x2.shape)) | dict(zip(w_lab, sv.w.shape)) | {"r": sv.a.shape[-1]}
  size = lambda labels: math.prod(dims[l] for l in labels)
  xa_first = size(t_lab) <= size(u_lab)
  cdt = sv.w.dtype
  pet, prec = params.get("preferred_element_type"), params.get("precision")
  n_ad = sv.a.shape[0]
  if ctx.stack_kernel == "dense" and xa_first:
    # every adapter's x·A at once ((..., n·r): one matmul), masked to each example's own
    # (scaled) adapter, then one matmul with all the B's stacked: no gathers
    nl = next(letters)
    mid_lab = [l for k in t_lab for l in ((nl, "r") if k == "r" else (k,))]
    first_lab, second_lab = [nl] + a_lab[1:], [nl] + b_lab[1:]
    first, second = sv.a.astype(cdt), sv.b.astype(cdt)
    onehot = (sv.ids[:, None] == jnp.arange(n_ad)[None, :]).astype(jnp.float32)
    scale = onehot * sv.scales[None, :].astype(jnp.float32)  # (examples, adapters)
    scale_shape = [n_ex if l == e else n_ad if l == nl else 1 for l in mid_lab]
  else:  # each example's adapters gathered, both products batched over the examples
    ids = jnp.clip(sv.ids, 0, n_ad - 1)
    a = jnp.take(sv.a, ids, axis=0).astype(cdt)
    b = jnp.take(sv.b, ids, axis=0).astype(cdt)
    mid_lab, first_lab, second_lab = (t_lab, a_lab, b_lab) if xa_first else (u_lab, b_lab, a_lab)
    first, second = (a, b) if xa_first else (b, a)
    scale = jnp.where(sv.ids >= 0, jnp.take(sv.scales, ids), 0.0)
    scale_shape = [n_ex if l == e else 1 for l in mid_lab]
  t = jnp.einsum(f"{''.join(x2_lab)},{''.join(first_lab)}->{''.join(mid_lab)}", x2, first,
                 precision=prec, preferred_element_type=pet)
  t = t * scale.astype(t.dtype).reshape(scale_shape)
  t = checkpoint_name(t.astype(jnp.result_type(x.dtype, cdt)), XA_NAME)
  y = jnp.einsum(f"{''.join(mid_lab)},{''.join(second_lab)}->{''.join(out2)}", t, second,
                 precision=prec, preferred_element_type=pet)
  if _is_q(sv.w):
    base = _qdot(eqn, sv.w, x, sv_is_lhs)
  else:
    base = eqn.primitive.bind(*((sv.w, x) if sv_is_lhs else (x, sv.w)), **params)
  return base + y.reshape(base.shape).astype(base.dtype)


def _pair_labels(x_lab, first, other, out):
  """The labels of `x·first` that `other` or the output still needs (x's order, then first's)."""
  need = set(other) | set(out)
  return ([l for l in x_lab if l in need]
          + [l for l in first if l not in x_lab and l in need])


def _fold_pays(ctx: _Ctx, x, lv: _LV, t, wc, xc, wb, params) -> bool:
  """Whether to fold the adapter's second matmul into the frozen one.

  `x·W + t·B` is `[x, t]·[W; B]` (t = s·x·A): one GEMM over `K + r` instead of
  the frozen GEMM, a rank-`r` GEMM writing a second `M x N` output, and an add
  reading both. On GPUs XLA runs that add as its own kernel (it does not fuse it
  into the cuBLAS call), so when `N` is large it costs more than copying `x`
  and `W` into the concatenations: `4·M·N` against `2·M·K + 2·K·N` elements
  moved; the rule folds when `N >= 2·K` (a feed-forward up-projection). Only for
  a plain 2-D kernel contracted on its first axis against `x`'s last, with one
  dtype, no explicit `out_sharding`, and `K + r` a multiple of 8 (aligned GEMM rows).
  `ctx.fold` (`lora`'s `fold`) decides as its docstring says.
  """
  if ctx.fold == "never" or _is_q(lv.w):
    return False
  w = lv.w
  plain = (w.ndim == 2 and lv.stack == 0 and tuple(lv.a_axes) == (0,) and not wb
           and tuple(wc) == (0,) and tuple(xc) == (x.ndim - 1,) and x.dtype == w.dtype
           and params.get("out_sharding") is None)
  if not plain:
    return False
  if ctx.fold == "always":
    return True
  k, n = w.shape
  r = t.shape[-1]
  if (k + r) % 8 or ctx.platform != "gpu":
    return False
  if ctx.fold == "bytes":  # the byte count alone (A/B of the N >= 2K rule)
    m = math.prod(x.shape[:-1])
    return 4 * m * n > 2 * m * k + 2 * k * n
  return n >= 2 * k


def _dot_last_first(x, w, pet, prec):
  return lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=prec,
                         preferred_element_type=pet)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def _folded_matmul(x, t, w, b, pet, prec):
  """`x·w + t·b` as one matmul of the concatenations (`x: (..., K)`, `t: (..., r)`)."""
  return _dot_last_first(jnp.concatenate([x, t], axis=-1), jnp.concatenate([w, b], axis=0),
                         pet, prec)


@functools.partial(_folded_matmul.defjvp, symbolic_zeros=True)
def _folded_matmul_jvp(pet, prec, primals, tangents):
  # The tangent keeps the four products apart, so its transpose is the unfolded
  # backward pass: dx = dy·wᵀ, dt = dy·bᵀ, db = tᵀ·dy, and dw = xᵀ·dy only when w
  # itself is differentiated (a frozen w's tangent is a symbolic zero).
  x, t, w, b = primals
  dx, dt, dw, db = tangents
  # The primal as a plain `dot_general`, not a nested call of this function: a remat policy
  # judges the primitives it sees, and `dots_with_no_batch_dims_saveable` must see a dot here
  # to keep the output (else the whole matmul runs again in the backward pass).
  y = _dot_last_first(jnp.concatenate([x, t], axis=-1), jnp.concatenate([w, b], axis=0), pet,
                      prec)
  zero = lambda d: isinstance(d, jax.custom_derivatives.SymbolicZero)
  terms = [_dot_last_first(u, v, pet, prec)
           for u, v in ((dx, w), (dt, b), (x, dw), (t, db)) if not (zero(u) or zero(v))]
  dy = functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(y)
  return y, dy.astype(y.dtype)


@_rule("convert_element_type", quantized=True)
def _convert(ctx, eqn, invals):
  (lv,) = invals
  new = eqn.params["new_dtype"]
  if not jnp.issubdtype(new, jnp.floating):
    return None
  if _is_qv(lv):  # a quantized weight dequantizes to the new dtype
    return lv.replace(q=lv.q.astype(new))
  return lv.replace(w=lv.w.astype(new) if _is_q(lv.w) else _bind(eqn, [lv.w]))  # (_LV, _SV)


@_rule("copy", "copy_p", quantized=True)
def _copy(ctx, eqn, invals):
  return invals[0]


@_rule("sharding_constraint", quantized=True)
def _sharding_constraint(ctx, eqn, invals):
  (lv,) = invals
  if _has_q(lv):  # a layout hint for the dequantized weight: the codes keep their own layout
    return lv
  return lv.replace(w=_bind(eqn, [lv.w]))


def _swaps_last_two(perm) -> bool:
  n = len(perm)
  return n >= 2 and tuple(perm) == tuple(range(n - 2)) + (n - 1, n - 2)


@_rule("transpose", quantized=True)
def _transpose(ctx, eqn, invals):
  (lv,) = invals
  perm = tuple(eqn.params["permutation"])
  if _has_q(lv) and not _swaps_last_two(perm):
    return None  # a quantized weight keeps its blocks: only `.T` of the last two axes is free
  if _is_qv(lv):
    return lv.replace(q=lv.q.mT)
  s = lv.stack
  if tuple(perm[:s]) != tuple(range(s)):
    return None  # stack axes must stay in front
  kperm = [p - s for p in perm[s:]]  # new kernel axis j <- old kernel axis kperm[j]
  new_a = tuple(j for j, old in enumerate(kperm) if old in lv.a_axes)
  new_b = tuple(j for j, old in enumerate(kperm) if old not in lv.a_axes)
  # a's kernel axes in new order: positions (within a) of the old axes
  a_order = [lv.a_axes.index(kperm[j]) for j in new_a]
  b_order = [lv.b_axes.index(kperm[j]) for j in new_b]
  a = jnp.transpose(lv.a, tuple(range(s)) + tuple(s + i for i in a_order) + (lv.a.ndim - 1,))
  b = jnp.transpose(lv.b, tuple(range(s + 1)) + tuple(s + 1 + i for i in b_order))
  v = None if lv.v is None else jnp.transpose(lv.v, tuple(range(s)) + tuple(s + i for i in b_order))
  w = lv.w.mT if _is_q(lv.w) else _bind(eqn, [lv.w])
  return lv.replace(w=w, a=a, b=b, a_axes=new_a, v=v)


def _groups(old: tuple[int, ...], new: tuple[int, ...]):
  """Splits a reshape into runs of old and new axes with equal products, or None."""
  groups, i, j = [], 0, 0
  while i < len(old) or j < len(new):
    gi, gj, po, pn = [], [], 1, 1
    if i < len(old):
      gi.append(i)
      po = old[i]
      i += 1
    if j < len(new):
      gj.append(j)
      pn = new[j]
      j += 1
    while po != pn:
      if po < pn and i < len(old):
        gi.append(i)
        po *= old[i]
        i += 1
      elif pn < po and j < len(new):
        gj.append(j)
        pn *= new[j]
        j += 1
      else:
        return None
    groups.append((gi, gj))
  return groups


def _reshape_lv(lv: _LV, new_shape: tuple[int, ...], w_new):
  old = tuple(lv.w.shape)
  s = lv.stack
  kind = ["s"] * s + ["a" if k in lv.a_axes else "b" for k in range(len(old) - s)]
  groups = _groups(old, tuple(new_shape))
  if groups is None:
    return None
  new_kind = [None] * len(new_shape)
  for gi, gj in groups:
    kinds = {kind[i] for i in gi if old[i] != 1} or {kind[i] for i in gi}
    if not gi:
      return None
    if len(kinds) != 1:
      return None
    (k,) = kinds
    for j in gj:
      new_kind[j] = k
  ns = 0
  while ns < len(new_kind) and new_kind[ns] == "s":
    ns += 1
  if "s" in new_kind[ns:]:
    return None
  a_axes = tuple(j - ns for j in range(ns, len(new_kind)) if new_kind[j] == "a")
  b_dims = [new_shape[j] for j in range(ns, len(new_kind)) if new_kind[j] == "b"]
  if not a_axes or not b_dims:
    return None
  stack_shape = tuple(new_shape[:ns])
  a_dims = tuple(new_shape[ns + i] for i in a_axes)
  r = lv.a.shape[-1]
  a = lv.a.reshape(stack_shape + a_dims + (r,))
  b = lv.b.reshape(stack_shape + (r,) + tuple(b_dims))
  v = None if lv.v is None else lv.v.reshape(stack_shape + tuple(b_dims))
  return lv.replace(w=w_new, a=a, b=b, a_axes=a_axes, stack=ns, v=v)


@_rule("reshape")
def _reshape(ctx, eqn, invals):
  lv = invals[0]
  if len(invals) > 1 or eqn.params.get("dimensions") is not None:
    return None
  new_shape = tuple(eqn.params["new_sizes"])
  return _reshape_lv(lv, new_shape, _bind(eqn, [lv.w]))


@_rule("squeeze")
def _squeeze(ctx, eqn, invals):
  (lv,) = invals
  w_new = _bind(eqn, [lv.w])
  return _reshape_lv(lv, tuple(w_new.shape), w_new)


def _factor_axes(lv: _LV):
  """For `a` and for `b`, the axis of `w` each of its axes stands for (None: the rank)."""
  st = list(range(lv.stack))
  return (st + [lv.stack + i for i in lv.a_axes] + [None],
          st + [None] + [lv.stack + i for i in lv.b_axes])


@_rule("slice")
def _slice(ctx, eqn, invals):
  """A slice of `w` (stack or kernel axes) is the same slice of the factor spanning each axis."""
  (lv,) = invals
  st, lim = eqn.params["start_indices"], eqn.params["limit_indices"]
  strides = eqn.params.get("strides") or (1,) * len(st)

  def cut(arr, axes):
    return lax.slice(arr, [0 if k is None else st[k] for k in axes],
                     [n if k is None else lim[k] for k, n in zip(axes, arr.shape)],
                     [1 if k is None else strides[k] for k in axes])

  fa, fb = _factor_axes(lv)
  v = None if lv.v is None else cut(lv.v, [k for k in fb if k is not None])
  return lv.replace(w=_bind(eqn, [lv.w]), a=cut(lv.a, fa), b=cut(lv.b, fb), v=v)


@_rule("dynamic_slice")
def _dynamic_slice(ctx, eqn, invals):
  """As `slice`, with the start indices of `w`'s axes (the rank axis starts at 0)."""
  lv, *starts = invals
  if any(_is_lv(x) for x in starts):
    return None
  sizes = tuple(eqn.params["slice_sizes"])

  def cut(arr, axes):
    return lax.dynamic_slice(arr, [0 if k is None else starts[k] for k in axes],
                             [n if k is None else sizes[k] for k, n in zip(axes, arr.shape)])

  fa, fb = _factor_axes(lv)
  v = None if lv.v is None else cut(lv.v, [k for k in fb if k is not None])
  return lv.replace(w=_bind(eqn, [lv.w, *starts]), a=cut(lv.a, fa), b=cut(lv.b, fb), v=v)


def _row_gather(eqn, d: int) -> bool:
  """Whether a gather takes whole rows of a `(n, d)` operand (an embedding lookup)."""
  p = eqn.params
  dn = p["dimension_numbers"]
  return (tuple(p["slice_sizes"]) == (1, d) and tuple(dn.collapsed_slice_dims) == (0,)
          and tuple(dn.start_index_map) == (0,) and not tuple(dn.operand_batching_dims)
          and len(dn.offset_dims) == 1)


def _gather_rows(eqn, arr, idx):
  """The gather of `eqn` on another operand with as many rows (its own row width)."""
  p = eqn.params
  return lax.gather(arr, idx, p["dimension_numbers"], (1, arr.shape[1]),
                    indices_are_sorted=p["indices_are_sorted"],
                    unique_indices=p["unique_indices"], mode=p["mode"],
                    fill_value=p.get("fill_value") if jnp.issubdtype(arr.dtype, jnp.inexact)
                    else None)


def _q_rows(eqn, q: Quantized, idx):
  """Rows of a quantized table: the codes' and the scales' rows, dequantized (no full copy)."""
  pos = eqn.params["dimension_numbers"].offset_dims[0]
  rows_of = lambda arr: jnp.moveaxis(_gather_rows(eqn, arr, idx), pos, -1)
  rows = Quantized(codes=rows_of(q.codes), scales=rows_of(q.block_scales()),
                   mins=None if q.mins is None else rows_of(q.mins), kind=q.kind,
                   block_size=q.block_size, dtype_name=q.dtype_name)
  return jnp.moveaxis(rows.dequantize(), -1, pos)


@_rule("gather", quantized=True)
def _gather(ctx, eqn, invals):
  lv, idx = invals
  if _special(idx):
    return None
  if _is_qv(lv):
    q = lv.q
    if q.ndim != 2 or q.stack or q.transposed or not _row_gather(eqn, q.shape[1]):
      return None
    return _q_rows(eqn, q, idx)
  if lv.stack or lv.w.ndim != 2 or lv.a_axes != (0,) or not _row_gather(eqn, lv.w.shape[1]):
    return None
  if _is_q(lv.w) and (lv.w.stack or lv.w.transposed):
    return None
  p = eqn.params
  dn = p["dimension_numbers"]
  base = _q_rows(eqn, lv.w, idx) if _is_q(lv.w) else _bind(eqn, [lv.w, idx])
  r = lv.a.shape[-1]
  rows = lax.gather(lv.a, idx, dn, (1, r), indices_are_sorted=p["indices_are_sorted"],
                    unique_indices=p["unique_indices"], mode=p["mode"],
                    fill_value=p.get("fill_value"))
  pos = dn.offset_dims[0]
  rows = jnp.moveaxis(rows, pos, -1).astype(lv.w.dtype) * jnp.asarray(lv.scale, lv.w.dtype)
  y = jnp.moveaxis(rows @ lv.b.astype(lv.w.dtype), -1, pos)
  out = base + y.astype(base.dtype)
  if lv.v is not None:  # DoRA: each row's columns rescaled
    out = out * _broadcast_to_axes(lv.v, [pos], out.ndim).astype(out.dtype)
  return out


@_rule("conv_general_dilated")
def _conv(ctx, eqn, invals):
  """A convolution with a kernel whose `a` or `b` spans one feature axis alone.

  That factor acts pointwise on the features, the other is a conv kernel with r
  features in its place: `conv(x, A)·B` when `b` spans the output features (the
  Keras layout), `conv(x·A, B)` when `a` spans the input features (fan-in), and
  the same with the roles of `a` and `b` swapped (the kernel as a backward pass
  uses it: feature axes exchanged). The rank-wide intermediate carries the scale
  and the name "jlora_xa". Other layouts and grouped convolutions materialize.
  """
  x, lv = invals
  p = eqn.params
  if _is_lv(x) or lv.stack or p["feature_group_count"] != 1 or p["batch_group_count"] != 1:
    return None
  dn = p["dimension_numbers"]
  out_axis, in_axis = dn.rhs_spec[0], dn.rhs_spec[1]
  x_feat, y_feat = dn.lhs_spec[1], dn.out_spec[1]
  if lv.v is not None and lv.b_axes != (out_axis,):
    return None  # DoRA's rescaling runs factored on the output features only
  cdt = lv.w.dtype
  a, b = lv.a.astype(cdt), lv.b.astype(cdt)
  # (the factor spanning one feature axis as a (features, r) matrix, the other as a kernel)
  if lv.b_axes == (out_axis,):
    conv_first, mat, kernel = True, b.T, jnp.moveaxis(a, -1, out_axis)
  elif lv.a_axes == (out_axis,):
    conv_first, mat, kernel = True, a, jnp.moveaxis(b, 0, out_axis)
  elif lv.a_axes == (in_axis,):
    conv_first, mat, kernel = False, a, jnp.moveaxis(b, 0, in_axis)
  elif lv.b_axes == (in_axis,):
    conv_first, mat, kernel = False, b.T, jnp.moveaxis(a, -1, in_axis)
  else:
    return None
  base = _bind(eqn, [x, lv.w])
  pointwise = lambda u, m, ax: jnp.moveaxis(
      jnp.einsum("...f,fr->...r", jnp.moveaxis(u, ax, -1), m, precision=p["precision"],
                 preferred_element_type=p["preferred_element_type"]), -1, ax)
  z = _bind(eqn, [x, kernel]) if conv_first else pointwise(x, mat, x_feat)
  if lv.scale != 1.0:
    z = z * jnp.asarray(lv.scale, z.dtype)
  z = checkpoint_name(z.astype(jnp.result_type(x.dtype, cdt)), XA_NAME)
  y = pointwise(z, mat.T, y_feat) if conv_first else _bind(eqn, [z, kernel])
  out = base + y.astype(base.dtype)
  if lv.v is not None:  # DoRA: the output features rescaled
    out = out * _broadcast_to_axes(lv.v, [y_feat], out.ndim).astype(out.dtype)
  return out


@_rule("rev")
def _rev(ctx, eqn, invals):
  """Reversed axes (a conv's backward pass reverses the kernel's spatial axes): each axis
  reversed in the factor that spans it (stack axes in both)."""
  (lv,) = invals
  s = lv.stack
  dims = tuple(eqn.params["dimensions"])
  stack = tuple(d for d in dims if d < s)
  a_dims = stack + tuple(s + lv.a_axes.index(d - s) for d in dims if d - s in lv.a_axes)
  b_dims = stack + tuple(s + 1 + lv.b_axes.index(d - s) for d in dims if d - s in lv.b_axes)
  v_dims = tuple(d if d < s else d - 1 for d in b_dims)
  v = lv.v if lv.v is None or not v_dims else lax.rev(lv.v, v_dims)
  return lv.replace(w=_bind(eqn, [lv.w]), a=lax.rev(lv.a, a_dims) if a_dims else lv.a,
                    b=lax.rev(lv.b, b_dims) if b_dims else lv.b, v=v)


@_rule("pjit", "jit", "closed_call", "core_call", quantized=True)
def _inline(ctx, eqn, invals):
  jaxpr, consts = _open(eqn.params.get("jaxpr", eqn.params.get("call_jaxpr")))
  return _eval(ctx, jaxpr, consts, invals)


@_rule("remat2", "checkpoint", "remat", quantized=True)
def _remat(ctx, eqn, invals):
  jaxpr, consts = _open(eqn.params["jaxpr"])

  def f(*args):
    # LoRA weights leave the checkpoint as they are (they are pytrees): Flax NNX's `nnx.remat`
    # returns a block's whole state, each weight passed straight through.
    return _eval(ctx, jaxpr, consts, list(args))

  return jax.checkpoint(f, prevent_cse=eqn.params.get("prevent_cse", True),
                        policy=eqn.params.get("policy"))(*invals)


@_rule("cond", quantized=True)
def _cond(ctx, eqn, invals):
  index, *ops = invals
  branches = eqn.params["branches"]

  def mk(br):
    j, c = _open(br)
    return lambda *o: _materialize_all(ctx, _eval(ctx, j, c, list(o)), "output of cond")

  return lax.switch(index, [mk(br) for br in branches], *ops)


def _open(j):
  """`(jaxpr, consts)` of a ClosedJaxpr, or of a Jaxpr (which carries consts on newer JAX)."""
  if isinstance(j, jex.core.ClosedJaxpr):
    return j.jaxpr, list(j.consts)
  return j, list(getattr(j, "consts", ()) or ())


def _scan_operands(p, invals):
  """(consts, carry, xs) of a scan equation, across JAX's two parameter conventions."""
  if "num_consts" in p:
    nc, nk = p["num_consts"], p["num_carry"]
    return invals[:nc], invals[nc:nc + nk], invals[nc + nk:]
  consts, carry, xs = p["ft_in"].update(list(invals)).unpack()  # JAX >= 0.11
  return list(consts), list(carry), list(xs)


@_rule("scan", quantized=True)
def _scan(ctx, eqn, invals):
  p = eqn.params
  consts, init, xs = _scan_operands(p, invals)
  nk = len(init)
  init = _materialize_all(ctx, init, "scan carry")
  xs = [ctx.materialize(x, "scan over a kernel axis") if _scan_cuts(x) else x for x in xs]
  # a stack of adapters is sliced along its stack axes, not its per-example ids and scales
  routes = [(v.ids, v.scales) if isinstance(v, _SV) else None for v in xs]
  xs = [v.replace(ids=None, scales=None) if isinstance(v, _SV) else v for v in xs]
  body, body_consts = _open(p["jaxpr"])

  def step(carry, x):
    x = [v.replace(ids=r[0], scales=r[1]) if r is not None else v for v, r in zip(x, routes)]
    x = [_unstack(v) for v in x]
    outs = _materialize_all(ctx, _eval(ctx, body, body_consts, [*consts, *carry, *x]),
                            "output of scan")
    return outs[:nk], outs[nk:]

  carry, ys = lax.scan(step, list(init), list(xs), length=p["length"], reverse=p["reverse"],
                       unroll=p["unroll"])
  return [*carry, *ys]


def _scan_cuts(v) -> bool:
  """Whether scanning over `v`'s leading axis cuts through a kernel (not a stack axis)."""
  if _is_lv(v) or isinstance(v, _SV):
    return v.stack == 0
  if _is_qv(v):  # codes and scales keep the leading axes; a double quantization is per stack slice
    return v.q.stack == 0 and (v.q.double_quant or v.q.ndim < 3)
  return False


def _unstack(v):
  """One slice of a stacked weight, as `lax.scan` hands it to the body."""
  if _is_qv(v):
    return v.replace(q=dataclasses.replace(v.q, stack=max(v.q.stack - 1, 0)))
  if _is_lv(v) or isinstance(v, _SV):
    w = dataclasses.replace(v.w, stack=max(v.w.stack - 1, 0)) if _is_q(v.w) else v.w
    return v.replace(w=w, stack=v.stack - 1)
  return v


@_rule("while", quantized=True)
def _while(ctx, eqn, invals):
  p = eqn.params
  cn, bn = p["cond_nconsts"], p["body_nconsts"]
  cc, bc, init = invals[:cn], invals[cn:cn + bn], invals[cn + bn:]
  init = _materialize_all(ctx, init, "while_loop carry")
  (cj, cjc), (bj, bjc) = _open(p["cond_jaxpr"]), _open(p["body_jaxpr"])

  def cond_fun(c):
    return _eval(ctx, cj, cjc, [*cc, *c])[0]

  def body_fun(c):
    return _materialize_all(ctx, _eval(ctx, bj, bjc, [*bc, *c]), "output of while_loop")

  return lax.while_loop(cond_fun, body_fun, list(init))
