"""LoRA variants on synthetic trees: DoRA (factored = a NumPy reference, no weight-sized
gradient), PiSSA/OLoRA inits (= NumPy SVD/QR), LoRA+ (= two optimizers), and their tree
operations, optimizer state, sharding specs and checkpoints."""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as PS

import jlora
from tests.helpers import iter_eqns, rand, randomize_b


def _dora_leaf(w_shape, a_axes, rank, stack=0, seed=0):
  """A DoRA leaf with random w, a, b and a magnitude away from its init."""
  s, k = tuple(w_shape[:stack]), tuple(w_shape[stack:])
  b_dims = tuple(k[i] for i in range(len(k)) if i not in a_axes)
  return jlora.LoRA(w=rand(w_shape, seed), a=rand(s + tuple(k[i] for i in a_axes) + (rank,),
                                                    seed + 1, scale=0.5),
                    b=rand(s + (rank,) + b_dims, seed + 2, scale=0.5), alpha=1.5 * rank,
                    a_axes=tuple(a_axes), stack=stack,
                    m=jnp.abs(rand(s + b_dims, seed + 3)) + 0.5)


def _np_dora(leaf):
  """NumPy: (w + s·a@b) · m / ‖w + s·a@b‖ over the A axes (kernel axis order)."""
  w, a, b = (np.asarray(v, np.float64) for v in (leaf.w, leaf.a, leaf.b))
  st, nd = leaf.stack, w.ndim - leaf.stack
  b_axes = [i for i in range(nd) if i not in leaf.a_axes]
  a2 = a.reshape(w.shape[:st] + (-1, a.shape[-1]))
  b2 = b.reshape(w.shape[:st] + (b.shape[st], -1))
  perm = list(range(st)) + [st + i for i in leaf.a_axes] + [st + i for i in b_axes]
  wp = np.transpose(w, perm)
  v = wp.reshape(a2.shape[:-1] + (-1,)) + leaf.scale * (a2 @ b2)
  norm = np.sqrt((v ** 2).sum(axis=-2, keepdims=True))
  v = v * np.asarray(leaf.m, np.float64).reshape(norm.shape) / norm
  return np.transpose(v.reshape(wp.shape), np.argsort(perm))


# ----------------------------------------------------------------------------- DoRA


def test_dora_apply_keeps_the_model_and_m_is_the_column_norm():
  w = rand((12, 20), 0)
  t = jlora.apply({"q_proj": w}, rank=3, alpha=5.0, dora=True)
  leaf = t["q_proj"]
  assert leaf.dora and leaf.m.shape == (20,) and leaf.m.dtype == jnp.float32
  np.testing.assert_allclose(leaf.m, np.linalg.norm(np.asarray(w), axis=0), rtol=1e-6)
  np.testing.assert_allclose(jlora.merge(t)["q_proj"], w, atol=1e-5)
  # stacked, N-d: one magnitude per stack and B-axes element
  t = jlora.apply({"layers": {"attn": {"kernel": rand((2, 8, 3, 4), 1)}}}, rank=2,
                  stacked="^layers/", targets="kernel", dora=True)
  assert t["layers"]["attn"]["kernel"].m.shape == (2, 4)
  assert not jlora.apply({"q_proj": w}, rank=3)["q_proj"].dora


def test_dora_merge_is_the_numpy_reference():
  for shape, a_axes, stack in [((12, 20), (0,), 0), ((3, 6, 4, 5), (0, 1), 1),
                               ((6, 4, 5), (0,), 0), ((6, 4, 5), (1,), 0)]:
    leaf = _dora_leaf(shape, a_axes, 2, stack)
    np.testing.assert_allclose(jlora.merge({"k": leaf})["k"], _np_dora(leaf), rtol=2e-5,
                               atol=2e-5)


# (function of (W, x), x shape, W shape, a_axes, stack)
DOTS = {
    "x@W": (lambda w, x: x @ w, (5, 12), (12, 20), (0,), 0),
    "x@W.T": (lambda w, x: x @ w.T, (5, 20), (12, 20), (0,), 0),
    "einsum N-d keras": (lambda w, x: jnp.einsum("btd,dhk->bthk", x, w), (2, 3, 8), (8, 3, 4),
                         (0,), 0),
    "einsum N-d out-proj": (lambda w, x: jnp.einsum("bthk,hkd->btd", x, w), (2, 3, 3, 4),
                            (3, 4, 8), (0, 1), 0),
    "einsum over B axes": (lambda w, x: jnp.einsum("bthk,dhk->btd", x, w), (2, 3, 3, 4),
                           (8, 3, 4), (0,), 0),
    "fused qkv slices": (lambda w, x: (x @ w[:, :6]) * (x @ w[:, 6:]), (5, 8), (8, 12), (0,), 0),
    "transpose reshape": (lambda w, x: x @ w.reshape(8, 12), (5, 8), (8, 3, 4), (0,), 0),
    "stacked scan": (lambda w, x: jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0],
                     (5, 8), (3, 8, 8), (0,), 1),
    "embedding rows": (lambda w, x: jnp.take(w, x, axis=0), None, (16, 8), (0,), 0),
    "remat": (lambda w, x: jax.checkpoint(lambda u: jnp.sin(u @ w))(x), (5, 12), (12, 20), (0,),
              0),
}


