"""Differences between the JAX releases jlora supports (0.7.2 through the newest), in one place.

Every other module imports what differs from here, never tests `hasattr(jax, ...)` itself.
A feature that an installed JAX cannot support raises `jlora.compat.Unsupported`-style errors
through `require`, naming the version it needs.
"""

from __future__ import annotations

import jax
import jax.extend as jex

JAX_VERSION: tuple[int, ...] = tuple(int(p) for p in jax.__version__.split(".")[:3] if p.isdigit())
OLDEST = (0, 7, 2)  # the oldest JAX that CI tests (the free Colab TPU's)


def jaxprs_in_params(params) -> list:
  """The jaxprs (open `Jaxpr`s) among an equation's parameters, as `jax.extend.core`'s
  function of that name returns them (added after 0.7.2)."""
  fn = getattr(jex.core, "jaxprs_in_params", None)
  if fn is not None:
    return list(fn(params))
  out = []
  for v in params.values():
    for x in (v if isinstance(v, (tuple, list)) else (v,)):
      if isinstance(x, jex.core.ClosedJaxpr):
        out.append(x.jaxpr)
      elif isinstance(x, jex.core.Jaxpr):
        out.append(x)
  return out


def get_mesh():
  """The mesh set with `jax.set_mesh` (or `jax.sharding.use_mesh`), or None."""
  fn = getattr(jax.sharding, "get_mesh", None)
  if fn is None:
    return None
  m = fn()
  return None if m is None or getattr(m, "empty", False) else m


def mesh_platform() -> str | None:
  """The platform of the mesh set with `jax.set_mesh`, inside a trace too, or None.

  Newer JAX records it on the abstract mesh (`abstract_device.platform`), which is
  what a trace sees; outside a trace the concrete mesh's devices say it. JAX 0.7.2's
  abstract mesh does not record it, so there it is known outside a trace only.
  """
  get_abstract = getattr(jax.sharding, "get_abstract_mesh", None)
  am = get_abstract() if get_abstract is not None else None
  platform = getattr(getattr(am, "abstract_device", None), "platform", None)
  if platform:
    return platform
  try:
    m = get_mesh()
  except ValueError:  # newer JAX: the concrete mesh is not readable inside a trace
    return None
  return m.devices.flat[0].platform if isinstance(m, jax.sharding.Mesh) else None


def variable_value(v):
  """The value of a Flax NNX `Variable` (`get_value()` on flax >= 0.12, `.value` before)."""
  get = getattr(type(v), "get_value", None)
  return get(v) if get is not None else v.value


def require(version: tuple[int, ...], feature: str) -> None:
  """Raises if the installed JAX is older than `version`, naming the feature and the version."""
  if JAX_VERSION < version:
    raise RuntimeError(
        f"jlora: {feature} needs jax>={'.'.join(map(str, version))}; this is jax "
        f"{jax.__version__}. Upgrade jax, or leave this feature out.")
