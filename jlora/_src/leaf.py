"""The two leaf types of a jlora tree: `LoRA` (frozen w + trainable a, b) and `Trainable`."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jlora._src.qarray import Quantized


@dataclasses.dataclass(frozen=True)
class LoRA:
  """A frozen kernel `w` with a trainable low-rank update `scale * a @ b` (and DoRA's `m`).

  The kernel's axes (after `stack` leading stack axes, which `w`, `a` and `b`
  share) are split into the *A axes* (`a_axes`, in kernel order) and the *B axes*
  (the rest, in kernel order)::

      a.shape == stack_shape + tuple(kernel.shape[i] for i in a_axes) + (rank,)
      b.shape == stack_shape + (rank,) + tuple(kernel.shape[i] for i in b_axes)
      w_effective = w + scale * (a @ b), axes put back in kernel order

  `w`, `a`, `b` and `m` are pytree children, so `jax.tree_util.keystr` shows
  paths such as `['dense']['kernel'].a`; everything else is static metadata.

  DoRA (`m` not None): `m` is a trainable magnitude with one value per element
  of the B axes (`m.shape == stack_shape + tuple(kernel.shape[i] for i in
  b_axes)`), and the effective weight is rescaled to it::

      v = w + scale * (a @ b)
      w_effective = v * m / norm(v)     # the norm over the A axes, per B-axes element

  For a 2-D `(in, out)` kernel that is PEFT's DoRA, one magnitude per output
  feature. The norm is treated as a constant in the gradient (DoRA's section
  4.3; PEFT detaches it likewise): `a`, `b` and `m` get gradients through the
  numerator only.

  Attributes:
    w: the frozen original weight.
    a: the trainable down-projection.
    b: the trainable up-projection (zeros at init).
    alpha: the LoRA alpha.
    a_axes: the kernel axes (not counting stack axes) spanned by `a`.
    stack: the number of leading stack axes shared by `w`, `a` and `b`.
    rslora: if True the scale is alpha/sqrt(rank), else alpha/rank.
    m: DoRA's trainable magnitude, or None (plain LoRA).
    residual: `"pissa"`, `"pissa_niter_<n>"` or `"olora"` when `w` is not the
      original weight but its residual after that init took the principal part
      into `a @ b` (`jlora.apply(..., init="pissa")`); None otherwise. It tells
      `jlora.hf.export_peft` to write the adapter as PEFT writes such an adapter.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> leaf = jlora.LoRA(w=jnp.zeros((3, 4, 5)), a=jnp.ones((3, 4, 2)), b=jnp.ones((2, 5)),
    ...                   alpha=4.0, a_axes=(0, 1))
    >>> leaf.rank, leaf.scale, leaf.shape, leaf.delta()[0, 0, 0].item()
    (2, 2.0, (3, 4, 5), 4.0)
    >>> [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(leaf)[0]]
    ['.w', '.a', '.b']
  """

  w: Any
  a: Any
  b: Any
  alpha: float = dataclasses.field(metadata=dict(static=True))
  a_axes: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  stack: int = dataclasses.field(default=0, metadata=dict(static=True))
  rslora: bool = dataclasses.field(default=False, metadata=dict(static=True))
  m: Any = None
  residual: str | None = dataclasses.field(default=None, metadata=dict(static=True))

  @property
  def dora(self) -> bool:
    """Whether the leaf is DoRA (carries a magnitude `m`)."""
    return self.m is not None

  @property
  def rank(self) -> int:
    """The LoRA rank (`None` on the frozen half of `jlora.split`, which has no adapters)."""
    if self.a is not None:
      return int(_shape(self.a)[-1])
    if self.b is not None:
      return int(_shape(self.b)[self.stack])
    return None

  @property
  def scale(self) -> float:
    r = self.rank
    return self.alpha / math.sqrt(r) if self.rslora else self.alpha / r

  @property
  def ndim(self) -> int:
    """The kernel's number of axes, stack axes excluded."""
    return len(self.a_axes) + len(self.b_axes)

  @property
  def b_axes(self) -> tuple[int, ...]:
    n = len(_shape(self.a)) - 1 - self.stack + len(_shape(self.b)) - 1 - self.stack
    return tuple(i for i in range(n) if i not in self.a_axes)

  @property
  def shape(self) -> tuple[int, ...]:
    """The shape of the (effective) weight, stack axes included."""
    if self.w is not None and hasattr(self.w, "shape"):
      return tuple(self.w.shape)
    return _kernel_shape(_shape(self.a), _shape(self.b), self.a_axes, self.stack)

  @property
  def dtype(self):
    """The weight's dtype (the adapters' on the trainable half of `jlora.split`)."""
    return (self.w if self.w is not None else self.a).dtype

  def delta(self) -> jax.Array:
    """`scale * a @ b` in the kernel's axis order (adapter dtype)."""
    return lora_delta(self.a, self.b, self.a_axes, self.stack, self.scale)

  def effective(self) -> jax.Array:
    """The effective weight: `w + scale * a @ b` (DoRA: rescaled to `m`), in `w`'s dtype."""
    return effective_weight(self.w, self.a, self.b, self.m, self.a_axes, self.stack, self.scale)

  def __repr__(self) -> str:  # compact: shapes, not values
    extra = "" if self.m is None else f", m={_desc(self.m)}"
    extra += "" if self.residual is None else f", residual={self.residual!r}"
    return (f"LoRA(w={_desc(self.w)}, a={_desc(self.a)}, b={_desc(self.b)}, alpha={self.alpha}, "
            f"a_axes={self.a_axes}, stack={self.stack}, rslora={self.rslora}{extra})")

  # A LoRA leaf is a pytree node, never an array: `jnp.asarray(leaf)`, `x @ leaf`, or a jlora
  # tree passed to a function that is not wrapped in `jlora.lora` (a Flax `model.apply`) land
  # here, through JAX's `__jax_array__` protocol or NumPy's `__array__` (both only ever called
  # to convert the object to an array; pytree flattening, `jit` and tracing never call them).
  def __jax_array__(self):
    raise _used_as_array("LoRA", f"weight {_desc(self.w)}, rank {self.rank}")

  def __array__(self, dtype=None, copy=None):
    raise _used_as_array("LoRA", f"weight {_desc(self.w)}, rank {self.rank}")


