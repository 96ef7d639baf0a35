"""Partition specs of jlora trees: derived from each weight's layout (see `jlora.sharding`)."""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jlora._src import boxes, compat, paths as P
from jlora._src.leaf import LoRA, LoRAStack, Trainable, is_node
from jlora._src.qarray import Quantized

ADAPTERS = ("derived", "replicated")


def _is_stop(x) -> bool:
  return (x is None or is_node(x) or boxes.is_box(x)
          or isinstance(x, (PartitionSpec, jax.sharding.Sharding)))


# --------------------------------------------------------------------------- specs


def _pad(spec, ndim: int) -> tuple:
  spec = tuple(spec)
  if len(spec) > ndim:
    raise ValueError(f"partition spec {PartitionSpec(*spec)} has more entries than the "
                     f"array's {ndim} axes")
  return spec + (None,) * (ndim - len(spec))


def _own_spec(x):
  """`(spec, mesh)` from the array's own `NamedSharding`, or `(None, None)`."""
  if isinstance(x, Quantized):  # its codes are laid out as the weight
    x = x.codes
  sh = getattr(x, "sharding", None) if not isinstance(x, jax.core.Tracer) else None
  if isinstance(sh, NamedSharding):
    return tuple(sh.spec), sh.mesh
  return None, None


def quantized_specs(w_spec: Sequence[Any], q: Quantized) -> Quantized:
  """The specs of a quantized weight's arrays from the weight's spec.

  The codes are laid out as the weight (NF4's packed last axis holds pairs of
  its elements); the scales as the weight except along the last axis, the axis
  of the blocks, which they keep whole (a block count need not divide by the
  mesh), and so do a q4_1 weight's mins; a double quantization's second-level
  scales and offsets follow the stack axes only.
  """
  spec = _pad(w_spec, q.ndim)
  if q.transposed:  # the codes store the weight's transpose
    spec = spec[:-2] + (spec[-1], spec[-2])
  lead = spec[:q.stack]
  return dataclasses.replace(
      q, codes=_trim(PartitionSpec(*spec)),
      scales=_trim(PartitionSpec(*spec[:-1], None)),
      scale_scales=None if q.scale_scales is None else _trim(PartitionSpec(*lead, None)),
      scale_offset=None if q.scale_offset is None else _trim(PartitionSpec(*lead)),
      mins=None if q.mins is None else _trim(PartitionSpec(*spec[:-1], None)))


def adapter_specs(w_spec: Sequence[Any], a_axes: Sequence[int], stack: int, ndim: int
                  ) -> tuple[PartitionSpec, PartitionSpec]:
  """The partition specs of `a` and `b` derived from the weight's spec.

  Args:
    w_spec: the weight's `PartitionSpec` (or its entries), stack axes included.
    a_axes: the kernel axes spanned by `a` (stack axes excluded), as in `jlora.LoRA`.
    stack: the number of leading stack axes.
    ndim: the weight's number of axes, stack axes included.

  Returns:
    `(a_spec, b_spec)`: `a` takes the stack and A-axis entries, `b` the stack
    and B-axis entries; the rank axis is unsharded in both.

  Example:
    >>> import jlora
    >>> from jax.sharding import PartitionSpec as P
    >>> a, b = jlora.sharding.adapter_specs(P(None, "fsdp", "tensor"), a_axes=(0,), stack=1, ndim=3)
    >>> a == P(None, "fsdp"), b == P(None, None, "tensor")
    (True, True)
  """
  ws = _pad(w_spec, ndim)
  s, k = ws[:stack], ws[stack:]
  a = PartitionSpec(*s, *(k[i] for i in a_axes), None)
  b = PartitionSpec(*s, None, *(k[i] for i in range(len(k)) if i not in a_axes))
  return _trim(a), _trim(b)


def magnitude_spec(b_spec: PartitionSpec, stack: int) -> PartitionSpec:
  """DoRA's magnitude `m` (stack and B axes) laid out as `b` without its rank axis: as the
  weight's B axes."""
  bs = tuple(b_spec)
  bs = bs + (None,) * max(0, stack + 1 - len(bs))
  return _trim(PartitionSpec(*bs[:stack], *bs[stack + 1:]))


def _trim(spec: PartitionSpec) -> PartitionSpec:
  """Drops trailing `None` entries, so equal layouts compare equal."""
  t = tuple(spec)
  while t and t[-1] is None:
    t = t[:-1]
  return PartitionSpec(*t)