@pytest.mark.parametrize("case", list(DOTS))
def test_dora_factored_equals_numpy_and_gradients_match_the_merged(case):
  fn, x_shape, w_shape, a_axes, stack = DOTS[case]
  leaf = _dora_leaf(w_shape, a_axes, 2, stack, seed=len(case))
  x = (jnp.asarray(np.random.default_rng(0).integers(0, w_shape[0], (4, 3)))
       if x_shape is None else rand(x_shape, 9))
  f = lambda t, x: fn(t["k"], x)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no materialization
    got = jlora.lora(f, strict=True)({"k": leaf}, x)
  want = fn(jnp.asarray(_np_dora(leaf), jnp.float32), x)
  np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-4)
  tr, fr = jlora.split({"k": leaf})
  proj = rand(want.shape, 5)
  loss = lambda g: lambda tr: jnp.sum(g(jlora.combine(tr, fr), x) * proj)
  g_fact = jax.grad(loss(jlora.lora(f, strict=True)))(tr)["k"]
  g_merged = jax.grad(loss(lambda t, x: f(jlora.merge(t), x)))(tr)["k"]
  for name in ("a", "b", "m"):
    np.testing.assert_allclose(getattr(g_fact, name), getattr(g_merged, name), rtol=2e-4,
                               atol=2e-4, err_msg=name)


def test_dora_norm_is_constant_for_the_gradient():
  """grad m = Σ (xᵀ·proj) ∘ V / ‖V‖, grad b = s·aᵀ(xᵀ·proj ∘ m/‖V‖) (NumPy, ‖V‖ a constant)."""
  leaf = _dora_leaf((12, 20), (0,), 3, seed=4)
  x, proj = rand((6, 12), 1), rand((6, 20), 2)
  tr, fr = jlora.split({"k": leaf})
  g = jax.grad(lambda tr: jnp.sum(jlora.lora(lambda t, x: x @ t["k"])(
      jlora.combine(tr, fr), x) * proj))(tr)["k"]
  w, a, b, m = (np.asarray(v, np.float64) for v in (leaf.w, leaf.a, leaf.b, leaf.m))
  v = w + leaf.scale * a @ b
  n = np.linalg.norm(v, axis=0)
  xp = np.asarray(x, np.float64).T @ np.asarray(proj, np.float64)  # (in, out)
  np.testing.assert_allclose(g.m, (xp * v).sum(0) / n, rtol=1e-4)
  np.testing.assert_allclose(g.b, leaf.scale * a.T @ (xp * m / n), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(g.a, leaf.scale * (xp * m / n) @ b.T, rtol=1e-4, atol=1e-5)


def _big_outputs(jaxpr, size):
  return [e.primitive.name for e in iter_eqns(jaxpr)
          for v in e.outvars if np.prod(v.aval.shape) >= size]


def test_dora_backward_forms_no_weight_sized_value():
  """The gradient of a factored DoRA matmul adds no weight-sized value to the forward pass, whose
  only weight-sized values square w for its column norms (fused into the reduction)."""
  k, n, r, t = 256, 384, 4, 8
  leaf = _dora_leaf((k, n), (0,), r, seed=1)
  x = rand((t, k), 2)
  tr, fr = jlora.split({"k": leaf})
  fwd = lambda tr: jnp.sum(jlora.lora(lambda p, x: x @ p["k"])(jlora.combine(tr, fr), x))
  fj = jax.make_jaxpr(fwd)(tr).jaxpr
  gj = jax.make_jaxpr(jax.grad(fwd))(tr).jaxpr
  big_f, big_g = _big_outputs(fj, k * n), _big_outputs(gj, k * n)
  assert set(big_f) <= {"square", "integer_pow", "mul", "convert_element_type"}, big_f
  assert big_g == big_f, (big_f, big_g)
  dots = [np.prod(e.outvars[0].aval.shape) for e in iter_eqns(gj)
          if e.primitive.name == "dot_general"]
  assert max(dots) <= r * max(t * k, t * n), dots
  # compiled: the gradient's temporaries are about LoRA's, far below one weight per step
  lora_tr, lora_fr = jlora.split({"k": dataclasses.replace(leaf, m=None)})
  fwd_lora = lambda tr: jnp.sum(jlora.lora(lambda p, x: x @ p["k"])(jlora.combine(tr, lora_fr),
                                                                    x))
  temp = lambda f, tr: jax.jit(jax.grad(f)).lower(tr).compile().memory_analysis().temp_size_in_bytes
  assert temp(fwd, tr) <= temp(fwd_lora, lora_tr) + 4 * k * n // 4, (
      temp(fwd, tr), temp(fwd_lora, lora_tr))


