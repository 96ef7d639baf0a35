"""The GPU benchmark's Gemma 2 model at a tiny size on CPU: forward, one jlora step, fused loss."""

import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from tests.helpers import iter_eqns, randomize_b

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
import gemma2_model as G  # noqa: E402

# The benchmark's model, not the library (whose own tests cover what it uses): the slow lane.
pytestmark = pytest.mark.slow


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_default_config_is_gemma2_2b():
  cfg = G.Gemma2Config()
  assert cfg.num_params == 2_614_341_888
  shapes = jax.eval_shape(lambda k: G.init_params(cfg, k), jax.random.key(0))
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == cfg.num_params
  assert shapes["layers"]["q_proj"]["kernel"].shape == (26, 2304, 2048)
  lora = jax.eval_shape(lambda p: jlora.apply(p, rank=4, stacked=r"^layers/"), shapes)
  assert jlora.count(lora).trainable == 26 * (2304 * 4 + 4 * 2048 + 2304 * 4 + 4 * 1024)


@pytest.mark.parametrize("cap, math, spread", [(30.0, "exp", 0.5), (30.0, "tanh", 0.5),
                                                (30.0, "pallas", 0.5), (30.0, "exp", 40.0),
                                                (30.0, "pallas", 40.0), (None, "exp", 0.5)])
def test_fused_chunked_loss_matches_full_logits(cap, math, spread):
  """Loss and gradients (h and the embedding) equal the plain full-logit path; `spread`
  40 puts logits in the hundreds, where the soft-cap saturates."""
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  h = jax.random.normal(k1, (3, 14, 32), jnp.float32).astype(jnp.bfloat16)  # 42 tokens
  emb = (jax.random.normal(k2, (300, 32)) * spread).astype(jnp.bfloat16)
  labels = jax.random.randint(k3, (3, 14), 0, 300)
  fused = lambda h, e: G.softcap_cross_entropy(h, e, labels, cap=cap, chunk=16,
                                               math=math)  # padded to 48
  plain = lambda h, e: G.plain_cross_entropy(h, e, labels, cap=cap)
  l1, (dh1, de1) = jax.jit(jax.value_and_grad(fused, (0, 1)))(h, emb)
  l0, (dh0, de0) = jax.jit(jax.value_and_grad(plain, (0, 1)))(h, emb)
  np.testing.assert_allclose(l1, l0, rtol=1e-3)  # logits rounded to bf16 by either path
  assert dh1.dtype == h.dtype and de1.dtype == emb.dtype
  assert _rel(dh1, dh0) < 1e-2 and _rel(de1, de0) < 1e-2  # bf16 gradients
  # Only h differentiated (the frozen tied embedding of a LoRA run): the same dh.
  np.testing.assert_array_equal(jax.jit(jax.grad(fused))(h, emb), dh1)


def test_pallas_loss_terms_run_on_gpus_and_in_the_interpreter_only(monkeypatch):
  """One pass gives exactly the two-pass terms' math; other backends are refused, not slow."""
  z = (jax.random.normal(jax.random.key(4), (16, 1000)) * 40).astype(jnp.bfloat16)
  u, big_z = G.softcap_terms(z, 30.0)
  zf = z.astype(jnp.float32)
  th = jnp.tanh(zf / 30.0)
  e = jnp.exp(30.0 * th - 30.0)
  np.testing.assert_allclose(big_z, e.sum(-1), rtol=1e-5)
  np.testing.assert_allclose(u.astype(jnp.float32), e * (1 - th * th), rtol=1e-2, atol=1e-6)
  for block, warps in [((8, 1024), 8), ((16, 8), 2)]:  # other tiles: the same terms
    u2, z2 = G.softcap_terms(z, 30.0, block=block, num_warps=warps)
    np.testing.assert_array_equal(u2, u)
    np.testing.assert_allclose(z2, big_z, rtol=1e-6)
  monkeypatch.setattr(G.jax, "default_backend", lambda: "tpu")
  with pytest.raises(ValueError, match="math='exp'"):
    G.softcap_terms(z, 30.0)