def _base_lookup(base) -> dict[str, Any]:
  if base is None:
    return {}
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(
      base, is_leaf=lambda x: isinstance(x, (PartitionSpec, jax.sharding.Sharding)) or
      boxes.is_box(x))[0]:
    if boxes.is_box(x):
      x = boxes.value(x)
    if isinstance(x, NamedSharding):
      x = x.spec
    if isinstance(x, PartitionSpec):
      out[P.path_str(path)] = tuple(x)
  return out


class _Walker:
  """Computes a `PartitionSpec` tree (and the mesh it finds) for a jlora tree.

  With `same_structure`, the result has the tree's own structure: Linen boxes are
  kept (holding specs) and a leaf that is not an array gets `P()`, not `None`.
  """

  def __init__(self, rules, base, adapters, same_structure=False):
    if adapters not in ADAPTERS:
      raise ValueError(f"jlora.sharding.partition_specs: adapters={adapters!r} is not one of "
                       f"{ADAPTERS}.")
    self.rules, self.adapters = rules, adapters
    self.same_structure = same_structure
    self.base = _base_lookup(base)
    self.mesh = None
    self.seen: list[tuple[str, str | None, tuple[int, ...], PartitionSpec]] = []

  def _record(self, ps, value, spec):
    """Notes `(path, adapter name or None, shape, spec)` of each array laid out, for checks."""
    if isinstance(value, LoRA) and isinstance(spec, LoRA):
      for name in ("w", "a", "b", "m"):
        v, s = getattr(value, name), getattr(spec, name)
        if isinstance(s, PartitionSpec) and hasattr(v, "shape"):
          self.seen.append((f"{ps}/{name}", name if name != "w" else None, tuple(v.shape), s))
    elif isinstance(value, Trainable) and isinstance(spec, Trainable):
      self._record(ps, value.value, spec.value)
    elif isinstance(value, Quantized) and isinstance(spec, Quantized):
      self.seen.append((ps, None, tuple(value.codes.shape), spec.codes))
    elif isinstance(spec, PartitionSpec) and hasattr(value, "shape"):
      self.seen.append((ps, None, tuple(value.shape), spec))

  def _note_mesh(self, mesh):
    if self.mesh is None and isinstance(mesh, Mesh):
      self.mesh = mesh

  def array_spec(self, ps, x, meta_spec=None, meta_mesh=None) -> PartitionSpec | None:
    if x is None:
      return None
    if not hasattr(x, "shape"):
      return PartitionSpec() if self.same_structure else None
    ndim = len(x.shape)
    spec, mesh = _own_spec(x)
    if spec is None and meta_spec is not None:
      spec, mesh = meta_spec, meta_mesh
    if spec is None:
      spec = self.base.get(ps)
    self._note_mesh(mesh)
    if spec is None:
      return PartitionSpec()
    try:
      return _trim(PartitionSpec(*_pad(spec, ndim)))
    except ValueError as e:
      raise ValueError(f"jlora.sharding.partition_specs: at {ps!r} (shape {tuple(x.shape)}): "
                       f"{e}. Give one entry per axis (None for an unsharded axis).") from None

  def lora_spec(self, ps, x: LoRA, meta_spec=None, meta_mesh=None) -> LoRA:
    shape = x.shape
    ndim = len(shape)
    w_spec = self.array_spec(ps, x.w, meta_spec, meta_mesh) if x.w is not None else None
    if x.w is None:  # the trainable half: no weight to derive from; the adapters' own layout
      a_spec = self.array_spec(ps + ".a", x.a) if x.a is not None else None
      b_spec = self.array_spec(ps + ".b", x.b) if x.b is not None else None
      m_spec = self.array_spec(ps + ".m", x.m) if x.m is not None else None
      if meta_spec is not None or ps in self.base:
        a_spec, b_spec = self._derived(ps, meta_spec, x, ndim)
        m_spec = magnitude_spec(b_spec, x.stack)
      return dataclasses.replace(x, a=a_spec if x.a is not None else None,
                                 b=b_spec if x.b is not None else None,
                                 m=m_spec if x.m is not None else None)
    a_spec, b_spec = self._derived(ps, tuple(w_spec), x, ndim)
    if isinstance(x.w, Quantized):
      w_spec = quantized_specs(tuple(w_spec), x.w)
    return dataclasses.replace(x, w=w_spec, a=a_spec if x.a is not None else None,
                               b=b_spec if x.b is not None else None,
                               m=magnitude_spec(b_spec, x.stack) if x.m is not None else None)

  def _derived(self, ps, w_spec, x, ndim):
    if self.adapters == "replicated":
      return PartitionSpec(), PartitionSpec()
    if w_spec is None:
      w_spec = self.base.get(ps, ())
    try:
      return adapter_specs(w_spec, x.a_axes, x.stack, ndim)
    except ValueError as e:
      raise ValueError(f"jlora.sharding.partition_specs: the weight at {ps!r} (shape "
                       f"{x.shape}): {e}. Give one entry per axis, stack axes included.") from None

  def node(self, path, x):
    ps = P.path_str(path)
    if x is None:
      return None
    if isinstance(x, LoRA):
      out = self.lora_spec(ps, x)
      self._record(ps, x, out)
      return out
    if isinstance(x, Trainable):
      out = Trainable(self.array_spec(ps, x.value))
      self._record(ps, x, out)
      return out
    if boxes.is_box(x):
      value, spec, mesh = boxes.value_and_spec(x, self.rules)
      if isinstance(value, LoRA):
        out = self.lora_spec(ps, value, spec, mesh)
      elif isinstance(value, Trainable):
        out = Trainable(self.array_spec(ps, value.value, spec, mesh))
      else:
        out = self.array_spec(ps, value, spec, mesh)
      self._record(ps, value, out)
      if self.same_structure or boxes.is_nnx_variable(x):  # NNX keeps its variables (as nnx does)
        return boxes.rebox(x, out)
      return out  # a Linen box is dropped (as nn.get_partition_spec does)
    if isinstance(x, (PartitionSpec, jax.sharding.Sharding)):
      return x
    if isinstance(x, LoRAStack):  # the adapters as one adapter's, unsharded along the stack
      w_spec = self.array_spec(ps, x.w) if x.w is not None else None
      a_spec, b_spec = (PartitionSpec(), PartitionSpec()) if x.a is None or x.w is None else (
          adapter_specs(tuple(w_spec), x.a_axes, x.stack, len(x.shape)))
      def ins(sp, n):  # one adapter's spec with the (unsharded) adapter axis put in
        t = _pad(sp, n - 1)
        return _trim(PartitionSpec(*t[:x.stack], None, *t[x.stack:]))
      if isinstance(x.w, Quantized):
        w_spec = quantized_specs(tuple(w_spec), x.w)
      rep = lambda v: None if v is None else PartitionSpec()
      return dataclasses.replace(
          x, w=w_spec, a=None if x.a is None else ins(a_spec, x.a.ndim),
          b=None if x.b is None else ins(b_spec, x.b.ndim), alphas=rep(x.alphas),
          ranks=rep(x.ranks), ids=rep(x.ids))
    if isinstance(x, Quantized):
      out = quantized_specs(tuple(self.array_spec(ps, x)), x)
      self._record(ps, x, out)
      return out
    out = self.array_spec(ps, x)
    self._record(ps, x, out)
    return out

  def run(self, tree):
    return jax.tree_util.tree_map_with_path(self.node, tree, is_leaf=_is_stop)