jax.tree_util.register_dataclass(LoRA)


@dataclasses.dataclass(frozen=True)
class Trainable:
  """Marks a leaf as fully trainable (e.g. a classifier head or a bias)."""

  value: Any

  def __repr__(self) -> str:
    v = self.value
    return f"Trainable({getattr(v, 'dtype', '?')}{list(_shape(v)) if v is not None else ''})"

  def __jax_array__(self):  # as LoRA's
    raise _used_as_array("Trainable", _desc(self.value))

  def __array__(self, dtype=None, copy=None):
    raise _used_as_array("Trainable", _desc(self.value))


jax.tree_util.register_dataclass(Trainable)


@dataclasses.dataclass(frozen=True)
class LoRAStack:
  """Several adapters of one frozen weight, stacked, each example of a batch using its own.

  Made by `jlora.stack` from trees adapted alike (same targets and layout); ranks
  are padded with zeros to the largest. With `stack` leading stack axes (shared
  with `w`) and `n` adapters::

      a.shape == stack_shape + (n,) + a_dims + (rank,)
      b.shape == stack_shape + (n, rank) + b_dims
      w_effective[example e] = w + scale[ids[e]] * a[ids[e]] @ b[ids[e]]

  `alphas` and `ranks` (one per adapter) are arrays, so replacing an adapter by
  another of any rank up to the padded one, or changing `ids`, recompiles
  nothing. `ids` (one adapter index per example, -1 for none) is set by
  `jlora.select`; examples lead the activations (a batch axis first, or the
  rows of a reshaped `(batch * tokens, ...)` array, example by example).
  """

  w: Any
  a: Any
  b: Any
  alphas: Any
  ranks: Any
  ids: Any = None
  a_axes: tuple[int, ...] = dataclasses.field(default=(0,), metadata=dict(static=True))
  stack: int = dataclasses.field(default=0, metadata=dict(static=True))
  rslora: bool = dataclasses.field(default=False, metadata=dict(static=True))

  @property
  def n_adapters(self) -> int:
    if self.alphas is not None:
      return int(_shape(self.alphas)[0])
    return int(_shape(self.a)[self.stack])  # (the trainable half of jlora.split)

  @property
  def rank(self) -> int:
    """The padded rank (the largest of the adapters')."""
    return int(_shape(self.a)[-1]) if self.a is not None else int(_shape(self.b)[self.stack + 1])

  @property
  def shape(self) -> tuple[int, ...]:
    return tuple(self.w.shape)

  @property
  def dtype(self):
    return self.w.dtype

  def scales(self) -> jax.Array:
    """Each adapter's scale, alpha/rank (alpha/sqrt(rank) with rslora), as float32."""
    r = jnp.maximum(jnp.asarray(self.ranks, jnp.float32), 1.0)
    return jnp.asarray(self.alphas, jnp.float32) / (jnp.sqrt(r) if self.rslora else r)

  def __repr__(self) -> str:
    return (f"LoRAStack(w={_desc(self.w)}, a={_desc(self.a)}, b={_desc(self.b)}, "
            f"ids={_desc(self.ids)}, a_axes={self.a_axes}, stack={self.stack})")

  def __jax_array__(self):
    raise _used_as_array("LoRAStack", f"weight {_desc(self.w)}")

  def __array__(self, dtype=None, copy=None):
    raise _used_as_array("LoRAStack", f"weight {_desc(self.w)}")