def test_dora_split_axes_materialize_with_a_warning():
  """An einsum keeping one B axis and contracting the other cannot rescale x or the output."""
  leaf = _dora_leaf((8, 3, 4), (0,), 2, seed=2)
  f = lambda t, x: jnp.einsum("bh,dhk->bdk", x, t["k"])
  x = rand((5, 3), 1)
  with pytest.warns(jlora.MaterializeWarning, match="dot_general"):
    got = jlora.lora(f)({"k": leaf}, x)
  np.testing.assert_allclose(got, f({"k": jnp.asarray(_np_dora(leaf), jnp.float32)}, x),
                             rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match="strict=True"):
    jlora.lora(f, strict=True)({"k": leaf}, x)


def test_dora_conv_rescales_output_features():
  leaf = _dora_leaf((3, 3, 4, 6), (0, 1, 2), 2, seed=3)  # Keras layout: b = output features
  x = rand((2, 8, 8, 4), 1)
  conv = lambda t, x: jax.lax.conv_general_dilated(x, t["k"], (1, 1), "SAME",
                                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    got = jlora.lora(conv, strict=True)({"k": leaf}, x)
  np.testing.assert_allclose(got, conv({"k": jnp.asarray(_np_dora(leaf), jnp.float32)}, x),
                             rtol=2e-4, atol=2e-4)


def test_dora_tree_operations_and_optimizer():
  t = jlora.apply({"q_proj": rand((8, 6)), "head": rand((6, 3), 1)}, rank=2, targets="q_proj",
                  trainable="head", dora=True)
  tr, fr = jlora.split(t)
  assert tr["q_proj"].m is not None and fr["q_proj"].m is None and fr["q_proj"].w is not None
  assert jax.tree.structure(jlora.combine(tr, fr)) == jax.tree.structure(t)
  c = jlora.count(t)
  assert c.trainable == 8 * 2 + 2 * 6 + 6 + 18 and c.frozen == 48
  assert "  .m" in jlora.summary(t)
  tx = jlora.optimizer(optax.adam(1e-2), t)
  st = tx.init(t)
  mu = st.inner_states["train"].inner_state[0].mu["q_proj"]
  assert mu.m.shape == (6,) and not hasattr(mu.w, "shape")  # m has moments, w none
  g = jax.tree.map(jnp.ones_like, t)
  u, _ = tx.update(g, st, t)
  assert float(jnp.abs(u["q_proj"].m).min()) > 0 and not np.any(u["q_proj"].w)


def test_dora_sharding_spec_follows_the_weights_b_axes():
  t = jlora.apply({"layers": {"q_proj": {"kernel": jnp.ones((2, 8, 16))}}}, rank=2,
                  stacked="^layers/", targets="q_proj", dora=True)
  specs = jlora.sharding.partition_specs(t, base={"layers/q_proj/kernel": PS(None, "fsdp", "tp")})
  s = specs["layers"]["q_proj"]["kernel"]
  assert s.b == PS(None, None, "tp") and s.m == PS(None, "tp") and s.a == PS(None, "fsdp")


def test_dora_and_residual_checkpoints_round_trip(tmp_path):
  params = {"q_proj": rand((8, 6)), "v_proj": rand((8, 6), 1)}
  t = jlora.apply(params, rank=2, targets=["q_proj", "v_proj"], dora=True, init="pissa")
  t = jax.tree.map(lambda x: dataclasses.replace(x, m=x.m * 1.5, b=x.b + 0.1)
                   if jlora.is_lora(x) else x, t, is_leaf=jlora.is_lora)
  jlora.save(tmp_path / "c", t)
  back = jlora.restore(tmp_path / "c").tree  # from the metadata alone
  assert back["q_proj"].residual == "pissa"
  np.testing.assert_array_equal(back["q_proj"].m, t["q_proj"].m)
  target = jlora.apply(params, rank=2, targets=["q_proj", "v_proj"], dora=True, init="pissa")
  got = jlora.restore(tmp_path / "c", target).tree
  np.testing.assert_array_equal(jlora.merge(got)["v_proj"], jlora.merge(t)["v_proj"])
  with pytest.raises(ValueError, match="DoRA in the checkpoint but plain LoRA.*dora=True"):
    jlora.restore(tmp_path / "c", jlora.apply(params, rank=2, targets=["q_proj", "v_proj"],
                                              init="pissa"))
  with pytest.raises(ValueError, match="residual of init='pissa'.*init='pissa'"):
    jlora.restore(tmp_path / "c", jlora.apply(params, rank=2, targets=["q_proj", "v_proj"],
                                              dora=True))


# ----------------------------------------------------------------------------- PiSSA / OLoRA


def _kernel(shape, seed=0):
  return rand(shape, seed)


@pytest.mark.parametrize("alpha", [4.0, 10.0])
def test_pissa_is_the_scaled_top_singular_part(alpha):
  w = _kernel((12, 20))
  leaf = jlora.apply({"q_proj": w}, rank=3, alpha=alpha, init="pissa")["q_proj"]
  u, s, vh = np.linalg.svd(np.asarray(w, np.float64), full_matrices=False)
  top = (u[:, :3] * s[:3]) @ vh[:3]
  np.testing.assert_allclose(leaf.scale * np.asarray(leaf.a) @ np.asarray(leaf.b), top, atol=1e-4)
  np.testing.assert_allclose(leaf.w, np.asarray(w) - top, atol=1e-4)
  # PEFT: A = sqrt(S/s)·Uhᵀ-rows, B = V·sqrt(S/s): a = U·sqrt(S/s), b = sqrt(S/s)·Vh (up to sign)
  np.testing.assert_allclose(np.abs(leaf.a), np.abs(u[:, :3] * np.sqrt(s[:3] / leaf.scale)),
                             atol=1e-4)
  assert leaf.residual == "pissa"
  np.testing.assert_allclose(jlora.merge({"k": leaf})["k"], w, atol=1e-5)


def test_olora_is_the_scaled_qr_part():
  w = _kernel((12, 20), 1)
  leaf = jlora.apply({"q_proj": w}, rank=3, alpha=7.0, init="olora")["q_proj"]
  q, r = np.linalg.qr(np.asarray(w, np.float64).T)  # PEFT's (out, in) weight
  np.testing.assert_allclose(np.abs(leaf.b), np.abs(q[:, :3].T), atol=1e-5)
  np.testing.assert_allclose(leaf.a @ leaf.b, (q[:, :3] @ r[:3]).T, atol=1e-4)
  np.testing.assert_allclose(leaf.w, np.asarray(w) - leaf.scale * (q[:, :3] @ r[:3]).T,
                             atol=1e-4)
  assert leaf.residual == "olora"


@pytest.mark.parametrize("init", ["pissa", "olora", "pissa_niter_4"])
def test_residual_inits_keep_the_model_stacked_and_n_d(init):
  params = {"layers": {"attn": {"kernel": _kernel((2, 8, 3, 4), 2)}}, "q_proj": _kernel((9, 7))}
  t = jlora.apply(params, rank=2, alpha=3.0, stacked="^layers/", targets="kernel|q_proj",
                  init=init, dora=True)
  merged = jlora.merge(t)
  for p in (("layers", "attn", "kernel"), ("q_proj",)):
    got, want, leaf = merged, params, t
    for k in p:
      got, want, leaf = got[k], want[k], leaf[k]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not np.allclose(leaf.w, want, atol=1e-2)  # w is a residual


def test_pissa_niter_finds_the_principal_part_of_a_gapped_spectrum():
  rng = np.random.default_rng(0)
  u, _ = np.linalg.qr(rng.standard_normal((40, 40)))
  v, _ = np.linalg.qr(rng.standard_normal((30, 30)))
  s = np.array([50.0, 40.0, 30.0] + [1.0 / (i + 1) for i in range(27)])
  w = jnp.asarray((u[:, :30] * s) @ v.T, jnp.float32)
  exact = jlora.apply({"q_proj": w}, rank=3, init="pissa")["q_proj"]
  fast = jlora.apply({"q_proj": w}, rank=3, init="pissa_niter_2")["q_proj"]
  np.testing.assert_allclose(fast.w, exact.w, atol=1e-3)
  assert fast.residual == "pissa_niter_2"


def test_init_and_dora_errors():
  with pytest.raises(ValueError, match="init='pisa' is not one of.*pissa_niter_<n>"):
    jlora.apply({"q_proj": jnp.ones((4, 4))}, rank=2, init="pisa")
  with pytest.raises(TypeError, match="dora=1 must be True or False"):
    jlora.apply({"q_proj": jnp.ones((4, 4))}, rank=2, dora=1)


# ----------------------------------------------------------------------------- LoRA+


def test_lora_plus_equals_two_adamw_optimizers():
  params = {"q_proj": rand((8, 6)), "v_proj": rand((8, 6), 1), "head": rand((6, 3), 2)}
  t = jlora.apply(params, rank=2, targets=["q_proj", "v_proj"], trainable="head", dora=True)
  t = jax.tree.map(lambda x: dataclasses.replace(x, b=x.b + 0.1) if jlora.is_lora(x) else x, t,
                   is_leaf=jlora.is_lora)
  lr, lam, wd = 1e-2, 16.0, 0.3
  ours = jlora.optimizer(optax.chain(optax.adamw(lr, weight_decay=wd), jlora.lora_plus(lam)))

  def label(tree):  # the reference: b on its own optimizer with lam * lr
    def lab(x):
      if jlora.is_lora(x):
        return dataclasses.replace(x, w="frozen", a="a", b="b", m="a")
      return jlora.Trainable("a") if isinstance(x, jlora.Trainable) else "frozen"
    return jax.tree.map(lab, tree, is_leaf=lambda x: isinstance(x, (jlora.LoRA, jlora.Trainable)))

  ref = optax.partition({"a": optax.adamw(lr, weight_decay=wd),
                         "b": optax.adamw(lam * lr, weight_decay=wd),
                         "frozen": optax.set_to_zero()}, label)
  s1, s2, p1, p2 = ours.init(t), ref.init(t), t, t
  assert all(not hasattr(v, "shape") or v.shape != (8, 6)
             for v in jax.tree.leaves(s1))  # no w-sized state
  for step in range(3):
    g = jax.tree.map(lambda x: rand(x.shape, 10 + step), t)
    u1, s1 = ours.update(g, s1, p1)
    u2, s2 = ref.update(g, s2, p2)
    p1, p2 = optax.apply_updates(p1, u1), optax.apply_updates(p2, u2)
  for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  np.testing.assert_array_equal(p1["q_proj"].w, params["q_proj"])
  assert not np.allclose(p1["q_proj"].b, t["q_proj"].b)
  with pytest.raises(TypeError, match="ratio='16' must be a finite number"):
    jlora.lora_plus("16")


def test_dora_backward_reads_the_named_output_instead_of_recomputing_the_matmul():
  """With a remat policy that keeps the projection's output (as a model that names it does) and
  jlora's names, DoRA's backward pass runs as many weight-sized matmuls as LoRA's: the
  magnitude's gradient reads the rescaled output `"jlora_dora"`, not the matmul before it."""
  from jax.ad_checkpoint import checkpoint_name
  w = rand((64, 96), 1, scale=0.1)
  x = rand((16, 64), 2)
  policy = jax.checkpoint_policies.save_only_these_names("proj", "jlora_xa", "jlora_dora")

  def f(p, x):
    body = jax.checkpoint(lambda p, x: jnp.tanh(checkpoint_name(x @ p["w"], "proj")),
                          policy=policy)
    return jnp.sum(body(p, x) ** 2)

  def big_dots(tree):
    tr, fr = jlora.split(tree)
    jaxpr = jax.make_jaxpr(jax.grad(lambda tr: jlora.lora(f)(jlora.combine(tr, fr), x)))(tr)
    return sum(1 for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"
               and any(tuple(v.aval.shape) in ((64, 96), (96, 64)) for v in e.invars)
               and e.outvars[0].aval.shape[0] == 16)  # token rows: not the norm's aᵀw

  lora = randomize_b(jlora.apply({"w": w}, rank=4, targets="w"))
  dora = randomize_b(jlora.apply({"w": w}, rank=4, targets="w", dora=True))
  assert big_dots(dora) == big_dots(lora)


def _all_eqns(jaxpr):
  for e in jaxpr.eqns:
    yield e
    for v in e.params.values():
      for u in (v if isinstance(v, (tuple, list)) else [v]):
        sub = getattr(u, "jaxpr", u)
        if hasattr(sub, "eqns"):
          yield from _all_eqns(sub)