def partition_specs(tree: Any, *, rules: Sequence[tuple[str, Any]] | None = None,
                    base: Any = None, adapters: str = "derived") -> Any:
  """The `PartitionSpec` of every array in a jlora tree, adapters derived from their weights.

  Args:
    tree: a jlora tree (or any parameter tree): concrete sharded arrays,
      `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`), Flax Linen boxes
      or NNX variables, or one half of `jlora.split` (the trainable half then
      keeps the adapters' own layout, unless `base` or boxes give the weight's).
    rules: logical-axis rules `[(logical_name, mesh_axes), ...]` for
      `nn.LogicallyPartitioned` boxes and NNX `sharding_rules` (default: the
      box's own rules, then the active `nn.logical_axis_rules` context).
    base: optional specs of the base weights (`PartitionSpec` or
      `NamedSharding` leaves keyed like `jlora.base(tree)`), for weights that
      carry no sharding themselves.
    adapters: `"derived"` (default): `a` and `b` follow `w` as described in
      the module docstring; `"replicated"`: every adapter is replicated (`P()`),
      which trades the adapters' memory for no adapter communication in the
      forward pass.

  Returns:
    A tree of the same structure: each `LoRA` leaf becomes `LoRA(w=spec,
    a=spec, b=spec)`, each array its spec, `None` holes stay; Linen boxes are
    dropped (as `nn.get_partition_spec` does) and NNX variables kept (as
    `nnx.get_partition_spec` does), so the result fits `jax.jit`'s shardings
    for the unboxed Linen tree and for the NNX state.

  Raises:
    ValueError: a spec with more entries than its array has axes (naming the
      path), or an unknown `adapters`.

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> from jax.sharding import PartitionSpec as P
    >>> w = jax.ShapeDtypeStruct((2, 8, 16), jnp.float32)
    >>> t = jax.eval_shape(lambda p: jlora.apply(p, rank=4, stacked="layers"),
    ...                    {"layers": {"q_proj": w}})
    >>> base = {"layers": {"q_proj": P(None, "fsdp", "tensor")}}
    >>> s = jlora.sharding.partition_specs(t, base=base)
    >>> tuple(s["layers"]["q_proj"].a), tuple(s["layers"]["q_proj"].b)
    ((None, 'fsdp'), (None, None, 'tensor'))
  """
  return _Walker(rules, base, adapters).run(tree)


