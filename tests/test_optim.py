"""`jlora.optimizer` and `jlora.train_step`: only adapters train, frozen weights keep no state."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora


class Block(nn.Module):
  """A small real transformer block: embedding, attention, MLP, norm, head."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(32, 16, name="embed")(tokens)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(nn.LayerNorm()(x))
    x = x + nn.Dense(16, name="mlp_out")(nn.gelu(nn.Dense(32, name="mlp_in")(x)))
    return nn.Dense(32, name="lm_head")(nn.LayerNorm()(x))


@pytest.fixture(scope="module")
def setup():
  model = Block()
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 32, (4, 8)))
  params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]

  def loss_fn(tree, tokens):
    logits = model.apply({"params": jlora.merge(tree)}, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()

  return params, tokens, loss_fn


def _size(x):
  return int(np.prod(x.shape))


def test_adam_train_step_on_a_flax_model(setup):
  params, tokens, loss_fn = setup
  lp = jlora.apply(params, rank=2)
  assert sorted(lp["attn"]) == ["key", "out", "query", "value"]
  assert [k for k in lp["attn"] if jlora.is_lora(lp["attn"][k]["kernel"])] == ["query", "value"]
  before = jax.tree.map(np.array, lp)  # host copies: the step donates its inputs
  step = jlora.train_step(loss_fn, optax.adam(1e-2))
  state = step.init(lp)
  assert step.__name__ == "loss_fn"

  # No optimizer-state leaf of any W's size: moments for a and b only.
  w_sizes = {_size(x.w) for x in jax.tree.leaves(lp, is_leaf=jlora.is_lora) if jlora.is_lora(x)}
  state_sizes = [_size(x) for x in jax.tree.leaves(state)]
  assert w_sizes == {16 * 2 * 8} and not set(state_sizes) & w_sizes
  adapters = [_size(x) for x in jax.tree.leaves(jlora.split(lp).trainable)]
  assert sorted(s for s in state_sizes if s > 1) == sorted(adapters * 2)  # mu and nu
  # The state mirrors the trainable half: None holes where the frozen half has data.
  mu = state.inner_states["train"].inner_state[0].mu
  assert mu["mlp_in"]["kernel"] is None and mu["attn"]["query"]["kernel"].w is None
  assert mu["attn"]["query"]["kernel"].a.shape == lp["attn"]["query"]["kernel"].a.shape

  # Donated: the trainable half and the optimizer state; never the frozen half.
  trainable_info, state_info, frozen_info, _ = step.lower(lp, state, tokens).args_info[0]
  assert all(x.donated for x in jax.tree.leaves(trainable_info) + jax.tree.leaves(state_info))
  assert not any(x.donated for x in jax.tree.leaves(frozen_info))
  assert len(jax.tree.leaves(frozen_info)) == len(jax.tree.leaves(jlora.split(lp).frozen))

  lp1, state, loss1 = step(lp, state, tokens)
  assert lp["attn"]["query"]["kernel"].b.is_deleted()  # the adapters were donated ...
  assert not lp["attn"]["query"]["kernel"].w.is_deleted()  # ... the frozen weights not:
  assert lp1["attn"]["query"]["kernel"].w is params["attn"]["query"]["kernel"]  # same arrays
  assert lp1["mlp_in"]["kernel"] is params["mlp_in"]["kernel"]
  after1 = jax.tree.map(np.array, lp1)
  lp2, state, loss2 = step(lp1, state, tokens)
  after2 = jax.tree.map(np.array, lp2)
  lp3, state, loss3 = step(lp2, state, tokens)
  assert float(loss3) < float(loss2) < float(loss1)

  for name in ("query", "value"):
    b0, l1, l2 = (before["attn"][name]["kernel"], after1["attn"][name]["kernel"],
                  after2["attn"][name]["kernel"])
    assert not np.array_equal(l1.b, b0.b)  # b moves on step 1
    np.testing.assert_array_equal(l1.a, b0.a)  # b was zero, so a had no gradient yet
    assert not np.array_equal(l2.a, l1.a)  # a moves on step 2
  # Every frozen value is bitwise unchanged, LoRA w's and plain leaves alike.
  frozen_before = jax.tree.leaves(jlora.split(before).frozen)
  frozen_after = jax.tree.leaves(jlora.split(lp3).frozen)
  assert len(frozen_before) == len(frozen_after) > 10
  for u, v in zip(frozen_before, frozen_after):
    np.testing.assert_array_equal(np.asarray(u).view(np.uint8), np.asarray(v).view(np.uint8))


def test_train_step_has_aux_trainable_leaves_no_donation(setup):
  params, tokens, loss_fn = setup
  lp = jlora.apply(params, rank=2, trainable="^lm_head/")

  def with_aux(tree, tokens):
    loss = loss_fn(tree, tokens)
    return loss, {"loss_x2": 2 * loss}

  step = jlora.train_step(with_aux, optax.adam(1e-2), has_aux=True, donate=False)
  state = step.init(lp)
  new, state, loss, aux = step(lp, state, tokens)
  assert not lp["attn"]["query"]["kernel"].b.is_deleted()
  np.testing.assert_allclose(aux["loss_x2"], 2 * loss, rtol=1e-6)
  assert isinstance(new["lm_head"]["kernel"], jlora.Trainable)
  assert not np.array_equal(new["lm_head"]["kernel"].value, lp["lm_head"]["kernel"].value)
  assert not np.array_equal(new["lm_head"]["bias"].value, lp["lm_head"]["bias"].value)
  assert not np.array_equal(new["attn"]["value"]["kernel"].b, lp["attn"]["value"]["kernel"].b)
  np.testing.assert_array_equal(new["mlp_in"]["kernel"], lp["mlp_in"]["kernel"])
  np.testing.assert_array_equal(new["attn"]["value"]["kernel"].w, lp["attn"]["value"]["kernel"].w)


def test_optimizer_on_the_whole_tree_keeps_frozen_weights(setup):
  params, tokens, loss_fn = setup
  lp = jlora.apply(params, rank=2)
  # Weight decay moves every leaf it updates, even with a zero gradient.
  tx = jlora.optimizer(optax.adamw(1e-2, weight_decay=0.5), lp)
  state = tx.init(lp)
  n_state = sum(_size(x) for x in jax.tree.leaves(state))
  assert n_state == 2 * jlora.count(lp).trainable + 1  # mu, nu, count

  @jax.jit
  def update(lp, state, tokens):
    grads = jax.grad(loss_fn)(lp, tokens)
    updates, state = tx.update(grads, state, lp)
    return grads, optax.apply_updates(lp, updates)

  grads, new = update(lp, state, tokens)
  assert jlora.is_lora(grads["attn"]["query"]["kernel"])
  assert np.any(np.asarray(grads["mlp_in"]["kernel"]))  # W does get a gradient ...
  np.testing.assert_array_equal(new["mlp_in"]["kernel"], lp["mlp_in"]["kernel"])  # ... unused
  np.testing.assert_array_equal(new["attn"]["query"]["kernel"].w, lp["attn"]["query"]["kernel"].w)
  assert not np.array_equal(new["attn"]["query"]["kernel"].b, lp["attn"]["query"]["kernel"].b)


def test_optimizer_adam_state_holds_adapters_only(setup):
  params, _, _ = setup
  lp = jlora.apply(params, rank=2, targets="all-linear")
  state = jlora.optimizer(optax.adam(1e-3), lp).init(lp)
  n_state = sum(_size(x) for x in jax.tree.leaves(state))
  assert n_state == 2 * jlora.count(lp).trainable + 1  # mu, nu, count
  assert jlora.count(lp).trainable < jlora.count(lp).frozen / 4
