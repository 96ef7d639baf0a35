"""Flax metadata around parameters: Linen `AxisMetadata` boxes and NNX `Variable`s.

A box holds a value (an array, or a jlora leaf) and, optionally, how it is laid
out: Linen `nn.Partitioned` / `nn.LogicallyPartitioned` carry mesh axis names or
logical names, NNX variables carry `out_sharding` (or `sharding_names`) metadata.
Flax is optional: without it nothing is a box.
"""

from __future__ import annotations

import inspect
from typing import Any

from jax.sharding import NamedSharding

from jlora._src import compat


def linen_box_types() -> tuple[type, ...]:
  try:
    from flax.core import meta  # pylint: disable=import-outside-toplevel
  except ImportError:  # flax is optional
    return ()
  return (meta.AxisMetadata,)


def nnx_variable_types() -> tuple[type, ...]:
  try:
    from flax.nnx import variablelib  # pylint: disable=import-outside-toplevel
  except ImportError:
    return ()
  return (variablelib.Variable,)


def is_box(x: Any) -> bool:
  """A Linen box or an NNX variable."""
  return isinstance(x, linen_box_types() + nnx_variable_types())


def is_nnx_variable(x: Any) -> bool:
  return isinstance(x, nnx_variable_types())


def value(box: Any) -> Any:
  """The value a box holds (no sharding constraint applied)."""
  if is_nnx_variable(box):
    return compat.variable_value(box)
  return box.unbox(apply_constraint=False) if _accepts_constraint(box) else box.value


def rebox(box: Any, new: Any) -> Any:
  """`box` holding `new` instead of its value, metadata kept."""
  if is_nnx_variable(box):
    return box.replace(new)
  return box.replace_boxed(new)


def resolve_logical(names, rules, local_rules=None) -> tuple:
  """Logical axis names -> mesh axes, with `rules`, then the box's own, else Flax's context."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel
  if rules is None and local_rules is None:
    return tuple(nn.logical_to_mesh_axes(names))
  rules = tuple(rules or ()) + tuple(local_rules or ())
  return tuple(nn.logical_to_mesh_axes(names, rules))


def value_and_spec(box: Any, rules) -> tuple[Any, tuple | None, Any]:
  """`(value, spec entries or None, mesh or None)` of a Linen box or an NNX variable."""
  if is_nnx_variable(box):
    md = box.get_metadata()
    val = compat.variable_value(box)
    sh = md.get("out_sharding") or md.get("sharding_names") or md.get("sharding")
    mesh = md.get("mesh")
    if isinstance(sh, NamedSharding):
      return val, tuple(sh.spec), sh.mesh
    if sh:
      names = tuple(sh)
      if rules is not None or md.get("sharding_rules"):
        names = resolve_logical(names, rules, md.get("sharding_rules"))
      return val, names, mesh
    return val, None, mesh
  val = value(box)
  names = getattr(box, "names", None)
  mesh = getattr(box, "mesh", None)
  if names is None:
    return val, None, mesh
  if type(box).__name__ == "LogicallyPartitioned":
    names = resolve_logical(names, rules, getattr(box, "rules", None))
  return val, tuple(names), mesh


def _accepts_constraint(box) -> bool:
  try:
    return "apply_constraint" in inspect.signature(box.unbox).parameters
  except (TypeError, ValueError):
    return False
