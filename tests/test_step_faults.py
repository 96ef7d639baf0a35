"""Faults of the train steps (issue 15): tied weights under donation, trees and optimizer states
that do not fit the step, untrainable leaves, and the sharded step's batch and layout errors.

The cases that need several devices (an axis that does not divide a size, donation on a
sharded mesh) use the 8 host CPU devices tests/conftest.py sets up.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jlora
from tests.helpers import rand


def _tied_trees(seed):
  """Three trees holding one array at two paths, at least one of them trainable."""
  e = rand((6, 4), seed)
  q = rand((4, 4), seed + 1)
  return {
      "two_trainables": {"embed": jlora.Trainable(e), "head": jlora.Trainable(e), "q": q},
      "trainable_and_frozen": {"embed": jlora.Trainable(e), "head": e, "q": q},
      "trainable_and_lora_w": {"embed": jlora.Trainable(e), "q": q,
                               "head": jlora.apply({"head": e}, rank=2, targets="head")["head"]},
  }


def _tied_loss(t, x):
  m = jlora.merge(t)
  return jnp.mean((x @ m["embed"] @ m["q"] @ m["head"].T - x) ** 2)


def _host(tree):
  return jax.tree.map(np.array, tree)


@pytest.mark.parametrize("case", ["two_trainables", "trainable_and_frozen",
                                  "trainable_and_lora_w"])
def test_tied_weights_train_under_donation(case):
  tree = _tied_trees(3)[case]
  x = rand((5, 6), 4)
  ref_step = jlora.train_step(_tied_loss, optax.adam(1e-2), donate=False)
  ref, _, ref_loss = ref_step(tree, ref_step.init(tree), x)
  step = jlora.train_step(_tied_loss, optax.adam(1e-2))
  state = step.init(tree)
  before = _host(tree)
  frozen_before = jlora.split(before).frozen
  with pytest.warns(UserWarning, match=r"jlora.train_step: one array is at 'embed' and "
                                       r"'head(/w)?'.*trained at 'embed'.*part ways"):
    new, state, loss = step(tree, state, x)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for u, v in zip(jax.tree.leaves(new), jax.tree.leaves(ref)):
    np.testing.assert_allclose(u, v, rtol=1e-6)
  assert not np.array_equal(new["embed"].value, before["embed"].value)
  # The frozen half is never donated, even where it shares its buffer with a trained leaf.
  for u, v in zip(jax.tree.leaves(jlora.split(new).frozen), jax.tree.leaves(frozen_before)):
    np.testing.assert_array_equal(u, v)
  new, state, loss2 = step(new, state, x)  # the paths are separate now: no copy, no warning
  assert float(loss2) < float(loss)


class _AnchorState(NamedTuple):
  anchor: object


def _pull_to_init(strength):
  """An L2-SP-style transformation: its state keeps the initial parameters themselves."""
  def init(params):
    return _AnchorState(params)

  def update(updates, state, params):
    return jax.tree.map(lambda u, p, a: u + strength * (p - a), updates, params,
                        state.anchor), state

  return optax.GradientTransformation(init, update)


def test_optimizer_state_holding_the_parameters_is_not_donated_twice():
  tree = jlora.apply({"q_proj": rand((4, 6), 5)}, rank=2)
  x = rand((8, 4), 6)
  loss = lambda t, x: jnp.mean((jlora.lora(lambda p, x: x @ p["q_proj"])(t, x) - 1.0) ** 2)
  tx = optax.chain(_pull_to_init(0.1), optax.sgd(1e-1))
  step = jlora.train_step(loss, tx)
  state = step.init(tree)
  a0 = np.array(tree["q_proj"].a)
  new, state, l0 = step(tree, state, x)
  new, state, l1 = step(new, state, x)
  assert float(l1) < float(l0)
  anchor = state.inner_states["train"].inner_state[0].anchor["q_proj"].a
  np.testing.assert_array_equal(anchor, a0)  # the state kept its own (copied) initial values


def test_int_trainable_leaf_is_refused_with_its_path():
  tree = {"q_proj": jlora.apply({"q_proj": rand((4, 6), 7)}, rank=2)["q_proj"],
          "step_count": jlora.Trainable(jnp.arange(3))}
  loss = lambda t, x: jnp.mean(x @ jlora.merge(t)["q_proj"])
  step = jlora.train_step(loss, optax.adam(1e-2))
  with pytest.raises(ValueError, match=r"jlora.train_step: the trainable leaf at 'step_count' "
                                       r"has dtype int32.*trainable="):
    step.init(tree)
  with pytest.raises(ValueError, match=r"jlora.optimizer: the trainable leaf at 'step_count'"):
    jlora.optimizer(optax.adam(1e-2), tree)
  # A state made elsewhere: the step itself names the path when it is traced.
  state = jlora.optimizer(optax.adam(1e-2)).init(jlora.split(tree).trainable)
  with pytest.raises(ValueError, match=r"jlora.train_step: the trainable leaf at 'step_count'"):
    step(tree, state, rand((2, 4), 8))


def _two_kernels(seed):
  return {"q_proj": rand((4, 6), seed), "v_proj": rand((4, 6), seed + 1)}


def _qv_loss(t, x):
  m = jlora.lora(lambda p, x: x @ p["q_proj"] + x @ p["v_proj"])(t, x)
  return jnp.mean((m - 1.0) ** 2)


def test_step_on_a_tree_the_state_was_not_made_for():
  params = _two_kernels(9)
  x = rand((8, 4), 10)
  step = jlora.train_step(_qv_loss, optax.adam(1e-2), donate=False)
  tree = jlora.apply(params, rank=2, targets="q_proj")
  state = step.init(tree)
  wider = jlora.apply(params, rank=2, targets="q_proj|v_proj")  # an extra LoRA leaf
  with pytest.raises(ValueError, match=r"jlora.train_step: the optimizer state does not fit "
                                       r"the tree.*'v_proj'.*step.init\(tree\)"):
    step(wider, state, x)
  # A plain optax state over the whole tree (it would hold moments for every w).
  with pytest.raises(ValueError, match=r"optimizer state does not fit.*plain optax state"):
    step(tree, optax.adam(1e-2).init(tree), x)
  # The step still works with the state made for each tree.
  _, _, loss = step(wider, step.init(wider), x)
  assert np.isfinite(float(loss))


def test_optimizer_without_tree_still_freezes_every_weight():
  tree = jlora.apply(_two_kernels(11), rank=2, targets="q_proj")
  x = rand((8, 4), 12)
  tx = jlora.optimizer(optax.adamw(1e-2, weight_decay=0.5))  # no tree given
  state = tx.init(tree)
  assert sum(v.size for v in jax.tree.leaves(state)) == 2 * jlora.count(tree).trainable + 1
  grads = jax.grad(_qv_loss)(tree, x)
  assert np.any(np.asarray(grads["v_proj"]))  # plain jax.grad does reach the frozen weights
  updates, _ = tx.update(grads, state, tree)
  new = optax.apply_updates(tree, updates)
  np.testing.assert_array_equal(new["v_proj"], tree["v_proj"])
  np.testing.assert_array_equal(new["q_proj"].w, tree["q_proj"].w)
  assert not np.array_equal(new["q_proj"].b, tree["q_proj"].b)


# ----------------------------------------------------------------------------- sharded, 1 device


def _mesh(*names):
  return jax.make_mesh((1,) * len(names), names)


def _sharded_tree(mesh, seed, spec=P()):
  w = jax.device_put(rand((4, 6), seed), NamedSharding(mesh, spec))
  return jlora.apply({"q_proj": w}, rank=2)


def _q_loss(t, x):
  return jnp.mean((jlora.lora(lambda p, x: x @ p["q_proj"])(t, x) - 1.0) ** 2)


def test_sharded_batch_axes_typo_and_missing_batch_axis():
  mesh = _mesh("data", "tensor")
  with pytest.raises(ValueError, match=r"jlora.train_step: batch_axes names 'dat', "
                                       r"which is not an axis of the mesh \('data', 'tensor'\)"
                                       r".*'data'"):
    jlora.train_step(_q_loss, optax.adam(1e-2), mesh=mesh, batch_axes="dat")
  with pytest.raises(ValueError, match=r"batch_axes names 'fsdpp'"):
    jlora.train_step(_q_loss, optax.adam(1e-2), mesh=mesh, batch_axes=("data", "fsdpp"))
  tp = _mesh("tensor")
  with pytest.raises(ValueError, match=r"the mesh's axes \('tensor',\) hold none of the default "
                                       r"batch axes.*every device.*batch_axes=\(\)"):
    jlora.train_step(_q_loss, optax.adam(1e-2), mesh=tp)
  # Replicating the batch on purpose (tensor parallelism alone): batch_axes=().
  step = jlora.train_step(_q_loss, optax.adam(1e-2), mesh=tp, batch_axes=())
  assert step.batch_spec() == P(None)
  tree = _sharded_tree(tp, 13, P(None, "tensor"))
  _, _, loss = step(tree, step.init(tree), rand((8, 4), 14))
  assert np.isfinite(float(loss))
  # The default keeps the batch axes the mesh has.
  assert jlora.train_step(_q_loss, optax.adam(1e-2), mesh=mesh).batch_spec() == P("data")


def test_sharded_step_on_a_tree_with_an_extra_leaf():
  mesh = _mesh("data", "fsdp")
  params = jax.device_put(_two_kernels(15), NamedSharding(mesh, P("fsdp")))
  step = jlora.train_step(_qv_loss, optax.adam(1e-2), mesh=mesh, donate=False)
  tree = jlora.apply(params, rank=2, targets="q_proj")
  state = step.init(tree)
  wider = jlora.apply(params, rank=2, targets="q_proj|v_proj")
  with pytest.raises(ValueError, match=r"jlora.train_step: the tree does not have the "
                                       r"structure step.init\(tree\) was given: at 'v_proj'.*"
                                       r"LoRA.*array.*step.init"):
    step(wider, state, rand((8, 4), 16))
  with pytest.raises(ValueError, match=r"the optimizer state does not have the structure"):
    step(tree, jlora.optimizer(optax.sgd(1e-2)).init(tree), rand((8, 4), 16))
  _, _, loss = step(tree, state, rand((8, 4), 16))
  assert np.isfinite(float(loss))


def test_sharded_tied_trainable_weights_on_one_device():
  mesh = _mesh("data", "fsdp")
  e = jax.device_put(rand((6, 4), 17), NamedSharding(mesh, P("fsdp")))
  tree = {"embed": jlora.Trainable(e), "head": jlora.Trainable(e),
          "q": jax.device_put(rand((4, 4), 18), NamedSharding(mesh, P()))}
  step = jlora.train_step(_tied_loss, optax.adam(1e-2), mesh=mesh)
  state = step.init(tree)
  with pytest.warns(UserWarning, match=r"jlora.train_step: one array is at 'embed' and "
                                       r"'head'"):
    new, state, loss = step(tree, state, rand((5, 6), 19))
  assert np.isfinite(float(loss))
  assert not np.array_equal(new["embed"].value, new["head"].value)  # two weights from now on


def test_layout_options_need_a_mesh():
  for kw in (dict(batch_axes=("data",)), dict(adapters="replicated"), dict(base={}),
             dict(rules=[("embed", "fsdp")])):
    name = next(iter(kw))
    with pytest.raises(ValueError, match=rf"jlora.train_step: {name}=.* lay the step out on a "
                                         rf"device mesh, and no mesh was given. Pass mesh="):
      jlora.train_step(_q_loss, optax.adam(1e-2), **kw)
  with pytest.raises(TypeError, match=r"jlora.train_step: mesh=\('data',\) is not a "
                                      r"jax.sharding.Mesh"):
    jlora.train_step(_q_loss, optax.adam(1e-2), mesh=("data",))


class _RowState(NamedTuple):
  rows: object


def _row_stats():
  """Per parameter, a statistic of another shape (its first axis), as factored optimizers keep."""
  def init(params):
    return _RowState(jax.tree.map(lambda p: jnp.zeros(p.shape[:1], p.dtype), params))

  return optax.GradientTransformation(init, lambda u, s, p=None: (u, s))


def test_state_shardings_lay_each_moment_out_as_its_parameter():
  """Through optax.tree_map_params: every copy of the parameters in the state takes their
  shardings, whatever wraps it; counts, hyperparameters and other shapes are replicated."""
  mesh = _mesh("fsdp", "tensor")
  params = jax.device_put(_two_kernels(23), NamedSharding(mesh, P("fsdp", "tensor")))
  tree = jlora.apply(params, rank=2, targets="q_proj")
  tree["head"] = jlora.Trainable(jax.device_put(rand((6, 3), 24),
                                                NamedSharding(mesh, P("fsdp"))))
  want = jlora.sharding.shardings(tree)
  tx = jlora.optimizer(optax.chain(
      _row_stats(), _pull_to_init(0.1), optax.clip_by_global_norm(1.0),
      optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3)))
  for made_from in (tree, jlora.split(tree).trainable):
    state = jax.eval_shape(tx.init, made_from)
    for given in (tree, made_from):
      sh = jlora.sharding.state_shardings(tx, state, given)
      assert jax.tree.structure(sh) == jax.tree.structure(state)
      rows, anchor, _, hyper = sh.inner_states["train"].inner_state
      adam = hyper.inner_state[0]
      for copy in (anchor.anchor, adam.mu, adam.nu):
        assert copy["q_proj"].a.spec == want["q_proj"].a.spec == P("fsdp")
        assert copy["q_proj"].b.spec == want["q_proj"].b.spec == P(None, "tensor")
        assert copy["head"].value.spec == P("fsdp")
        if made_from is not tree:  # the trainable half: holes where the frozen values are
          assert copy["q_proj"].w is None and copy["v_proj"] is None
      replicated = [rows.rows["q_proj"].a, rows.rows["head"].value, adam.count,
                    hyper.count, hyper.hyperparams["learning_rate"]]
      assert all(x.spec == P() for x in replicated), replicated
  with pytest.raises(ValueError, match=r"(?s)jlora.sharding.state_shardings: the optimizer "
                                       r"state does not fit `tx` and the tree.*Pass the "
                                       r"transformation that made the state"):
    jlora.sharding.state_shardings(jlora.optimizer(optax.sgd(1e-2)), state, tree)


def test_sharded_batch_leaves_keyed_by_rank():
  """A scalar batch argument first, then an array in its place: the array is still split."""
  mesh = _mesh("data", "fsdp")
  tree = _sharded_tree(mesh, 20, P("fsdp"))
  loss = lambda t, x, s: jnp.mean(s) * _q_loss(t, x)
  step = jlora.train_step(loss, optax.sgd(1e-2), mesh=mesh, donate=False)
  state = step.init(tree)
  x = rand((8, 4), 21)
  step(tree, state, x, jnp.float32(2.0))
  batch = step.lower(tree, state, x, rand((8, 3), 22)).compile().input_shardings[0][3]
  assert [tuple(s.spec) for s in batch] == [(("data", "fsdp"),), (("data", "fsdp"),)]


# ----------------------------------------------------------------------------- 8 host devices


def _mesh8():
  return jax.make_mesh((2, 4), ("data", "fsdp"), devices=jax.devices()[:8])


def test_indivisible_layouts_name_the_path_and_the_fix():
  assert jax.device_count() == 8  # tests/conftest.py
  m3 = jax.sharding.Mesh(np.array(jax.devices()[:3]), ("fsdp",))
  tree = jlora.apply({"q_proj": rand((8, 16), 30)}, rank=2)
  with pytest.raises(ValueError) as e:
    jlora.train_step(_q_loss, optax.adam(1e-2), mesh=m3, base={"q_proj": P("fsdp")}).init(tree)
  msg = str(e.value)
  assert "jlora.train_step: the array at 'q_proj/w' (shape (8, 16)) cannot take " \
         "P('fsdp')" in msg, msg
  assert "axis 0 (size 8) over 'fsdp' (3 devices)" in msg
  assert "adapters='replicated'" not in msg
  with pytest.raises(ValueError) as e:
    jlora.sharding.shardings(jlora.split(tree).trainable, m3, base={"q_proj": P("fsdp")})
  msg = str(e.value)
  assert "jlora.sharding.shardings: the adapter at 'q_proj/a' (shape (8, 2))" in msg, msg
  assert "follow their weight" in msg
  with pytest.raises(ValueError) as e:
    jlora.sharding.shardings(tree, m3, base={"q_proj": P("fsdpp")})
  msg = str(e.value)
  assert "jlora.sharding.shardings: the spec P('fsdpp') at 'q_proj/w' names 'fsdpp', which is " \
         "not an axis of the mesh ('fsdp',)" in msg, msg
  assert "'fsdp'" in msg


def _step_on_eight_devices():
  mesh = _mesh8()
  w = jax.device_put(rand((4, 6), 31), NamedSharding(mesh, P("fsdp")))
  t = jlora.apply({"q_proj": w}, rank=2)
  return mesh, t, jlora.train_step(_q_loss, optax.adam(1e-2), mesh=mesh, donate=False)


def test_sharded_batch_that_does_not_divide():
  _, t, step = _step_on_eight_devices()
  with pytest.raises(ValueError) as e:
    step(t, step.init(t), rand((6, 4), 32))
  msg = str(e.value)
  assert ("jlora.train_step: the batch array args[0] (shape (6, 4)) is split on its "
          "leading axis over ('data', 'fsdp') (8 devices)") in msg, msg
  assert "multiple of 8" in msg


def test_sharded_step_moves_batch_and_state_to_its_layouts():
  """A batch and a state committed elsewhere (one device, e.g. restored there; another
  layout) are moved, as the tree is, to the step's layouts."""
  mesh, t, step = _step_on_eight_devices()
  x = rand((8, 4), 36)
  state = step.init(t)
  _, _, loss_ref = step(t, state, x)
  on_one = lambda tree: jax.device_put(jax.tree.map(np.asarray, tree), jax.devices()[0])
  for bx, st in ((on_one(x), state),
                 (jax.device_put(x, NamedSharding(mesh, P(None, "fsdp"))), state),
                 (x, on_one(state))):
    np.testing.assert_allclose(float(step(t, st, bx)[2]), float(loss_ref), rtol=0, atol=1e-6)


def test_sharded_tied_weights_on_eight_devices():
  mesh = _mesh8()
  e = jax.device_put(rand((8, 4), 33), NamedSharding(mesh, P("fsdp")))
  tied = {"embed": jlora.Trainable(e), "head": jlora.Trainable(e),
          "q": jax.device_put(rand((4, 4), 34), NamedSharding(mesh, P()))}
  x = rand((8, 8), 35)
  ref = jlora.train_step(_tied_loss, optax.adam(1e-2), mesh=mesh, donate=False)
  ref_tree, _, ref_loss = ref(tied, ref.init(tied), x)
  step = jlora.train_step(_tied_loss, optax.adam(1e-2), mesh=mesh)
  state = step.init(tied)
  with pytest.warns(UserWarning, match=r"one array is at 'embed' and 'head'"):
    new, state, loss = step(tied, state, x)
  assert np.isfinite(float(loss))
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(ref_tree)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)
