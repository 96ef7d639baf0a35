"""Helpers shared by the test modules."""

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
