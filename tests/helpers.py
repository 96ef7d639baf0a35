"""Helpers shared by the test modules."""

import dataclasses
import pathlib
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

import jlora


def rand(shape, seed=0, dtype=jnp.float32, scale=1.0):
  """Fresh normal values, std `scale` (numpy's generator: no XLA compile per shape)."""
  return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape, np.float32), dtype)


def random_params(shapes, seed=0):
  """Random arrays for an abstract parameter tree (`jax.eval_shape(model.init, ...)`).

  Norm `scale`s are 1 + 0.1·N(0, 1), every other leaf 0.2·N(0, 1); each leaf comes from a
  numpy generator seeded by `(seed, its key path)` (no XLA compile per shape).
  """
  def draw(path, x):
    rng = np.random.default_rng([seed, zlib.crc32(jax.tree_util.keystr(path).encode())])
    z = rng.standard_normal(x.shape, np.float32)
    return jnp.asarray(1.0 + 0.1 * z if path[-1].key == "scale" else 0.2 * z)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def randomize_b(tree, seed=1, *, scale=1.0, a=False, alpha_mult=1.0):
  """`tree` with a random `b` at every LoRA leaf (at init `b` is zero, which would hide errors).

  The values are N(0, scale²), from a numpy generator seeded by `(seed, the leaf's key path)`:
  no two leaves share them, and no XLA compile per shape. `a=True` draws `a` too; `alpha_mult`
  multiplies each leaf's alpha (a scale other than 1 shows where it is misplaced).
  """
  def f(path, x):
    if not jlora.is_lora(x):
      return x
    rng = np.random.default_rng([seed, zlib.crc32(jax.tree_util.keystr(path).encode())])
    draw = lambda v: jnp.asarray(scale * rng.standard_normal(v.shape, np.float32), v.dtype)
    new = {"b": draw(x.b)}
    if alpha_mult != 1.0:
      new["alpha"] = x.alpha * alpha_mult
    if a:
      new["a"] = draw(x.a)
    return dataclasses.replace(x, **new)

  return jax.tree_util.tree_map_with_path(f, tree, is_leaf=jlora.is_lora)


def iter_eqns(jaxpr):
  """Every equation of `jaxpr` and of the jaxprs nested in its equations (scan, remat, ...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for v in eqn.params.values():
      for x in (v if isinstance(v, (tuple, list)) else (v,)):
        if isinstance(x, jex_core.ClosedJaxpr):
          yield from iter_eqns(x.jaxpr)
        elif isinstance(x, jex_core.Jaxpr):
          yield from iter_eqns(x)


def variable_value(v):
  """The value of a Flax NNX `Variable` (`get_value()` on flax >= 0.12, `.value` before)."""
  get = getattr(type(v), "get_value", None)
  return get(v) if get is not None else v.value


REPO = pathlib.Path(__file__).resolve().parent.parent


def run_notebook(name: str, timeout: int) -> str:
  """Executes colab/NAME top to bottom in a fresh kernel; returns the text the cells printed.

  The caller sets the environment (the kernel inherits it), e.g. with monkeypatch.
  """
  import nbclient
  import nbformat

  nb = nbformat.read(REPO / "colab" / name, as_version=4)
  nbclient.NotebookClient(nb, timeout=timeout, kernel_name="python3",
                          resources={"metadata": {"path": str(REPO)}}).execute()
  return "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                   for o in c.outputs)
