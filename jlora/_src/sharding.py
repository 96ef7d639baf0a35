"""Shardings of jlora trees on a device mesh: adapters follow their weights.

A `LoRA` leaf's adapters take their layout from the frozen weight `w`: `a`
gets `w`'s partition-spec entries for the stack axes and the A axes (`a_axes`)
and an unsharded rank axis, `b` the entries for the stack axes, an unsharded
rank axis, then the B axes. For a `(fsdp, tensor)`-sharded `(in, out)` kernel::

    w  P('fsdp', 'tensor')     (in, out)
    a  P('fsdp', None)         (in, r)
    b  P(None, 'tensor')       (r, out)

so the adapter branch `(x @ a) @ b` runs on the shards of `x` and of the output
that the base matmul `x @ w` already uses, and the adapters' gradients are
reduced across the axes that `w`'s would be, at adapter size.

Where a weight's layout comes from, first match wins:

1. the array itself: a `jax.Array` or `jax.ShapeDtypeStruct` with a
   `NamedSharding` (what `jax.device_put`, `jax.jit(..., out_shardings=...)`
   and `jax.eval_shape` of sharded inputs give);
2. Flax metadata around it: Linen `nn.Partitioned` / `nn.LogicallyPartitioned`
   boxes (logical names resolved with `rules`, the box's own rules, or the
   active `nn.logical_axis_rules`), NNX variables with `out_sharding`
   metadata (`nnx.with_partitioning`);
3. `base=`: a tree of `PartitionSpec`/`NamedSharding` for the base
   parameters, e.g. `nn.get_partition_spec(abstract_variables)["params"]` or
   `jlora.path_specs(params, rules)`;
4. otherwise the leaf is replicated (`P()`).

Multi-host (TPU pods, several GPU hosts): call
`jax.distributed.initialize()` first on every process (no arguments on Cloud
TPU and under SLURM/Open MPI; else `coordinator_address`, `num_processes`,
`process_id`), then build one global `Mesh` over `jax.devices()` and run the
same program everywhere. When a weight's mesh spans several hosts,
`jlora.apply` creates its adapters under `jax.jit` with the derived
`out_shardings`, so every process holds only its own shards; feed each process's slice of the
batch with `jax.make_array_from_process_local_data(batch_sharding, local)`.
A Colab or Kaggle TPU v2/v3-8 is one host with 8 devices: a mesh such as
`jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"))` works as is there.
"""

from __future__ import annotations

import difflib
import functools
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jlora._src import compat
from jlora._src import paths as P
from jlora._src.leaf import LoRA, Trainable, is_node
from jlora._src.optim import optimizer, require_trainable, structure_difference, unalias, update
from jlora._src.tree import combine, split

ADAPTERS = ("derived", "replicated")


# --------------------------------------------------------------------------- flax boxes


def _linen_box_type():
  try:
    from flax.core import meta
  except ImportError:  # flax is optional
    return ()
  return (meta.AxisMetadata,)


def _nnx_var_type():
  try:
    from flax.nnx import variablelib
  except ImportError:
    return ()
  return (variablelib.Variable,)


def _is_box(x) -> bool:
  return isinstance(x, _linen_box_type() + _nnx_var_type())


def _is_stop(x) -> bool:
  return x is None or is_node(x) or _is_box(x) or isinstance(x, (PartitionSpec, jax.sharding.Sharding))


def _resolve_logical(names, rules, local_rules=None):
  import flax.linen as nn
  if rules is None and local_rules is None:
    return tuple(nn.logical_to_mesh_axes(names))
  rules = tuple(rules or ()) + tuple(local_rules or ())
  return tuple(nn.logical_to_mesh_axes(names, rules))


def _box_value_and_spec(box, rules):
  """`(value, spec or None, mesh or None)` of a Linen box or an NNX variable."""
  if isinstance(box, _nnx_var_type()):
    md = box.get_metadata()
    value = compat.variable_value(box)
    sh = md.get("out_sharding") or md.get("sharding_names") or md.get("sharding")
    mesh = md.get("mesh")
    if isinstance(sh, NamedSharding):
      return value, tuple(sh.spec), sh.mesh
    if sh:
      names = tuple(sh)
      if rules is not None or md.get("sharding_rules"):
        names = _resolve_logical(names, rules, md.get("sharding_rules"))
      return value, names, mesh
    return value, None, mesh
  value = box.unbox(apply_constraint=False) if _accepts_constraint(box) else box.value
  names = getattr(box, "names", None)
  mesh = getattr(box, "mesh", None)
  if names is None:
    return value, None, mesh
  if type(box).__name__ == "LogicallyPartitioned":
    names = _resolve_logical(names, rules, getattr(box, "rules", None))
  return value, tuple(names), mesh