def test_rope_gradient_is_one_inverse_rotation():
  """`apply_rope`'s custom gradient equals autodiff's, and has no padded halves."""
  k1, k2 = jax.random.split(jax.random.key(8))
  x = jax.random.normal(k1, (2, 12, 3, 16), jnp.float32)
  g = jax.random.normal(k2, x.shape, jnp.float32)
  sin, cos = G.rope_tables(12, 16, 10_000.0)
  y, vjp = jax.vjp(lambda x: G.apply_rope(x, sin, cos), x)
  y0, vjp0 = jax.vjp(lambda x: G._rotate(x, sin, cos), x)
  np.testing.assert_array_equal(y, y0)
  (dx,), (dx0,) = vjp(g), vjp0(g)
  assert float(jnp.abs(dx).max()) > 0
  np.testing.assert_allclose(dx, dx0, rtol=1e-6, atol=1e-6)
  prims = lambda f: {e.primitive.name for e in iter_eqns(jax.make_jaxpr(jax.grad(f))(x).jaxpr)}
  assert "pad" in prims(lambda x: jnp.sum(G._rotate(x, sin, cos) * g))
  assert "pad" not in prims(lambda x: jnp.sum(G.apply_rope(x, sin, cos) * g))


def test_tiny_model_forward_and_one_jlora_step():
  """The benchmark's path (layers in a loop, remat names, fused loss) forward and one step."""
  cfg = G.tiny_config(num_layers=2, remat="names", loss_chunk=24, layers="loop", width=32,
                      ffw_width=64, vocab_size=256)  # 40 tokens: 2 chunks, padded
  model = G.Gemma2(cfg)
  ids = jax.random.randint(jax.random.key(1), (2, 21), 0, cfg.vocab_size)
  params = jax.jit(G.init_params, static_argnums=0)(cfg, jax.random.key(0))

  def model_loss(p, ids):
    return model.apply({"params": p}, ids[:, :-1], ids[:, 1:])

  @jax.jit
  def forward(p, ids):  # one compilation: logits and the fused loss
    logits = model.apply({"params": p}, ids[:, :-1])
    plain = G.plain_cross_entropy(logits, jnp.eye(cfg.vocab_size, dtype=jnp.float32), ids[:, 1:],
                                  cap=None, logits_dtype=jnp.float32)  # NLL of these logits
    return logits, model_loss(p, ids), plain

  logits, l_fused, l_plain = forward(params, ids)
  assert logits.shape == (2, 20, cfg.vocab_size) and bool(jnp.all(jnp.abs(logits) <= 30.0))
  np.testing.assert_allclose(l_fused, l_plain, rtol=1e-3)

  tree = jlora.apply(params, rank=4, stacked=r"^layers/")  # q_proj, v_proj
  step = jlora.train_step(jlora.lora(model_loss, strict=True), optax.adamw(1e-2))
  state = step.init(tree)
  b_before = np.asarray(tree["layers"]["v_proj"]["kernel"].b)
  w_before = np.asarray(tree["layers"]["v_proj"]["kernel"].w)
  tree, state, loss = step(tree, state, ids)  # donates the old tree
  np.testing.assert_allclose(loss, l_fused, rtol=1e-5)  # b = 0: the base model's loss
  assert not np.allclose(tree["layers"]["v_proj"]["kernel"].b, b_before)
  np.testing.assert_array_equal(tree["layers"]["v_proj"]["kernel"].w, w_before)  # frozen


