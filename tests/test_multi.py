"""Many adapters over one base: jlora.stack / select / unstack, mixed batches through jlora.lora."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as PS

import jlora
from tests.helpers import rand, randomize_b


def base(seed=0):
  return {"embed": rand((40, 32), seed),
          "layers": {"q_proj": rand((3, 32, 48), seed + 1, scale=0.2),
                     "v_proj": rand((3, 32, 48), seed + 2, scale=0.2),
                     "o_proj": rand((3, 48, 32), seed + 3, scale=0.2)},
          "head": rand((32, 40), seed + 4, scale=0.2)}


def model(p, ids):
  x = p["embed"][ids]  # (batch, tokens, 32)

  def layer(h, w):
    q = jnp.einsum("btd,df->btf", h, w["q_proj"])
    v = h.reshape(-1, h.shape[-1]) @ w["v_proj"]  # rows of (batch * tokens), example by example
    a = jax.nn.softmax(jnp.einsum("btf,bsf->bts", q, v.reshape(q.shape)) / 40.0)
    return h + jnp.einsum("bts,bsf->btf", a, q) @ w["o_proj"], None

  body = jax.checkpoint(layer, policy=jax.checkpoint_policies.nothing_saveable)
  return jax.lax.scan(body, x, p["layers"])[0] @ p["head"]


def adapters(n, seed=0):
  p = base()
  ranks = [2, 4, 3, 4][:n]
  return p, [randomize_b(jlora.apply(p, rank=r, alpha=1.5 * r + i, targets="q_proj|v_proj|o_proj",
                                     stacked="layers", key=jax.random.key(seed + i)),
                         seed=10 + i, scale=0.3) for i, r in enumerate(ranks)]


@pytest.mark.parametrize("kernel", ["gather", "dense"])
def test_each_example_runs_its_own_adapter_forward_and_gradients(kernel):
  p, ts = adapters(3)
  s = jlora.stack(ts)
  ids = jnp.asarray([2, 0, -1, 1, 0])
  tok = jnp.asarray(np.random.default_rng(0).integers(0, 40, (5, 6)))
  f = jlora.lora(model, strict=True, stack_kernel=kernel)
  got = jax.jit(f)(jlora.select(s, ids), tok)
  for e, i in enumerate(np.asarray(ids)):
    want = model(p if i < 0 else jlora.merge(ts[i]), tok[e:e + 1])[0]
    np.testing.assert_allclose(got[e], want, rtol=1e-4, atol=1e-3)
  # gradients: each adapter's from its own examples only; the mixed batch's gradient is the sum
  # of the single-adapter batches' gradients
  proj = rand(got.shape, 7)
  tr, fr = jlora.split(s)
  g = jax.grad(lambda tr: jnp.sum(f(jlora.select(jlora.combine(tr, fr), ids), tok) * proj))(tr)
  for i, t in enumerate(ts):
    rows = np.flatnonzero(np.asarray(ids) == i)
    tt, tf = jlora.split(t)
    gi = jax.grad(lambda tt: jnp.sum(jlora.lora(model)(jlora.combine(tt, tf), tok[rows])
                                     * proj[rows]))(tt)
    for name in ("q_proj", "v_proj", "o_proj"):
      r = t["layers"][name].rank
      # float32 sums in other orders: within 1e-4 of the gradient's own scale (on some CPUs
      # the dense kernel's a-gradient lands 2.6e-3, 3e-4 relative, from the single adapter's)
      for f in ("a", "b"):
        want = getattr(gi["layers"][name], f)
        got_f = getattr(g["layers"][name], f)[:, i, ..., :r] if f == "a" else \
            g["layers"][name].b[:, i, :r]
        np.testing.assert_allclose(got_f, want, rtol=1e-4,
                                   atol=1e-4 * float(jnp.abs(want).max()))
      # the padded rank gets no gradient
      assert float(jnp.abs(g["layers"][name].b[:, i, r:]).max(initial=0)) == 0


def test_unstack_gives_back_each_adapter():
  _, ts = adapters(3)
  s = jlora.stack(ts, rank=6)
  assert s["layers"]["q_proj"].a.shape == (3, 3, 32, 6)
  for i, t in enumerate(ts):
    back = jlora.unstack(s, i)
    for x, y in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(t)):
      np.testing.assert_array_equal(x, y)
    assert back["layers"]["q_proj"].alpha == t["layers"]["q_proj"].alpha


def test_swaps_and_new_routes_compile_once():
  p, ts = adapters(4)
  traces = []

  def fn(t, tok):
    traces.append(1)
    return jlora.lora(model)(t, tok)

  f = jax.jit(fn)
  tok = jnp.asarray(np.random.default_rng(1).integers(0, 40, (4, 5)))
  rng = np.random.default_rng(2)
  outs = []
  for k in range(100):
    # a new set of adapters (another order, so other values, ranks and alphas) and new ids
    order = rng.permutation(4)
    s = jlora.stack([ts[i] for i in order], rank=4)
    ids = jnp.asarray(rng.integers(-1, 4, (4,)))
    outs.append((order, np.asarray(ids), f(jlora.select(s, ids), tok)))
  assert len(traces) == 1
  order, ids, y = outs[-1]
  e = int(np.flatnonzero(ids >= 0)[0])
  want = model(jlora.merge(ts[order[ids[e]]]), tok[e:e + 1])[0]
  np.testing.assert_allclose(y[e], want, rtol=1e-4, atol=1e-3)


def test_training_several_adapters_on_a_mixed_batch():
  p, ts = adapters(2)
  s = jlora.stack(ts)
  tok = jnp.asarray(np.random.default_rng(3).integers(0, 40, (4, 7)))
  ids = jnp.asarray([0, 1, 1, 0])

  def loss(t, tok, ids):
    logits = jlora.lora(model)(jlora.select(t, ids), tok[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tok[:, 1:]).mean()

  step = jlora.train_step(loss, optax.adam(1e-2))
  opt = step.init(s)
  w0 = np.asarray(s["layers"]["q_proj"].w).copy()
  losses = []
  for _ in range(5):
    s, opt, lv = step(s, opt, tok, ids)
    losses.append(float(lv))
  assert losses[-1] < losses[0]
  np.testing.assert_array_equal(np.asarray(s["layers"]["q_proj"].w), w0)
  # one training step on the mixed batch equals, for adapter 0, a step on its examples alone
  # (plain SGD: the mixed loss is the mean over 4 examples, the single one over 2)
  s0 = jlora.stack(ts)
  sgd = jlora.train_step(loss, optax.sgd(0.5))
  s1, _, _ = sgd(s0, sgd.init(s0), tok, ids)
  one = jlora.train_step(lambda t, tok: loss(jlora.stack([t]), tok, jnp.zeros(2, jnp.int32)),
                         optax.sgd(0.25))
  t0, _, _ = one(ts[0], one.init(ts[0]), tok[np.asarray([0, 3])])
  r = ts[0]["layers"]["q_proj"].rank
  np.testing.assert_allclose(s1["layers"]["q_proj"].b[:, 0, :r], t0["layers"]["q_proj"].b,
                             rtol=1e-4, atol=1e-6)


def test_quantized_base_under_a_stack():
  p, ts = adapters(2)
  qs = [jlora.quantize(t, "int8", block_size=8) for t in ts]
  s = jlora.stack(qs)
  tok = jnp.asarray(np.random.default_rng(4).integers(0, 40, (2, 5)))
  got = jlora.lora(model, strict=True)(jlora.select(s, jnp.asarray([1, 0])), tok)
  np.testing.assert_allclose(got[0], model(jlora.merge(qs[1]), tok[:1])[0], rtol=1e-4,
                             atol=1e-3)


def test_sharded_stack_matches_one_device():
  p, ts = adapters(2)
  s = jlora.select(jlora.stack(ts), jnp.asarray([0, 1, 1, 0]))
  mesh = Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "model"))
  specs = jlora.sharding.partition_specs(s, base={"layers": {
      "q_proj": PS(None, None, "model"), "v_proj": PS(None, None, "model"),
      "o_proj": PS(None, "model", None)}})
  assert tuple(specs["layers"]["q_proj"].b) == (None, None, None, "model")
  placed = jax.tree_util.tree_map(lambda a, sp: jax.device_put(a, NamedSharding(mesh, sp)), s,
                                  specs, is_leaf=lambda x: isinstance(x, PS))
  tok = jnp.asarray(np.random.default_rng(5).integers(0, 40, (4, 6)))
  got = jax.jit(jlora.lora(model))(placed, tok)
  np.testing.assert_allclose(got, jlora.lora(model)(s, tok), rtol=1e-4, atol=1e-3)


def test_errors_name_the_fix():
  p, ts = adapters(2)
  s = jlora.stack(ts)
  tok = jnp.zeros((2, 3), jnp.int32) + 1
  with pytest.raises(ValueError, match=r"'layers/q_proj' has no example ids.*jlora.select"):
    jlora.lora(model)(s, tok)
  with pytest.raises(ValueError, match=r"each must be in \[-1, 2\)"):
    jlora.select(s, jnp.asarray([0, 2]))
  with pytest.raises(ValueError, match=r"first axis is not 3 examples"):
    jlora.lora(model)(jlora.select(s, jnp.asarray([0, 1, 0])), tok)
  with pytest.raises(ValueError, match=r"another base weight than tree 0 at 'head'"):
    other = jlora.apply({**p, "head": rand((32, 40), 9)}, rank=2, targets="q_proj",
                        stacked="layers")
    jlora.stack([ts[0], other])
  with pytest.raises(ValueError, match=r"no single merged weight.*jlora.unstack"):
    jlora.merge(s)
  with pytest.raises(ValueError, match=r"a checkpoint holds one adapter.*jlora.unstack"):
    jlora.save("/tmp/never", s)
  with pytest.raises(ValueError, match=r"stack_kernel='onehot' is not one of"):
    jlora.lora(model, stack_kernel="onehot")
  with pytest.raises(ValueError, match=r"cannot run per example"):
    jlora.lora(lambda t: jnp.sum(t["layers"]["q_proj"] ** 2))(jlora.select(s, jnp.asarray([0])))