def _accepts_constraint(box) -> bool:
  try:
    import inspect
    return "apply_constraint" in inspect.signature(box.unbox).parameters
  except (TypeError, ValueError):
    return False


# --------------------------------------------------------------------------- specs


def _pad(spec, ndim: int) -> tuple:
  spec = tuple(spec)
  if len(spec) > ndim:
    raise ValueError(f"partition spec {PartitionSpec(*spec)} has more entries than the "
                     f"array's {ndim} axes")
  return spec + (None,) * (ndim - len(spec))


def _own_spec(x):
  """`(spec, mesh)` from the array's own `NamedSharding`, or `(None, None)`."""
  sh = getattr(x, "sharding", None) if not isinstance(x, jax.core.Tracer) else None
  if isinstance(sh, NamedSharding):
    return tuple(sh.spec), sh.mesh
  return None, None


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
    >>> from jax.sharding import PartitionSpec as P
    >>> a, b = adapter_specs(P(None, "fsdp", "tensor"), a_axes=(0,), stack=1, ndim=3)
    >>> a == P(None, "fsdp"), b == P(None, None, "tensor")
    (True, True)
  """
  ws = _pad(w_spec, ndim)
  s, k = ws[:stack], ws[stack:]
  a = PartitionSpec(*s, *(k[i] for i in a_axes), None)
  b = PartitionSpec(*s, None, *(k[i] for i in range(len(k)) if i not in a_axes))
  return _trim(a), _trim(b)


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
      _is_box(x))[0]:
    if _is_box(x):
      x = compat.variable_value(x)
    if isinstance(x, NamedSharding):
      x = x.spec
    if isinstance(x, PartitionSpec):
      out[P.path_str(path)] = tuple(x)
  return out


class _Walker:
  """Computes a `PartitionSpec` tree (and the mesh it finds) for a jlora tree."""

  def __init__(self, rules, base, adapters):
    if adapters not in ADAPTERS:
      raise ValueError(f"jlora.partition_specs: adapters={adapters!r} is not one of "
                       f"{ADAPTERS}.")
    self.rules, self.adapters = rules, adapters
    self.base = _base_lookup(base)
    self.mesh = None
    self.seen: list[tuple[str, str | None, tuple[int, ...], PartitionSpec]] = []

  def _record(self, ps, value, spec):
    """Notes `(path, adapter name or None, shape, spec)` of each array laid out, for checks."""
    if isinstance(value, LoRA) and isinstance(spec, LoRA):
      for name in ("w", "a", "b"):
        v, s = getattr(value, name), getattr(spec, name)
        if isinstance(s, PartitionSpec) and hasattr(v, "shape"):
          self.seen.append((f"{ps}/{name}", name if name != "w" else None, tuple(v.shape), s))
    elif isinstance(value, Trainable) and isinstance(spec, Trainable):
      self._record(ps, value.value, spec.value)
    elif isinstance(spec, PartitionSpec) and hasattr(value, "shape"):
      self.seen.append((ps, None, tuple(value.shape), spec))

  def _note_mesh(self, mesh):
    if self.mesh is None and isinstance(mesh, Mesh):
      self.mesh = mesh

  def array_spec(self, ps, x, meta_spec=None, meta_mesh=None) -> PartitionSpec | None:
    if x is None:
      return None
    if not hasattr(x, "shape"):
      return None
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
      raise ValueError(f"jlora.partition_specs: at {ps!r} (shape {tuple(x.shape)}): {e}. Give "
                       f"one entry per axis (None for an unsharded axis).") from None

  def lora_spec(self, ps, x: LoRA, meta_spec=None, meta_mesh=None) -> LoRA:
    shape = x.shape
    ndim = len(shape)
    w_spec = self.array_spec(ps, x.w, meta_spec, meta_mesh) if x.w is not None else None
    if x.w is None:  # the trainable half: no weight to derive from; the adapters' own layout
      a_spec = self.array_spec(ps + ".a", x.a) if x.a is not None else None
      b_spec = self.array_spec(ps + ".b", x.b) if x.b is not None else None
      if meta_spec is not None or ps in self.base:
        a_spec, b_spec = self._derived(ps, meta_spec, x, ndim)
      return LoRA(None, a_spec if x.a is not None else None, b_spec if x.b is not None else None,
                  x.alpha, x.a_axes, x.stack, x.rslora)
    a_spec, b_spec = self._derived(ps, tuple(w_spec), x, ndim)
    return LoRA(w_spec, a_spec if x.a is not None else None, b_spec if x.b is not None else None,
                x.alpha, x.a_axes, x.stack, x.rslora)

  def _derived(self, ps, w_spec, x, ndim):
    if self.adapters == "replicated":
      return PartitionSpec(), PartitionSpec()
    if w_spec is None:
      w_spec = self.base.get(ps, ())
    try:
      return adapter_specs(w_spec, x.a_axes, x.stack, ndim)
    except ValueError as e:
      raise ValueError(f"jlora.partition_specs: the weight at {ps!r} (shape {x.shape}): {e}. "
                       f"Give one entry per axis, stack axes included.") from None

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
    if _is_box(x):
      value, spec, mesh = _box_value_and_spec(x, self.rules)
      if isinstance(value, LoRA):
        out = self.lora_spec(ps, value, spec, mesh)
      elif isinstance(value, Trainable):
        out = Trainable(self.array_spec(ps, value.value, spec, mesh))
      else:
        out = self.array_spec(ps, value, spec, mesh)
      self._record(ps, value, out)
      if isinstance(x, _nnx_var_type()):  # NNX keeps its variables in the tree (as nnx does)
        return x.replace(out)
      return out  # a Linen box is dropped (as nn.get_partition_spec does)
    if isinstance(x, (PartitionSpec, jax.sharding.Sharding)):
      return x
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
    >>> s = jlora.partition_specs(t, base={"layers": {"q_proj": P(None, "fsdp", "tensor")}})
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


def _to_named(specs, mesh):
  return jax.tree_util.tree_map(
      lambda s: NamedSharding(mesh, s) if isinstance(s, PartitionSpec) else s, specs,
      is_leaf=lambda x: isinstance(x, PartitionSpec))


def shardings(tree: Any, mesh: Mesh | None = None, *,
              rules: Sequence[tuple[str, Any]] | None = None, base: Any = None,
              adapters: str = "derived") -> Any:
  """`NamedSharding`s for a jlora tree, ready for `jax.jit` and `jax.device_put`.

  The specs are `jlora.partition_specs(tree, rules=..., base=..., adapters=...)`
  on `mesh`, by default the mesh of the tree's own sharded arrays, else the
  one set with `jax.set_mesh`.

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
    >>> sh = jlora.shardings(t)
    >>> tuple(sh["q_proj"].a.spec), sh["q_proj"].b.spec == t["q_proj"].b.sharding.spec
    (('fsdp',), True)
  """
  return _shardings(tree, mesh, rules, base, adapters, "jlora.shardings")


def _shardings(tree, mesh, rules, base, adapters, who: str):
  specs, m = _specs_and_mesh(
      tree, mesh, rules, base, adapters, who,
      "Pass one, e.g. jlora.shardings(tree, jax.make_mesh((2, 4), ('data', 'fsdp'))), or call "
      "it inside `with jax.set_mesh(mesh):`.")
  return _to_named(specs, m)


def _specs_and_mesh(tree, mesh, rules, base, adapters, who: str, fix: str):
  """The tree's PartitionSpecs and the mesh they live on (given, or found in the tree),
  checked to fit that mesh."""
  walker = _Walker(rules, base, adapters)
  specs = walker.run(tree)
  m = _find_mesh(walker, mesh)
  if m is None:
    raise ValueError(f"{who}: no mesh: the tree holds no array with a NamedSharding and no "
                     f"mesh is set. {fix}")
  for ps, adapter, shape, spec in walker.seen:
    _check_layout(ps, adapter, shape, spec, m, who)
  return specs, m


def _spec_str(spec) -> str:
  """`P('fsdp', None)`: a spec written the same way on every JAX release."""
  return "P(" + ", ".join(map(repr, tuple(spec))) + ")"


def _entry_names(entry) -> tuple[str, ...]:
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _check_layout(ps, adapter, shape, spec, mesh, who):
  """Raises naming `ps` unless every axis `spec` names is in `mesh` and divides its size."""
  sizes = dict(mesh.shape)
  for i, entry in enumerate(tuple(spec)):
    names = _entry_names(entry)
    for name in names:
      if name not in sizes:
        close = difflib.get_close_matches(str(name), list(map(str, sizes)), n=1)
        raise ValueError(
            f"{who}: the spec {_spec_str(spec)} at {ps!r} names {name!r}, which is not an axis "
            f"of the mesh {tuple(mesh.axis_names)}"
            f"{f' (did you mean {close[0]!r}?)' if close else ''}. Name axes of the mesh (or "
            f"None) in base=, rules= or the array's own sharding.")
    n = math.prod(sizes[name] for name in names)
    if i < len(shape) and shape[i] % n:
      over = repr(names[0]) if len(names) == 1 else repr(names)
      head = (f"{who}: the {'adapter' if adapter else 'array'} at {ps!r} (shape {shape}) cannot "
              f"take {_spec_str(spec)}: it splits axis {i} (size {shape[i]}) over {over} ({n} "
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


def _norm_path(path) -> tuple[str, ...]:
  return tuple(P.key_str(k) for k in path
               if not (isinstance(k, jax.tree_util.GetAttrKey) and k.name in P._WRAPPER_KEYS))


def state_shardings(state: Any, tree: Any, mesh: Mesh | None = None, *,
                    rules: Sequence[tuple[str, Any]] | None = None, base: Any = None,
                    adapters: str = "derived") -> Any:
  """Shardings for an optimizer state over a jlora tree (Adam moments mirror the adapters).

  Each array of `state` whose key path ends with the path of an array of
  `tree` and whose shape equals it takes that array's sharding (so the `mu`
  and `nu` of `a` take `a`'s); every other array (step counts, scalars,
  factored statistics) is replicated. This holds for any optax wrapper
  (`chain`, `inject_hyperparams`, `multi_transform` inside `jlora.optimizer`)
  and for a state built from the whole tree or from its trainable half.

  Args:
    state: the optimizer state, concrete or abstract (e.g.
      `jax.eval_shape(step.init, tree)`).
    tree: the jlora tree (or its trainable half) the state belongs to.
    mesh, rules, base, adapters: as in `jlora.shardings`.

  Returns:
    A tree of `NamedSharding` with `state`'s structure.

  Example:
    >>> import jax, jax.numpy as jnp, optax, jlora
    >>> from jax.sharding import PartitionSpec as P, NamedSharding
    >>> mesh = jax.make_mesh((1,), ("fsdp",))
    >>> w = jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, P("fsdp")))
    >>> t = jlora.apply({"q_proj": w}, rank=2)
    >>> tx = jlora.optimizer(optax.adam(1e-3))
    >>> sh = jlora.state_shardings(jax.eval_shape(tx.init, t), t)
    >>> tuple(sh.inner_states["train"].inner_state[0].mu["q_proj"].a.spec)
    ('fsdp',)
  """
  specs, m = _specs_and_mesh(tree, mesh, rules, base, adapters, "jlora.state_shardings",
                             "Pass one: jlora.state_shardings(state, tree, mesh).")
  by_path: dict[tuple[str, ...], tuple[tuple[int, ...], PartitionSpec]] = {}
  arrays = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_box)[0]
  flat_specs = jax.tree_util.tree_flatten_with_path(
      specs, is_leaf=lambda x: isinstance(x, PartitionSpec) or _is_box(x))[0]
  for (pa, x), (_, s) in zip(_unbox_flat(arrays), _unbox_flat(flat_specs)):
    if isinstance(s, PartitionSpec) and hasattr(x, "shape"):
      by_path[_norm_path(pa)] = (tuple(x.shape), s)

  def pick(path, x):
    if x is None or not hasattr(x, "shape"):
      return x
    p = _norm_path(path)
    for k in range(len(p)):
      hit = by_path.get(p[k:])
      if hit is not None and hit[0] == tuple(x.shape):
        return NamedSharding(m, hit[1])
    return NamedSharding(m, PartitionSpec())

  return jax.tree_util.tree_map_with_path(pick, state)


def _unbox_flat(flat):
  """Flattens boxes in a `(path, leaf)` list, so boxed and spec trees line up leaf by leaf."""
  out = []
  for path, x in flat:
    if _is_box(x):
      value = compat.variable_value(x)
      sub = jax.tree_util.tree_flatten_with_path(
          value, is_leaf=lambda y: isinstance(y, PartitionSpec))[0]
      out += [(tuple(path) + tuple(p), y) for p, y in sub]
    else:
      out.append((path, x))
  return out


def abstract(tree: Any, shardings: Any) -> Any:
  """`jax.ShapeDtypeStruct`s with shardings: targets for Orbax restore and `jit(...).lower`.

  Args:
    tree: arrays or shape/dtype structs (a jlora tree, a half of it, an
      optimizer state).
    shardings: a tree of the same structure of `Sharding`s (from
      `jlora.shardings` or `jlora.state_shardings`).

  Example:
    >>> import jax, jax.numpy as jnp, jlora
    >>> mesh = jax.make_mesh((1,), ("fsdp",))
    >>> t = jlora.apply({"q_proj": jnp.ones((8, 16))}, rank=2)
    >>> target = jlora.abstract(t, jlora.shardings(t, mesh))
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
  `jlora.partition_specs`/`jlora.shardings`, or, wrapped in `NamedSharding`s,
  as the `out_shardings` of the model's init or of `jax.device_put`.

  Args:
    tree: the base parameter tree (arrays or shape/dtype structs).
    rules: `[(pattern, PartitionSpec), ...]` or a dict, tried in order.

  Raises:
    ValueError: a spec has more entries than the leaf has axes (naming the path).

  Example:
    >>> import jax.numpy as jnp
    >>> from jax.sharding import PartitionSpec as P
    >>> params = {"layers": {"q_proj": {"kernel": jnp.ones((2, 8, 16))}},
    ...           "norm": {"scale": jnp.ones(8)}}
    >>> specs = path_specs(params, [(r"layers/.*kernel", P(None, "fsdp", "tensor"))])
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
              f"jlora.path_specs: the rule {rx.pattern!r} gives {PartitionSpec(*spec)} to "
              f"{ps!r} of shape {tuple(x.shape)}: more entries than axes. Give a spec of at "
              f"most {len(x.shape)} entries, or a narrower pattern.")
        return PartitionSpec(*spec)
    return PartitionSpec()

  return jax.tree_util.tree_map_with_path(f, tree)