def test_layer_layouts_compute_the_same_loss_and_adapter_gradients():
  """scan (unrolled by 2), loop and unstacked blocks: one function of the same weights."""
  # float32 throughout, so the layouts must agree to float32 rounding, not bf16's.
  base = dict(num_layers=2, remat="names", loss_chunk=24, width=32, ffw_width=64, vocab_size=256,
              dtype=jnp.float32, logits_dtype=jnp.float32)
  ids = jax.random.randint(jax.random.key(3), (2, 21), 0, 256)
  params = jax.jit(G.init_params, static_argnums=0)(G.tiny_config(**base), jax.random.key(0))
  # b = 0 would hide a wrong adapter path: random b.
  stacked = randomize_b(jlora.apply(params, rank=4, stacked=r"^layers/", key=jax.random.key(5)))
  unstacked = {k: v for k, v in stacked.items() if k != "layers"}
  for i in range(2):  # the same adapters, one block each
    unstacked[f"layers_{i}"] = jax.tree.map(
        lambda x: dataclasses.replace(x, w=x.w[i], a=x.a[i], b=x.b[i], stack=0)
        if isinstance(x, jlora.LoRA) else x[i], stacked["layers"], is_leaf=jlora.is_lora)
  shapes = jax.eval_shape(lambda k: G.init_params(G.tiny_config(**base, layers="unstacked"), k),
                          jax.random.key(0))
  assert jax.tree.structure(shapes) == jax.tree.structure(jlora.merge(unstacked))

  results = []
  for layers, unroll, tree in [("scan", 2, stacked), ("loop", 1, stacked),
                               ("unstacked", 1, unstacked)]:
    model = G.Gemma2(G.tiny_config(**base, layers=layers, scan_unroll=unroll))
    fn = jlora.lora(lambda t, ids: model.apply({"params": t}, ids[:, :-1], ids[:, 1:]),
                    strict=True)
    train, frozen = jlora.split(tree)
    loss, g = jax.jit(jax.value_and_grad(lambda tr: fn(jlora.combine(tr, frozen), ids)))(train)
    qa = (g["layers"]["q_proj"]["kernel"].a if layers != "unstacked" else
          jnp.stack([g[f"layers_{i}"]["q_proj"]["kernel"].a for i in range(2)]))
    results.append((float(loss), np.asarray(qa, np.float32)))
  assert np.abs(results[0][1]).max() > 0
  for loss, qa in results[1:]:
    np.testing.assert_allclose(loss, results[0][0], rtol=1e-5)
    assert _rel(qa, results[0][1]) < 1e-4


def _count_dots(jaxpr):
  return sum(e.primitive.name == "dot_general" for e in iter_eqns(jaxpr))


def test_remat_policies_that_keep_the_adapter_activations():
  """`_xa` policies keep jlora's x·a (fewer matmuls), `wide_mid` the norms' mean squares (no
  norm statistic recomputed): the same gradients as `names`."""
  # float32, so that keeping a value and computing it again must agree to rounding
  base = dict(num_layers=2, loss_chunk=24, width=32, ffw_width=64, vocab_size=256,
              layers="unstacked", dtype=jnp.float32, logits_dtype=jnp.float32)
  ids = jax.random.randint(jax.random.key(3), (2, 21), 0, 256)
  params = jax.jit(G.init_params, static_argnums=0)(G.tiny_config(**base), jax.random.key(0))
  # random b, so that the gradients of a are not zero
  tree = randomize_b(jlora.apply(params, rank=4, targets="all-linear", key=jax.random.key(5)))
  train, frozen = jlora.split(tree)
  out = {}
  policies = ("names", "names_xa", "wide", "wide_xa", "wide_mid", "wide_mid_xa")
  reduces = {}
  for remat in policies:
    model = G.Gemma2(G.tiny_config(**base, remat=remat))
    fn = jlora.lora(lambda t, ids: model.apply({"params": t}, ids[:, :-1], ids[:, 1:]))
    g = jax.grad(lambda tr: fn(jlora.combine(tr, frozen), ids))
    jaxpr = jax.make_jaxpr(g)(train).jaxpr
    reduces[remat] = sum(e.primitive.name == "reduce_sum" for e in iter_eqns(jaxpr))
    out[remat] = (_count_dots(jaxpr), jax.jit(g)(train))
  assert out["names_xa"][0] < out["names"][0]  # x·a is not recomputed
  assert out["wide_mid_xa"][0] < out["wide_mid"][0]
  # wide_mid keeps the RMSNorms' mean squares: fewer reductions run again in the backward.
  assert reduces["wide_mid"] < reduces["wide"] and reduces["wide_mid_xa"] < reduces["wide_xa"]
  ref = jax.tree.leaves(out["names"][1])
  assert max(float(jnp.abs(x).max()) for x in ref) > 0
  for remat in policies[1:]:
    for a, b in zip(jax.tree.leaves(out[remat][1]), ref):
      assert _rel(a, b) < 1e-4, remat