def _find_mesh(walker: _Walker, mesh):
  if mesh is not None:
    return mesh
  if walker.mesh is not None:
    return walker.mesh
  ctx = compat.get_mesh()
  return ctx if isinstance(ctx, Mesh) else None


def named(specs: Any, mesh: Mesh) -> Any:
  """Each `PartitionSpec` of `specs` as a `NamedSharding` on `mesh`."""
  return jax.tree_util.tree_map(
      lambda s: NamedSharding(mesh, s) if isinstance(s, PartitionSpec) else s, specs,
      is_leaf=lambda x: isinstance(x, PartitionSpec))


_NO_MESH_FIX = ("Pass one, e.g. jlora.sharding.shardings(tree, jax.make_mesh((2, 4), ('data', "
                "'fsdp'))), or call it inside `with jax.set_mesh(mesh):`.")


def tree_shardings(tree: Any, mesh: Mesh | None, *, rules=None, base=None,
                   adapters: str = "derived", who: str = "jlora.sharding.shardings",
                   fix: str = _NO_MESH_FIX, same_structure: bool = False) -> tuple[Any, Mesh]:
  """`(NamedSharding tree, mesh)`: `shardings` for callers that name themselves in errors.

  The mesh is `mesh`, else the one of the tree's own sharded arrays, else the one set
  with `jax.set_mesh`; every spec is checked to fit it. With `same_structure`, the
  result has `tree`'s structure (Linen boxes kept, `P()` for leaves that are not
  arrays), as `optax.tree_map_params` needs beside an optimizer state.
  """
  walker = _Walker(rules, base, adapters, same_structure=same_structure)
  specs = walker.run(tree)
  m = _find_mesh(walker, mesh)
  if m is None:
    raise ValueError(f"{who}: no mesh: the tree holds no array with a NamedSharding and no "
                     f"mesh is set. {fix}")
  for ps, adapter, shape, spec in walker.seen:
    check_layout(ps, adapter, shape, spec, m, who)
  return named(specs, m), m


def shardings(tree: Any, mesh: Mesh | None = None, *,
              rules: Sequence[tuple[str, Any]] | None = None, base: Any = None,
              adapters: str = "derived") -> Any:
  """`NamedSharding`s for a jlora tree, ready for `jax.jit` and `jax.device_put`.

  The specs are `jlora.sharding.partition_specs(tree, rules=..., base=...,
  adapters=...)` on `mesh`, by default the mesh of the tree's own sharded
  arrays, else the one set with `jax.set_mesh`.

  Raises:
    ValueError: no mesh was given and none could be found; or a spec names an
      axis the mesh lacks, or splits an axis into parts that do not divide its
      size (the message names the path and the fix).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> from jax.sharding import PartitionSpec as P, NamedSharding
    >>> mesh = jax.make_mesh((1, 1), ("fsdp", "tensor"))
    >>> w = jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, P("fsdp", "tensor")))
    >>> t = jlora.apply({"q_proj": w}, rank=2)
    >>> sh = jlora.sharding.shardings(t)
    >>> tuple(sh["q_proj"].a.spec), sh["q_proj"].b.spec == t["q_proj"].b.sharding.spec
    (('fsdp',), True)
  """
  return tree_shardings(tree, mesh, rules=rules, base=base, adapters=adapters)[0]


def spec_str(spec) -> str:
  """`P('fsdp', None)`: a spec written the same way on every JAX release."""
  return "P(" + ", ".join(map(repr, tuple(spec))) + ")"


