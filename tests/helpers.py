"""Helpers shared by the test modules."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import jlora


def rand(shape, seed=0, dtype=jnp.float32):
  """Fresh standard-normal values (numpy's generator: no XLA compile per shape)."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32), dtype)


def randomize_b(tree, seed=1):
  """Random `b` everywhere (at init `b` is zero, which would hide errors)."""
  def f(x):
    if jlora.is_lora(x):
      return jlora.LoRA(x.w, x.a, rand(x.b.shape, seed, x.b.dtype), x.alpha, x.a_axes, x.stack,
                        x.rslora)
    return x
  return jax.tree.map(f, tree, is_leaf=jlora.is_lora)


def iter_eqns(jaxpr):
  """Every equation of `jaxpr` and of the jaxprs nested in its equations (scan, remat, ...)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from iter_eqns(sub)


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