jax.tree_util.register_dataclass(LoRAStack)


def is_lora(x: Any) -> bool:
  return isinstance(x, LoRA)


def is_node(x: Any) -> bool:
  """True for jlora's own nodes (`LoRA`, `LoRAStack`, `Trainable`, `Quantized`): use as
  `is_leaf`."""
  return isinstance(x, (LoRA, LoRAStack, Trainable, Quantized))


def _shape(x) -> tuple[int, ...]:
  return tuple(getattr(x, "shape", ()))


def _desc(x) -> str:
  return "None" if x is None else f"{getattr(x, 'dtype', '?')}{list(_shape(x))}"


def _used_as_array(kind: str, what: str) -> TypeError:
  return TypeError(
      f"jlora.{kind}: a jlora.{kind} leaf ({what}) was used as an array: a jlora tree was "
      f"passed to a function not wrapped in jlora.lora (such as a Flax model.apply), or to "
      f"jnp.asarray. Run the function factored with jlora.lora(fn)(tree, ...), or "
      f"materialize the weights with fn(jlora.merge(tree), ...).")


def _kernel_shape(a_shape, b_shape, a_axes, stack):
  a_dims = a_shape[stack:-1]
  b_dims = b_shape[stack + 1:]
  n = len(a_dims) + len(b_dims)
  out, ia, ib = [], iter(a_dims), iter(b_dims)
  for i in range(n):
    out.append(next(ia) if i in a_axes else next(ib))
  return tuple(a_shape[:stack]) + tuple(out)


_LETTERS = "abcdefghijklmnopqstuvwxyzABCDEFGHIJKLMNOPQSTUVWXYZ"  # 'r' is the rank


def lora_delta(a, b, a_axes, stack, scale):
  """`scale * a @ b` with the axes placed back in kernel order."""
  a_nd = a.ndim - 1 - stack
  b_nd = b.ndim - 1 - stack
  n = a_nd + b_nd
  s = _LETTERS[:stack]
  k = _LETTERS[stack:stack + n]
  b_axes = [i for i in range(n) if i not in a_axes]
  a_sub = s + "".join(k[i] for i in a_axes) + "r"
  b_sub = s + "r" + "".join(k[i] for i in b_axes)
  ab = jnp.einsum(f"{a_sub},{b_sub}->{s}{k}", a, b, precision=jax.lax.Precision.HIGHEST)
  return ab * jnp.asarray(scale, ab.dtype)


def dora_norm(v, a_axes, stack):
  """The norm of `v` (stack axes in front) over its A axes, per element of the others."""
  axes = tuple(stack + i for i in a_axes)
  return jnp.sqrt(jnp.sum(jnp.square(v.astype(jnp.float32)), axis=axes))


def dora_scale(m, norm):
  """DoRA's `m / norm` in float32, the norm held constant for the gradient (as PEFT does)."""
  return m.astype(jnp.float32) / jax.lax.stop_gradient(norm.astype(jnp.float32))


def effective_weight(w, a, b, m, a_axes, stack, scale):
  """`w + scale * a @ b` in `w`'s dtype (the sum in the promoted dtype), DoRA-rescaled when `m`
  is given. A quantized `w` is dequantized first."""
  if isinstance(w, Quantized):
    w = w.dequantize()
  d = lora_delta(a, b, a_axes, stack, scale)
  ct = jnp.promote_types(w.dtype, d.dtype)
  v = w.astype(ct) + d.astype(ct)
  if m is None:
    return v.astype(w.dtype)
  scale_v = dora_scale(m, dora_norm(v, a_axes, stack))
  scale_v = jnp.expand_dims(scale_v, tuple(stack + i for i in a_axes))
  return (v.astype(jnp.float32) * scale_v).astype(w.dtype)