def _entry_names(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def check_layout(ps, adapter, shape, spec, mesh, who):
  """Raises naming `ps` unless every axis `spec` names is in `mesh` and divides its size."""
  sizes = dict(mesh.shape)
  for i, entry in enumerate(tuple(spec)):
    names = _entry_names(entry)
    for name in names:
      if name not in sizes:
        close = difflib.get_close_matches(str(name), list(map(str, sizes)), n=1)
        raise ValueError(
            f"{who}: the spec {spec_str(spec)} at {ps!r} names {name!r}, which is not an axis "
            f"of the mesh {tuple(mesh.axis_names)}"
            f"{f' (did you mean {close[0]!r}?)' if close else ''}. Name axes of the mesh (or "
            f"None) in base=, rules= or the array's own sharding.")
    n = math.prod(sizes[name] for name in names)
    if i < len(shape) and shape[i] % n:
      over = repr(names[0]) if len(names) == 1 else repr(names)
      head = (f"{who}: the {'adapter' if adapter else 'array'} at {ps!r} (shape {shape}) cannot "
              f"take {spec_str(spec)}: it splits axis {i} (size {shape[i]}) over {over} ({n} "
              f"devices), which does not divide it.")
      if adapter:
        w = ps.rsplit("/", 1)[0]
        raise ValueError(
            f"{head} The adapters follow their weight's spec (the weight at {w!r} has this "
            f"axis too): give the weight a spec whose axes divide its sizes (base=, rules= or "
            f"its sharding), or pass adapters='replicated' to replicate the adapters.")
      raise ValueError(
          f"{head} Give that axis mesh axes whose device count divides {shape[i]} (in base=, "
          f"rules= or the array's own sharding), or leave it unsharded (None).")


def abstract(tree: Any, shardings: Any) -> Any:
  """`jax.ShapeDtypeStruct`s with shardings: targets for Orbax restore and `jit(...).lower`.

  Args:
    tree: arrays or shape/dtype structs (a jlora tree, a half of it, an
      optimizer state).
    shardings: a tree of the same structure of `Sharding`s (from
      `jlora.sharding.shardings` or `jlora.sharding.state_shardings`).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> mesh = jax.make_mesh((1,), ("fsdp",))
    >>> t = jlora.apply({"q_proj": jnp.ones((8, 16))}, rank=2)
    >>> target = jlora.sharding.abstract(t, jlora.sharding.shardings(t, mesh))
    >>> target["q_proj"].a.shape, tuple(target["q_proj"].a.sharding.spec)  # replicated
    ((8, 2), ())
  """
  def f(x, s):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)

  return jax.tree_util.tree_map(f, tree, shardings)


def path_specs(tree: Any, rules: Sequence[tuple[str, Any]] | Mapping[str, Any]) -> Any:
  """Partition specs chosen by regular expressions on '/'-joined key paths.

  For models without sharding metadata (such as `recipes.models.llama`): the
  first rule whose pattern is found in a leaf's path gives its spec; leaves no
  rule matches are replicated. The result serves as `base=` for
  `jlora.sharding.partition_specs`/`shardings`, or, wrapped in `NamedSharding`s,
  as the `out_shardings` of the model's init or of `jax.device_put`.

  Args:
    tree: the base parameter tree (arrays or shape/dtype structs).
    rules: `[(pattern, PartitionSpec), ...]` or a dict, tried in order.

  Raises:
    ValueError: a spec has more entries than the leaf has axes (naming the path).

  Example:
    >>> import jax.numpy as jnp, jlora
    >>> from jax.sharding import PartitionSpec as P
    >>> params = {"layers": {"q_proj": {"kernel": jnp.ones((2, 8, 16))}},
    ...           "norm": {"scale": jnp.ones(8)}}
    >>> specs = jlora.sharding.path_specs(params, [(r"layers/.*kernel", P(None, "fsdp", "tensor"))])
    >>> tuple(specs["layers"]["q_proj"]["kernel"]), tuple(specs["norm"]["scale"])
    ((None, 'fsdp', 'tensor'), ())
  """
  items = list(rules.items()) if isinstance(rules, Mapping) else list(rules)
  compiled = [(re.compile(p), s) for p, s in items]

  def f(path, x):
    if x is None or not hasattr(x, "shape"):
      return None
    ps = P.path_str(path)
    for rx, spec in compiled:
      if rx.search(ps):
        spec = tuple(spec)
        if len(spec) > len(x.shape):
          raise ValueError(
              f"jlora.sharding.path_specs: the rule {rx.pattern!r} gives {PartitionSpec(*spec)} to "
              f"{ps!r} of shape {tuple(x.shape)}: more entries than axes. Give a spec of at "
              f"most {len(x.shape)} entries, or a narrower pattern.")
        return PartitionSpec(*spec)
    return PartitionSpec()

  return jax.tree_util.tree_map_with_path(f, tree)


