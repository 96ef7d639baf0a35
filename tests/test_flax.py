"""jlora on real Flax modules: Linen param dicts and NNX states."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jlora
from tests.helpers import rand as _rand, randomize_b as _randomize_b, variable_value


def _reference_delta(leaf):
  """scale * a @ b in kernel order (float64 numpy, no stack axes)."""
  a, b = np.asarray(leaf.a, np.float64), np.asarray(leaf.b, np.float64)
  ab = np.tensordot(a, b, axes=[[-1], [0]])  # a_axes..., b_axes...
  order = list(leaf.a_axes) + [i for i in range(leaf.ndim) if i not in leaf.a_axes]
  return leaf.scale * np.moveaxis(ab, list(range(leaf.ndim)), order)


# ---------------------------------------------------------------------------------------------
# Linen

_LINEN = {
    "dense": (lambda: nn.Dense(6), (3, 8), {}),
    "dense_general": (lambda: nn.DenseGeneral((2, 4), axis=-1), (3, 8),
                      dict(layout="fan", in_axes=(0,))),
    "einsum": (lambda: nn.Einsum((2, 8, 4), "bd,hdk->bhk"), (3, 8),
               dict(layout="fan", in_axes=(1,))),
    "conv": (lambda: nn.Conv(5, (3, 3)), (2, 6, 6, 4), {}),
}


@pytest.mark.parametrize("name", list(_LINEN))
def test_linen_layers(name):
  make, x_shape, kw = _LINEN[name]
  model = make()
  x = _rand(x_shape, 3)
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  run = jax.jit(lambda p: model.apply({"params": p}, x))
  lp = jlora.apply(params, rank=2, targets="kernel", **kw)
  leaf = lp["kernel"]
  assert jlora.is_lora(leaf) and not jlora.is_lora(lp.get("bias"))
  kshape = params["kernel"].shape
  assert leaf.shape == kshape
  assert jlora.count(lp).trainable == leaf.a.size + leaf.b.size
  # At init: exactly the same outputs.
  base_out = run(params)
  np.testing.assert_array_equal(run(jlora.merge(lp)), base_out)
  # With a random b: the change of output is the layer applied to scale * a @ b alone
  # (each layer is linear in its kernel).
  lp = _randomize_b(lp)
  delta = jnp.asarray(_reference_delta(lp["kernel"]), jnp.float32)
  zero = jax.tree.map(jnp.zeros_like, params)
  expected = base_out + run({**zero, "kernel": delta})
  np.testing.assert_allclose(run(jlora.merge(lp)), expected, rtol=1e-4, atol=1e-4)
  assert not np.allclose(run(jlora.merge(lp)), base_out, atol=1e-2)


def test_linen_attention_default_targets():
  model = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)
  x = _rand((2, 5, 8), 4)
  params = jax.jit(model.init)(jax.random.key(0), x)["params"]
  lp = jlora.apply(params, rank=2)
  lora = {k for k in lp if jlora.is_lora(lp[k]["kernel"])}
  assert lora == {"query", "value"}
  assert lp["query"]["kernel"].a.shape == (8, 2, 2) and lp["query"]["kernel"].b.shape == (2, 4)
  assert not jlora.is_lora(lp["query"]["bias"])  # a 2-D bias (heads, head_dim) is never LoRA
  run = jax.jit(lambda p: model.apply({"params": p}, x))
  np.testing.assert_array_equal(run(jlora.merge(lp)), run(params))


# ---------------------------------------------------------------------------------------------
# NNX

class Attn(nnx.Module):

  def __init__(self, rngs):
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=8, qkv_features=8, decode=False,
                                       rngs=rngs)
    self.norm = nnx.LayerNorm(8, rngs=rngs)
    self.head = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.head(self.norm(x + self.attn(x)))


def _nnx_model():
  return Attn(nnx.Rngs(0)), _rand((2, 5, 8), 5)


def test_nnx_state_apply_merge_and_nnx_merge():
  model, x = _nnx_model()
  graphdef, state = nnx.split(model)
  run = jax.jit(lambda s: nnx.merge(graphdef, s)(x))
  y0 = run(state)
  lp = jlora.apply(state, rank=2)
  assert isinstance(lp, nnx.State)
  paths = jlora.summary(lp)
  assert "attn/query/kernel" in paths and "/value/kernel" in paths and ".value" not in paths
  assert jlora.is_lora(variable_value(lp["attn"]["query"]["kernel"]))
  assert not jlora.is_lora(variable_value(lp["attn"]["key"]["kernel"]))
  assert variable_value(lp["attn"]["value"]["kernel"]).a.shape == (8, 2, 2)
  keys = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(lp)[0]]
  assert "['attn']['query']['kernel'].value.a" in keys
  assert "['attn']['query']['kernel'].value.w" in keys
  merged = jlora.merge(lp)
  assert isinstance(merged, nnx.State)
  np.testing.assert_array_equal(run(merged), y0)
  np.testing.assert_array_equal(run(jlora.base(lp)), y0)
  moved = run(jlora.merge(_randomize_b(lp)))
  assert not np.allclose(moved, y0, atol=1e-3)
  # split / combine round trip on an nnx.State.
  t, f = jlora.split(lp)
  back = jlora.combine(t, f)
  assert jax.tree.structure(back) == jax.tree.structure(lp)
  assert all(u is v for u, v in zip(jax.tree.leaves(back), jax.tree.leaves(lp)))


def test_nnx_pure_dict():
  model, x = _nnx_model()
  graphdef, state = nnx.split(model)
  pure = nnx.to_pure_dict(state)
  lp = _randomize_b(jlora.apply(pure, rank=2))
  assert jlora.is_lora(lp["attn"]["query"]["kernel"])
  merged = jlora.merge(lp)
  nnx.replace_by_pure_dict(state, merged)
  leaf = lp["attn"]["query"]["kernel"]
  np.testing.assert_allclose(variable_value(state["attn"]["query"]["kernel"]),
                             np.asarray(leaf.w) + _reference_delta(leaf), rtol=1e-6, atol=1e-6)
  assert jax.jit(lambda s: nnx.merge(graphdef, s)(x))(state).shape == (2, 5, 3)


def test_nnx_train_step():
  model, x = _nnx_model()
  graphdef, state = nnx.split(model)
  target = _rand((2, 5, 3), 6)
  lp = jlora.apply(state, rank=2, trainable="^head/")

  def loss_fn(tree, x, target):
    return jnp.mean((nnx.merge(graphdef, jlora.merge(tree))(x) - target) ** 2)

  frozen = jax.tree.map(np.array, jlora.split(lp).frozen)
  before = jax.tree.map(np.array, lp)
  step = jlora.train_step(loss_fn, optax.adam(1e-2))
  opt_state = step.init(lp)
  w = variable_value(lp["attn"]["query"]["kernel"]).w
  assert all(x.size != w.size for x in jax.tree.leaves(opt_state))
  lp, opt_state, loss0 = step(lp, opt_state, x, target)
  lp, opt_state, loss1 = step(lp, opt_state, x, target)
  assert float(loss1) < float(loss0)
  for u, v in zip(jax.tree.leaves(frozen), jax.tree.leaves(jlora.split(lp).frozen)):
    np.testing.assert_array_equal(u, v)
  q0 = variable_value(before["attn"]["query"]["kernel"])
  q2 = variable_value(lp["attn"]["query"]["kernel"])
  assert not np.array_equal(q2.a, q0.a) and not np.array_equal(q2.b, q0.b)
  head = variable_value(lp["head"]["kernel"])
  assert isinstance(head, jlora.Trainable)
  assert not np.array_equal(head.value, variable_value(before["head"]["kernel"]).value)
  c = jlora.count(lp)
  q = 8 * 2 * 2 + 2 * 4  # a (8, heads, r), b (r, head_dim) for query and value
  n_model = sum(math.prod(v.shape) for v in jax.tree.leaves(nnx.state(model)))
  assert c == (n_model + 2 * q, 2 * q + 8 * 3 + 3, n_model - (8 * 3 + 3))


class _RematBlock(nnx.Module):
  def __init__(self, rngs):
    self.q_proj = nnx.Linear(8, 8, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.q_proj(x))


class _RematModel(nnx.Module):
  """Two blocks, each called through `nnx.remat` as NNX users write it (its defaults)."""

  def __init__(self, rngs):
    self.block_0, self.block_1 = _RematBlock(rngs), _RematBlock(rngs)

  def __call__(self, x):
    for block in (self.block_0, self.block_1):
      x = nnx.remat(lambda b, x: b(x))(block, x)
    return x


def test_nnx_remat_runs_factored():
  """`nnx.remat` returns each block's state from the checkpoint; jlora passes the LoRA weights
  through, so the factored path holds (strict: nothing materialized) and matches merging."""
  graphdef, state = nnx.split(_RematModel(nnx.Rngs(0)))
  tree = _randomize_b(jlora.apply(state, rank=2, targets="q_proj"))
  x = _rand((4, 8), 3)
  train, frozen = jlora.split(tree)
  run = lambda t, x: jnp.sum(nnx.merge(graphdef, t)(x) ** 2)
  factored = lambda tr: jlora.lora(run, strict=True)(jlora.combine(tr, frozen), x)
  merged = lambda tr: run(jlora.merge(jlora.combine(tr, frozen)), x)
  got, want = jax.value_and_grad(factored)(train), jax.value_and_grad(merged)(train)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(jnp.asarray(got[0]))) > 0