# --------------------------------------------------------------------------- placement


def _make_adapters(key, a_shape, b_shape, dtype, init, lim):
  if init == "he_uniform":
    a = jax.random.uniform(key, a_shape, dtype, -lim, lim)
  else:
    a = jax.random.normal(key, a_shape, dtype) * np.asarray(lim, dtype)
  return a, jax.numpy.zeros(b_shape, dtype)


@functools.lru_cache(maxsize=256)
def _adapter_maker(a_sharding, b_sharding):
  # out_shardings (not with_sharding_constraint) works on Auto and Explicit meshes alike.
  return jax.jit(_make_adapters, static_argnums=(1, 2, 3, 4, 5),
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


def init_adapters_like(w, key, a_shape, b_shape, dtype, init, lim, a_axes, stack):
  """Creates `(a, b)` laid out after `w` if it is a sharded array, else None.

  `a` is `uniform(-lim, lim)` (`init="he_uniform"`) or `normal * lim`
  (`init="gaussian"`), `b` zeros, with the values of the unsharded init. On
  one host they are made and then placed with `jax.device_put`; when the mesh
  spans several hosts they are made under `jax.jit` with the derived
  `out_shardings`, so each process creates only its own shards.
  """
  shs = adapter_shardings_like(w, a_axes, stack)
  if shs is None:
    return None
  args = (key, tuple(a_shape), tuple(b_shape), np.dtype(dtype), init, float(lim))
  if all(s.is_fully_addressable for s in shs):  # one host: make, then lay out (no compile)
    a, b = _make_adapters(*args)
    return jax.device_put(a, shs[0]), jax.device_put(b, shs[1])
  return _adapter_maker(*shs)(*args)  # several hosts: each makes only its own shards


# --------------------------------------------------------------------------- train step

DEFAULT_BATCH_AXES = ("data", "fsdp")
_WHO = "jlora.sharded_train_step"


def _batch_sharding(mesh, spec, x):
  if not hasattr(x, "shape"):
    return None
  s = tuple(spec)[:len(x.shape)]
  return NamedSharding(mesh, PartitionSpec(*s))


def _batch_axes_of(batch_axes: Any, mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes a batch's leading axis is split over, checked against the mesh.

  `None` or `()` replicate the batch on purpose; the default `("data", "fsdp")` keeps
  those of the two the mesh has and needs one at least; any other name must be an axis
  of the mesh. Never replicates the batch silently.
  """
  ax = () if batch_axes is None else (batch_axes,) if isinstance(batch_axes, str) else \
      tuple(batch_axes)
  names = tuple(mesh.axis_names)
  if len(set(ax)) != len(ax):
    raise ValueError(f"{_WHO}: batch_axes={ax} names an axis twice; name each mesh axis once.")
  if ax == DEFAULT_BATCH_AXES:
    present = tuple(a for a in ax if a in names)
    if not present:
      raise ValueError(
          f"{_WHO}: the mesh's axes {names} hold none of the default batch axes "
          f"{DEFAULT_BATCH_AXES}, so every device would get the whole batch. Name the mesh axes "
          f"to split the batch's leading axis over, e.g. batch_axes=({names[0]!r},), or pass "
          f"batch_axes=() to give every device the whole batch on purpose (tensor parallelism "
          f"alone).")
    return present
  for a in ax:
    if a not in names:
      close = difflib.get_close_matches(str(a), list(map(str, names)), n=1)
      raise ValueError(
          f"{_WHO}: batch_axes names {a!r}, which is not an axis of the mesh {names}"
          f"{f' (did you mean {close[0]!r}?)' if close else ''}. Name axes of the mesh, or "
          f"pass batch_axes=() to give every device the whole batch on purpose.")
  return ax


def _abstract_leaf(x):
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  return x


class ShardedTrainStep:
  """A jitted LoRA train step with explicit shardings: nothing changes layout between steps.

  `step = jlora.sharded_train_step(loss_fn, tx, mesh)`; `opt_state =
  step.init(tree)` (the state is created sharded, each moment laid out as its
  adapter); `tree, opt_state, loss = step(tree, opt_state, *batch)`. The
  compiled step takes the trainable half, the state and the frozen half with
  their shardings, each batch array split on its leading axis over
  `batch_axes` (arrays laid out otherwise, e.g. on one device, are moved there
  first), and returns the trainable half and the state with the very
  same shardings (so donation reuses their buffers) and the loss replicated;
  the frozen half is neither donated nor returned, so the new tree holds the
  same frozen arrays. The tree and the state must keep the structure `init`
  was given (each call checks, naming the first differing path); tied weights
  are handled as in `jlora.train_step`.

  Attributes:
    mesh: the mesh.
    shardings: the tree's `NamedSharding`s (set by `init`).
    state_shardings: the optimizer state's (set by `init`).
  """

  def __init__(self, loss_fn: Callable[..., Any], tx: optax.GradientTransformation,
               mesh: Mesh, *, batch_axes: Any = DEFAULT_BATCH_AXES, has_aux: bool = False,
               donate: bool = True, rules=None, base=None, adapters: str = "derived"):
    self.loss_fn, self.tx = loss_fn, optimizer(tx)
    self.mesh, self.batch_axes = mesh, batch_axes
    self._batch_axes = _batch_axes_of(batch_axes, mesh)
    self._batch_devices = math.prod(dict(mesh.shape)[a] for a in self._batch_axes)
    self.has_aux, self.donate = has_aux, donate
    self._kw = dict(rules=rules, base=base, adapters=adapters)
    self.shardings = self.state_shardings = None
    self._tree_shape = self._state_shape = self._defs = None
    self._steps: dict = {}
    functools.update_wrapper(self, loss_fn, updated=())

  def batch_spec(self) -> PartitionSpec:
    """The spec of a batch array's leading axis: the `batch_axes` present in the mesh."""
    ax = self._batch_axes
    return PartitionSpec(ax if len(ax) > 1 else (ax[0] if ax else None))

  def init(self, tree: Any) -> Any:
    require_trainable(tree, _WHO)
    self.shardings = _shardings(tree, self.mesh, who=_WHO, **self._kw)
    trainable = split(tree).trainable
    state_shape = jax.eval_shape(self.tx.init, trainable)
    self.state_shardings = state_shardings(state_shape, tree, self.mesh, **self._kw)
    self._tree_shape = jax.tree_util.tree_map(_abstract_leaf, tree)
    self._state_shape = state_shape
    self._defs = (jax.tree_util.tree_structure(tree), jax.tree_util.tree_structure(state_shape))
    self._steps.clear()
    return jax.jit(self.tx.init, out_shardings=self.state_shardings)(trainable)

  def _impl(self, trainable, opt_state, frozen, args, kwargs):
    return update(self.loss_fn, self.tx, self.has_aux, trainable, opt_state, frozen, args, kwargs,
                  who=_WHO)

  def _check(self, tree, opt_state, args, kwargs):
    """Raises, naming the path, unless the call fits what `init` and the mesh fixed."""
    if self.shardings is None:
      raise ValueError(f"{_WHO}: call step.init(tree) first; it fixes the shardings of the tree "
                       f"and of the optimizer state.")
    for got, want, want_def, what, fix in (
        (tree, self._tree_shape, self._defs[0], "the tree", "call opt_state = step.init(tree) "
         "for the new tree (it fixes new shardings), or step the tree init was given"),
        (opt_state, self._state_shape, self._defs[1], "the optimizer state", "pass the state "
         "step.init(tree) returned (or one restored onto jlora.abstract(state, "
         "step.state_shardings))")):
      if jax.tree_util.tree_structure(got) != want_def:
        path, got_node, want_node = structure_difference(got, want) or ("", "?", "?")
        where = repr(path) if path else "the root"
        raise ValueError(
            f"{_WHO}: {what} does not have the structure step.init(tree) was given: at {where} "
            f"it holds {got_node} where that {what.split()[-1]} held {want_node}. Either {fix}.")
    n = self._batch_devices
    if n > 1:
      for path, x in jax.tree_util.tree_flatten_with_path((args, kwargs))[0]:
        shape = tuple(getattr(x, "shape", ()))
        if shape and shape[0] % n:
          name = ("args" if path[0].idx == 0 else "kwargs") + jax.tree_util.keystr(path[1:])
          ax = self._batch_axes
          over = repr(ax[0]) if len(ax) == 1 else repr(ax)
          raise ValueError(
              f"{_WHO}: the batch array {name} (shape {shape}) is split on its leading axis "
              f"over {over} ({n} devices), and {shape[0]} is not a multiple of {n}. Give every "
              f"batch array a leading size that is a multiple of {n} (drop or pad the last "
              f"batch), or pass batch_axes= naming fewer mesh axes.")

  def _compiled(self, args, kwargs):
    # Keyed by structure and by which leaves have axes: a scalar's sharding is P(), an
    # array's splits its leading axis, so the two cannot share a compiled step.
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
    key = (treedef, tuple(None if not hasattr(x, "shape") else len(x.shape) > 0 for x in leaves))
    if key not in self._steps:
      spec = self.batch_spec()
      batch_sh = jax.tree_util.tree_map(lambda x: _batch_sharding(self.mesh, spec, x),
                                        (args, kwargs))
      t_sh, f_sh = split(self.shardings)
      out = (t_sh, self.state_shardings, NamedSharding(self.mesh, PartitionSpec()))
      if self.has_aux:
        out = (*out, None)
      step = jax.jit(self._impl, in_shardings=(t_sh, self.state_shardings, f_sh, *batch_sh),
                     out_shardings=out, donate_argnums=(0, 1) if self.donate else ())
      self._steps[key] = step, batch_sh
    return self._steps[key]

  def _place(self, trainable, opt_state, frozen, batch, batch_sh):
    """Everything the step takes, moved to its shardings where they differ (else as it is).

    Of the batch, only committed jax arrays move (`jax.jit` refuses them laid out
    otherwise); host data and uncommitted arrays go to `jax.jit` as they are.
    """
    t_sh, f_sh = split(self.shardings)

    def move(x, s):
      if (isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and s is not None
          and x.committed and not x.sharding.is_equivalent_to(s, x.ndim)):
        return jax.device_put(x, s)
      return x

    batch = jax.tree_util.tree_map(move, batch, batch_sh)
    return (jax.device_put(trainable, t_sh), jax.device_put(opt_state, self.state_shardings),
            jax.device_put(frozen, f_sh), batch)

  def __call__(self, tree, opt_state, *args, **kwargs):
    self._check(tree, opt_state, args, kwargs)
    step, batch_sh = self._compiled(args, kwargs)
    trainable, frozen = split(tree)
    if self.donate:
      trainable, opt_state = unalias(trainable, opt_state, frozen, (args, kwargs), _WHO)
    trainable, opt_state, frozen, (args, kwargs) = self._place(
        trainable, opt_state, frozen, (args, kwargs), batch_sh)
    trainable, opt_state, *out = step(trainable, opt_state, frozen, args, kwargs)
    return (combine(trainable, frozen), opt_state, *out)

  def lower(self, tree, opt_state, *args, **kwargs):
    """The lowered step (`.compile().as_text()` shows the partitioned HLO)."""
    self._check(tree, opt_state, args, kwargs)
    step, batch_sh = self._compiled(args, kwargs)
    trainable, frozen = split(tree)
    trainable, opt_state, frozen, (args, kwargs) = self._place(
        trainable, opt_state, frozen, (args, kwargs), batch_sh)
    return step.lower(trainable, opt_state, frozen, args, kwargs)


def sharded_train_step(loss_fn: Callable[..., Any], tx: optax.GradientTransformation,
                       mesh: Mesh, *, batch_axes: Any = DEFAULT_BATCH_AXES,
                       has_aux: bool = False, donate: bool = True,
                       rules: Sequence[tuple[str, Any]] | None = None, base: Any = None,
                       adapters: str = "derived") -> ShardedTrainStep:
  """A LoRA train step on a device mesh (data, FSDP and tensor parallel alike).

  The frozen weights keep the layout they have (or the one `base`/`rules`/Flax
  metadata give), the adapters follow them (`jlora.partition_specs`), the
  optimizer state follows the adapters, and the batch is split on its leading
  axis over `batch_axes` (default: the `data` and `fsdp` axes the mesh has, as
  in FSDP the weights' shards and the batch's share devices).

  Args:
    loss_fn: `loss_fn(tree, *batch) -> loss` (or `(loss, aux)`), as for
      `jlora.train_step`; use `jlora.lora(model.apply)` inside it so the
      backward pass never forms a full weight gradient.
    tx: an optax transformation (wrapped with `jlora.optimizer`).
    mesh: the device mesh (on several hosts: one global mesh, after
      `jax.distributed.initialize()`).
    batch_axes: the mesh axes the batch's leading axis is split over: a name
      or a tuple of names, each an axis of the mesh; `()` gives every device
      the whole batch (tensor parallelism alone). The default
      `("data", "fsdp")` takes those of the two the mesh has; a mesh with
      neither is an error, as is a name the mesh lacks (the batch is never
      replicated silently). Every batch array's leading size must be a
      multiple of the product of these axes' sizes.
    has_aux, donate: as for `jlora.train_step`.
    rules, base, adapters: as for `jlora.shardings`.

  Returns:
    A `ShardedTrainStep`: `init(tree) -> opt_state`, then
    `step(tree, opt_state, *batch) -> (tree, opt_state, loss[, aux])`.

  Raises:
    ValueError: `batch_axes` names an axis the mesh lacks, or the mesh has
      none of the default ones; at `init`, a spec that does not fit the mesh
      (naming the path); at a step, a tree or state whose structure differs
      from the one `init` was given, or a batch array whose leading size the
      batch axes do not divide (each naming the path and the fix).

  Example:
    >>> import jax, jax.numpy as jnp, optax, jlora
    >>> from jax.sharding import PartitionSpec as P, NamedSharding
    >>> mesh = jax.make_mesh((1, 1), ("data", "fsdp"))
    >>> w = jax.device_put(jax.random.normal(jax.random.key(0), (4, 6)),
    ...                    NamedSharding(mesh, P("fsdp")))
    >>> t = jlora.apply({"q_proj": w}, rank=2)
    >>> loss = lambda p, x: jnp.mean((jlora.lora(lambda q, x: x @ q["q_proj"])(p, x) - 1) ** 2)
    >>> step = jlora.sharded_train_step(loss, optax.adam(1e-2), mesh)
    >>> state = step.init(t)
    >>> t, state, l0 = step(t, state, jnp.ones((8, 4)))
    >>> tuple(t["q_proj"].a.sharding.spec)
    ('fsdp',)
  """
  return ShardedTrainStep(loss_fn, tx, mesh, batch_axes=batch_axes, has_aux=has_aux,
                          donate=donate, rules=rules, base=base, adapters=adapters)
