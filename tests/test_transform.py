"""`jlora.lora(fn)`: factored execution equals the merged weights, through control flow."""

import dataclasses
import types
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st
from jax import lax

import jlora
from tests import helpers
from tests.helpers import iter_eqns

KEY = jax.random.key(0)


def randomize_b(tree, seed=1):
  """Nonzero `b` (and a non-unit scale) so the adapters actually contribute."""
  return helpers.randomize_b(tree, seed, scale=0.5, alpha_mult=1.5)


def trainable_grads(loss, tree):
  t, f = jlora.split(tree)
  return jax.value_and_grad(lambda t: loss(jlora.combine(t, f)))(t)


def assert_equivalent(apply_fn, tree, *args, rtol=1e-5, atol=1e-5, strict=True):
  """Outputs and gradients wrt a/b of the factored path equal those of the merge path.

  Tolerances are relative to the largest output / gradient magnitude (dtype-aware
  callers pass bf16-sized ones). One jit compiles both paths.
  """
  fact = jlora.lora(apply_fn, strict=strict)

  @jax.jit
  def both(tree, args):
    y_f, y_m = fact(tree, *args), apply_fn(jlora.merge(tree), *args)
    proj = jax.random.normal(jax.random.key(7), y_m.shape, jnp.float32)
    loss_f = lambda p: jnp.sum(fact(p, *args).astype(jnp.float32) * proj)
    loss_m = lambda p: jnp.sum(apply_fn(jlora.merge(p), *args).astype(jnp.float32) * proj)
    return y_f, y_m, trainable_grads(loss_f, tree), trainable_grads(loss_m, tree)

  y_f, y_m, (lf, gf), (lm, gm) = both(tree, args)
  y_scale = max(1.0, float(jnp.max(jnp.abs(y_m.astype(jnp.float32)))))
  np.testing.assert_allclose(y_f, y_m, rtol=rtol, atol=atol * y_scale)
  np.testing.assert_allclose(lf, lm, rtol=rtol, atol=atol * max(1, float(abs(lm))))
  gf_l, gm_l = jax.tree.leaves(gf), jax.tree.leaves(gm)
  assert len(gf_l) == len(gm_l) > 0
  for a, b in zip(gf_l, gm_l):
    scale = max(1.0, float(jnp.max(jnp.abs(b))))
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * scale)


def params_apply(module):
  return lambda p, *a: module.apply({"params": p}, *a)


# --------------------------------------------------------------------------- models


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(32, name="up_proj")(x))
    return nn.Dense(8, name="down_proj")(x)


class DGAttention(nn.Module):
  """Attention with DenseGeneral projections: several input and output axes."""
  heads: int = 4
  head_dim: int = 6

  @nn.compact
  def __call__(self, x):
    q = nn.DenseGeneral((self.heads, self.head_dim), name="query")(x)
    k = nn.DenseGeneral((self.heads, self.head_dim), name="key")(x)
    v = nn.DenseGeneral((self.heads, self.head_dim), name="value")(x)
    att = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(self.head_dim))
    o = jnp.einsum("bnts,bsnh->btnh", att, v)
    return nn.DenseGeneral(x.shape[-1], axis=(-2, -1), name="out")(o)


class EinsumAttention(nn.Module):
  heads: int = 4
  head_dim: int = 6

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    q = nn.Einsum((self.heads, d, self.head_dim), "btd,ndh->btnh", name="query")(x)
    v = nn.Einsum((self.heads, d, self.head_dim), "btd,ndh->btnh", name="value")(x)
    att = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, q) / np.sqrt(self.head_dim))
    o = jnp.einsum("bnts,bsnh->btnh", att, v)
    return nn.Einsum((self.heads, self.head_dim, d), "btnh,nhd->btd", name="out")(o)


IN_AXES_DG = {"query|key|value": (0,), "out": (0, 1)}
IN_AXES_EINSUM = {"query|value": (1,), "out": (0, 1)}


def x3(d=16, seed=3):
  return jax.random.normal(jax.random.key(seed), (2, 5, d))


def test_mlp_equivalence():
  m = MLP()
  x = jax.random.normal(jax.random.key(1), (4, 16))
  p = m.init(KEY, x)["params"]
  t = randomize_b(jlora.apply(p, rank=3, targets="all-linear"))
  assert_equivalent(params_apply(m), t, x)


@pytest.mark.parametrize("layout", ["keras", "fan"])
def test_dense_general_attention(layout):
  m = DGAttention()
  x = x3()
  p = m.init(KEY, x)["params"]
  t = randomize_b(jlora.apply(p, rank=2, targets="all-linear", layout=layout,
                              in_axes=IN_AXES_DG if layout == "fan" else None))
  assert_equivalent(params_apply(m), t, x)


@pytest.mark.parametrize("layout", ["keras", "fan"])
def test_einsum_attention(layout):
  m = EinsumAttention()
  x = x3()
  p = m.init(KEY, x)["params"]
  t = randomize_b(jlora.apply(p, rank=2, targets="all-linear", layout=layout,
                              in_axes=IN_AXES_EINSUM if layout == "fan" else None))
  q = t["query"]["kernel"]
  if layout == "keras":  # per-head a, as Keras's EinsumDense
    assert q.a.shape == (4, 16, 2) and q.b.shape == (2, 6)
  else:
    assert q.a.shape == (16, 2) and q.b.shape == (2, 4, 6)
  assert_equivalent(params_apply(m), t, x)


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = nn.Dense(16, name="q_proj")(x)
    h = nn.Dense(x.shape[-1], name="v_proj")(jnp.tanh(h))
    return x + h, None


class Scanned(nn.Module):
  remat: bool = False

  @nn.compact
  def __call__(self, x):
    blk = nn.remat(Block) if self.remat else Block
    stack = nn.scan(blk, variable_axes={"params": 0}, split_rngs={"params": True}, length=4)
    x, _ = stack(name="layers")(x, None)
    return x


@pytest.mark.parametrize("remat", [False, True])
def test_nn_scan_stacked(remat):
  m = Scanned(remat=remat)
  x = jax.random.normal(jax.random.key(2), (3, 8))
  p = m.init(KEY, x)["params"]
  assert p["layers"]["q_proj"]["kernel"].shape == (4, 8, 16)
  t = randomize_b(jlora.apply(p, rank=2, stacked=r"^layers/"))
  assert t["layers"]["q_proj"]["kernel"].a.shape == (4, 8, 2)
  assert_equivalent(params_apply(m), t, x)
  # stays factored inside the loop: nothing is materialized (strict passes) and the
  # loop body's dot_generals never produce a (8, 16) kernel-sized array.
  jaxpr = jax.make_jaxpr(jlora.lora(params_apply(m), strict=True))(t, x)
  assert "scan" in str(jaxpr)


class Remat(nn.Module):
  @nn.compact
  def __call__(self, x):
    d = nn.remat(nn.Dense)(24, name="q_proj")
    return nn.Dense(4, name="v_proj")(jnp.tanh(d(x)))


def test_nn_remat():
  m = Remat()
  x = jax.random.normal(jax.random.key(2), (3, 8))
  p = m.init(KEY, x)["params"]
  t = randomize_b(jlora.apply(p, rank=2))
  assert_equivalent(params_apply(m), t, x)
  assert "checkpoint" in str(jax.make_jaxpr(jlora.lora(params_apply(m)))(t, x)) or "remat" in str(
      jax.make_jaxpr(jlora.lora(params_apply(m)))(t, x))


class EmbedLM(nn.Module):
  @nn.compact
  def __call__(self, ids):
    emb = nn.Embed(50, 12, name="embed_tokens")
    h = emb(ids)
    h = h + nn.Dense(12, name="q_proj")(h)
    return emb.attend(h)  # tied head: a matmul with the transposed table


def test_embed_target_lookup_and_attend():
  m = EmbedLM()
  ids = jax.random.randint(jax.random.key(4), (3, 7), 0, 50)
  p = m.init(KEY, ids)["params"]
  t = jlora.apply(p, rank=3, targets=["embed_tokens", "q_proj"])
  assert isinstance(t["embed_tokens"]["embedding"], jlora.LoRA)
  t = randomize_b(t)
  assert_equivalent(params_apply(m), t, ids)


def test_default_targets_skip_embeddings():
  p = EmbedLM().init(KEY, jnp.ones((1, 2), jnp.int32))["params"]
  t = jlora.apply(p, rank=2, targets="all-linear")
  assert not isinstance(t["embed_tokens"]["embedding"], jlora.LoRA)


class NNXModel(nnx.Module):
  def __init__(self, rngs):
    self.q_proj = nnx.Linear(8, 16, rngs=rngs)
    self.v_proj = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    return self.v_proj(jnp.tanh(self.q_proj(x)))


def test_nnx_split_merge():
  model = NNXModel(nnx.Rngs(0))
  graphdef, state = nnx.split(model)
  x = jax.random.normal(jax.random.key(5), (3, 8))
  t = randomize_b(jlora.apply(state, rank=2))

  def run(st, x):
    return nnx.merge(graphdef, st)(x)

  assert_equivalent(run, t, x)


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Conv(6, (3, 3), name="conv1")(x))
    x = nn.Conv(5, (3, 3), strides=2, padding="VALID", kernel_dilation=1, name="conv2")(x)
    return x.mean((1, 2))


def test_conv_factored_in_keras_and_fan_layouts_else_materialized():
  m = ConvNet()
  x = jax.random.normal(jax.random.key(19), (2, 9, 9, 4))
  p = m.init(KEY, x)["params"]
  t = randomize_b(jlora.apply(p, rank=2, targets="conv"))
  assert t["conv1"]["kernel"].a.shape == (3, 3, 4, 2)
  assert_equivalent(params_apply(m), t, x)  # strict: no materialization
  t1 = randomize_b(jlora.apply(p, rank=2, targets="conv", layout="fan",
                               in_axes={"conv": (2,)}))
  assert t1["conv1"]["kernel"].a.shape == (4, 2)  # x·a pointwise, then a conv with b
  assert_equivalent(params_apply(m), t1, x)
  t2 = randomize_b(jlora.apply(p, rank=2, targets="conv", layout="fan",
                               in_axes={"conv": (0, 1)}))  # a: spatial axes alone
  with pytest.warns(jlora.MaterializeWarning, match="conv_general_dilated"):
    y = jlora.lora(params_apply(m))(t2, x)
  np.testing.assert_allclose(y, m.apply({"params": jlora.merge(t2)}, x), rtol=1e-5, atol=1e-5)


def test_bf16_compute_with_f32_adapters():
  m = nn.Dense(16, dtype=jnp.bfloat16, name="q_proj")
  x = jax.random.normal(jax.random.key(6), (4, 32))
  p = {"q_proj": m.init(KEY, x)["params"]}
  t = randomize_b(jlora.apply(p, rank=4))
  assert t["q_proj"]["kernel"].a.dtype == jnp.float32
  f = lambda p, x: m.apply({"params": p["q_proj"]}, x)
  y = jlora.lora(f)(t, x)
  assert y.dtype == jnp.bfloat16
  assert_equivalent(f, t, x, rtol=2e-2, atol=2e-2)


def test_bf16_weights():
  w = jax.random.normal(jax.random.key(8), (32, 16), jnp.bfloat16)
  t = randomize_b(jlora.apply({"q_proj": w}, rank=4))
  x = jax.random.normal(jax.random.key(6), (4, 32), jnp.bfloat16)
  assert_equivalent(lambda p, x: x @ p["q_proj"], t, x, rtol=2e-2, atol=2e-2)


def test_reshape_transpose_and_nested_jit():
  w = jax.random.normal(jax.random.key(9), (12, 4, 5))  # (in, heads, hd)
  t = randomize_b(jlora.apply({"wq": w}, rank=3, layout="fan", in_axes=(0,)))
  x = jax.random.normal(jax.random.key(10), (6, 12))

  @jax.jit
  def f(p, x):
    k = p["wq"].reshape(12, 20)          # merge the output axes
    y1 = x @ k
    kt = jnp.transpose(p["wq"], (1, 2, 0))  # (heads, hd, in)
    y2 = jnp.einsum("bi,nhi->bnh", x, kt)
    return y1 + y2.reshape(6, 20)

  assert_equivalent(f, t, x)


def test_cond_switch_while_fori():
  w = jax.random.normal(jax.random.key(11), (8, 8)) / 3
  t = randomize_b(jlora.apply({"q_proj": w}, rank=2))
  x = jax.random.normal(jax.random.key(12), (3, 8))

  def f(p, x):
    y = lax.cond(x.sum() > 0, lambda h: h @ p["q_proj"], lambda h: -(h @ p["q_proj"]), x)
    y = lax.switch(1, [lambda h: h, lambda h: jnp.tanh(h @ p["q_proj"])], y)
    y = lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["q_proj"]), y)
    _, y = lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, jnp.tanh(c[1] @ p["q_proj"])),
                          (0, y))
    return y

  y = jlora.lora(f, strict=True)(t, x)
  np.testing.assert_allclose(y, f(jlora.merge(t), x), rtol=1e-5, atol=1e-5)
  # reverse-mode through while is unsupported by JAX itself; check grads without it
  def g(p, x):
    y = lax.cond(x.sum() > 0, lambda h: h @ p["q_proj"], lambda h: -(h @ p["q_proj"]), x)
    y = lax.fori_loop(0, 3, lambda i, h: jnp.tanh(h @ p["q_proj"]), y)  # a scan: static bounds
    return lax.switch(1, [lambda h: h, lambda h: jnp.tanh(h @ p["q_proj"])], y)

  assert_equivalent(g, t, x)


def test_custom_jvp_vjp_functions():
  w = jax.random.normal(jax.random.key(13), (8, 8)) / 3
  t = randomize_b(jlora.apply({"q_proj": w}, rank=2))
  x = jax.random.normal(jax.random.key(14), (3, 8))

  @jax.custom_vjp
  def clip_grad(h):
    return h

  clip_grad.defvjp(lambda h: (h, None), lambda _, g: (jnp.clip(g, -0.1, 0.1),))

  def f(p, x):  # custom rules on activations: the weight use stays factored
    h = jax.nn.relu(x @ p["q_proj"])  # relu is a custom_jvp function
    return clip_grad(h) @ p["q_proj"]

  assert_equivalent(f, t, x)

  @jax.custom_jvp
  def matmul(h, k):
    return h @ k

  matmul.defjvp(lambda pr, tn: (matmul(*pr), tn[0] @ pr[1] + pr[0] @ tn[1]))
  g = lambda p, x: matmul(x, p["q_proj"])  # the kernel enters a custom rule: materialized
  with pytest.warns(jlora.MaterializeWarning, match=r"q_proj.*custom_jvp_call"):
    y = jlora.lora(g)(t, x)
  np.testing.assert_allclose(y, g(jlora.merge(t), x), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"strict=True.*q_proj.*custom_jvp_call"):
    jlora.lora(g, strict=True)(t, x)


def test_unfactorable_op_warns_once_and_strict_raises():
  w = jax.random.normal(jax.random.key(15), (8, 6))
  t = randomize_b(jlora.apply({"q_proj": w}, rank=2))
  x = jax.random.normal(jax.random.key(16), (3, 8))
  f = lambda p, x: x @ (p["q_proj"] * 2.0) + x @ (p["q_proj"] * 2.0)
  with warnings.catch_warnings(record=True) as rec:
    warnings.simplefilter("always")
    y = jlora.lora(f)(t, x)
  msgs = [str(r.message) for r in rec if issubclass(r.category, jlora.MaterializeWarning)]
  assert len(msgs) == 1 and "q_proj" in msgs[0] and "mul" in msgs[0]
  np.testing.assert_allclose(y, f(jlora.merge(t), x), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match=r"strict=True.*'q_proj'.*`mul`"):
    jlora.lora(f, strict=True)(t, x)
  with pytest.warns(jlora.MaterializeWarning, match="output of the function"):
    out = jlora.lora(lambda p: p["q_proj"])(t)
  np.testing.assert_allclose(out, jlora.merge(t)["q_proj"], rtol=1e-6)


def test_split_half_and_no_lora_are_reported():
  t = jlora.apply({"q_proj": jnp.ones((4, 6))}, rank=2)
  with pytest.raises(ValueError, match=r"'q_proj'.*missing field.*jlora.combine"):
    jlora.lora(lambda p: p["q_proj"].sum())(jlora.split(t).trainable)
  with pytest.warns(UserWarning, match="no jlora.LoRA or jlora.Quantized leaf"):
    jlora.lora(lambda x: x * 2)(jnp.ones(3))


_USED_AS_ARRAY = {
    "flax apply": lambda m, p, x: m.apply({"params": p}, x),
    "jitted flax apply": lambda m, p, x: jax.jit(lambda p, x: m.apply({"params": p}, x))(p, x),
    "jnp.asarray": lambda m, p, x: jnp.asarray(p["kernel"]),
    "np.asarray": lambda m, p, x: np.asarray(p["kernel"]),
    "matmul": lambda m, p, x: x @ p["kernel"],
    "einsum": lambda m, p, x: jnp.einsum("bi,io->bo", x, p["kernel"]),
}


@pytest.mark.parametrize("use", list(_USED_AS_ARRAY))
@pytest.mark.parametrize("kind", ["LoRA", "Trainable"])
def test_a_jlora_tree_used_as_arrays_names_jlora_lora_and_merge(use, kind):
  """A jlora tree passed to a function without jlora.lora: a TypeError naming the leaf and
  both ways out (it was "float() argument must be ... not 'LoRA'")."""
  m = nn.Dense(6)
  x = jax.random.normal(jax.random.key(40), (3, 4))
  p = m.init(KEY, x)["params"]
  if kind == "LoRA":
    t = randomize_b(jlora.apply(p, rank=2, targets="kernel"))
  else:
    t = {"kernel": jlora.Trainable(p["kernel"]), "bias": p["bias"]}
  what = r"\(weight float32\[4, 6\], rank 2\)" if kind == "LoRA" else r"\(float32\[4, 6\]\)"
  with pytest.raises(TypeError, match=rf"jlora.{kind}: a jlora.{kind} leaf {what} was used as "
                                      r"an array.*jlora.lora\(fn\).*jlora.merge\(tree\)"):
    _USED_AS_ARRAY[use](m, t, x)
  # the ways out work on the same tree; the leaf still flattens, crosses jit and prints
  want = m.apply({"params": jlora.merge(t)}, x)
  if kind == "LoRA":
    np.testing.assert_allclose(jlora.lora(_USED_AS_ARRAY["flax apply"])(m, t, x), want,
                               rtol=1e-5, atol=1e-5)
  else:
    np.testing.assert_allclose(want, m.apply({"params": p}, x), rtol=1e-6)
  assert len(jax.tree.leaves(jax.jit(lambda t: t)(t))) == len(jax.tree.leaves(t)) >= 2
  assert repr(t["kernel"]).startswith(f"{kind}(")


def test_trainable_leaves_pass_as_values():
  t = jlora.apply({"q_proj": jax.random.normal(KEY, (4, 6)), "head": jnp.arange(6.0)}, rank=2,
                  trainable="head")
  f = lambda p, x: x @ p["q_proj"] + p["head"]
  x = jax.random.normal(jax.random.key(1), (2, 4))
  np.testing.assert_allclose(jlora.lora(f)(t, x), f(jlora.merge(t), x), rtol=1e-6)


def test_vmap_over_stacked_weights_as_batch_dims():
  w = jax.random.normal(jax.random.key(17), (3, 8, 5))
  t = randomize_b(jlora.apply({"layers": {"q_proj": w}}, rank=2, stacked="^layers/"))
  x = jax.random.normal(jax.random.key(18), (3, 4, 8))
  f = lambda p, x: jax.vmap(lambda k, h: h @ k)(p["layers"]["q_proj"], x)
  assert_equivalent(f, t, x)


def _dot_output_sizes(jaxpr):
  return [tuple(e.outvars[0].aval.shape) for e in iter_eqns(jaxpr)
          if e.primitive.name == "dot_general"]


def _max_intermediate(jaxpr):
  return max(int(np.prod(getattr(v.aval, "shape", ()))) for e in iter_eqns(jaxpr)
             for v in e.outvars)


def test_factored_matmuls_are_two_skinny_matmuls():
  """x·A then ·B: no intermediate larger than the activations (e.g. no tokens×in×rank)."""
  w = jax.random.normal(jax.random.key(20), (32, 48))
  t = randomize_b(jlora.apply({"q_proj": w}, rank=8))
  x = jax.random.normal(jax.random.key(21), (64, 32))
  trainable, frozen = jlora.split(t)
  loss = lambda tr: jnp.sum(jlora.lora(lambda p, x: x @ p["q_proj"])(jlora.combine(tr, frozen),
                                                                     x) ** 2)
  jaxpr = jax.make_jaxpr(jax.value_and_grad(loss))(trainable).jaxpr
  assert _max_intermediate(jaxpr) <= 64 * 48  # the output y; x⊗A would be 64·32·8


def test_backward_never_forms_a_full_weight_gradient():
  """The gradient jaxpr of a factored loss has no dot_general of a targeted W's size."""
  m = MLP()
  x = jax.random.normal(jax.random.key(1), (64, 16))
  t = randomize_b(jlora.apply(m.init(KEY, x)["params"], rank=2, targets="all-linear"))
  w_shapes = {(16, 32), (32, 8)}
  trainable, frozen = jlora.split(t)

  def grad_jaxpr(apply_fn):
    loss = lambda tr: jnp.mean(apply_fn(jlora.combine(tr, frozen), x) ** 2)
    return jax.make_jaxpr(jax.grad(loss))(trainable).jaxpr

  fact = _dot_output_sizes(grad_jaxpr(jlora.lora(params_apply(m), strict=True)))
  merged = _dot_output_sizes(grad_jaxpr(lambda p, x: m.apply({"params": jlora.merge(p)}, x)))
  assert fact and not (set(fact) & w_shapes), fact
  assert set(merged) & w_shapes, merged  # the merge path does form x^T·dy of W's size


@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_random_einsums(data):
  """Random kernel shapes, layouts and contracted axis choices."""
  nk = data.draw(st.integers(2, 4), label="kernel ndim")
  kshape = tuple(data.draw(st.lists(st.integers(2, 5), min_size=nk, max_size=nk)))
  layout = data.draw(st.sampled_from(["keras", "fan"]))
  n_in = data.draw(st.integers(1, nk - 1))
  perm = data.draw(st.permutations(range(nk)))
  contracted = tuple(sorted(perm[:n_in]))
  in_axes = contracted if layout == "fan" else None
  fan_in = int(np.prod([kshape[i] for i in range(nk - 1)])) if layout == "keras" else int(
      np.prod([kshape[i] for i in contracted]))
  fan_out = int(np.prod(kshape)) // fan_in
  rank = data.draw(st.integers(1, max(1, min(fan_in, fan_out) - 1)))
  if rank >= min(fan_in, fan_out):
    return
  seed = data.draw(st.integers(0, 2**16))
  w = jax.random.normal(jax.random.key(seed), kshape)
  t = randomize_b(jlora.apply({"q_proj": w}, rank=rank, layout=layout, in_axes=in_axes),
                  seed=seed)
  letters = "ijkl"
  k_sub = letters[:nk]
  x_sub = "b" + "".join(k_sub[i] for i in contracted)
  o_sub = "b" + "".join(k_sub[i] for i in range(nk) if i not in contracted)
  x = jax.random.normal(jax.random.key(seed + 1), (3,) + tuple(kshape[i] for i in contracted))
  f = lambda p, x: jnp.einsum(f"{x_sub},{k_sub}->{o_sub}", x, p["q_proj"])
  assert_equivalent(f, t, x, rtol=1e-4, atol=1e-4)


def _count_xa(jaxpr, x_shape, a_shape):
  """dot_generals of an `x` and an `a` of these shapes, nested jaxprs included."""
  want = sorted([tuple(x_shape), tuple(a_shape)])
  return sum(sorted(tuple(v.aval.shape) for v in e.invars) == want for e in iter_eqns(jaxpr)
             if e.primitive.name == "dot_general")


def test_weight_passed_through_a_checkpoint_stays_factored():
  """A checkpointed function that returns its weights (Flax NNX's `nnx.remat` returns the
  block's state) hands them on as LoRA weights: nothing is materialized, the weight used
  after the checkpoint is still factored, and no weight-sized gradient is formed."""
  kw, kx = jax.random.split(jax.random.key(40))
  tree = randomize_b(jlora.apply({"q_proj": jax.random.normal(kw, (24, 40))}, rank=4))
  x = jax.random.normal(kx, (3, 24))

  def f(p, x):
    def block(p, x):
      return p, jnp.tanh(x @ p["q_proj"])
    p, y = jax.checkpoint(block, policy=jax.checkpoint_policies.nothing_saveable)(p, x)
    return jnp.sum(y * (x @ p["q_proj"]))

  train, frozen = jlora.split(tree)
  loss = lambda tr, x: jlora.lora(f, strict=True)(jlora.combine(tr, frozen), x)
  got = jax.value_and_grad(loss)(train, x)
  want = jax.value_and_grad(lambda tr, x: f(jlora.merge(jlora.combine(tr, frozen)), x))(train, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
  assert (24, 40) not in _dot_output_sizes(jax.make_jaxpr(jax.grad(loss))(train, x).jaxpr)


def test_adapter_activation_is_named_for_remat_policies():
  """A policy that saves "jlora_xa" keeps x·a for the backward pass instead of recomputing it."""
  kw, kx = jax.random.split(jax.random.key(7))
  tree = randomize_b(jlora.apply({"q_proj": jax.random.normal(kw, (32, 48))}, rank=4))
  x = jax.random.normal(kx, (16, 32))
  train, frozen = jlora.split(tree)

  def grad_of(policy):
    f = jax.checkpoint(lambda p, x: jnp.sum(jnp.tanh(x @ p["q_proj"]) ** 2), policy=policy)
    g = lambda tr: jlora.lora(f, strict=True)(jlora.combine(tr, frozen), x)
    return jax.make_jaxpr(jax.grad(g))(train).jaxpr, jax.grad(g)(train)

  cp = jax.checkpoint_policies
  recompute, g0 = grad_of(cp.nothing_saveable)
  saved, g1 = grad_of(cp.save_only_these_names("jlora_xa"))
  assert _count_xa(recompute, (16, 32), (32, 4)) == 2  # the forward's and the backward's
  assert _count_xa(saved, (16, 32), (32, 4)) == 1
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(g0["q_proj"].a).max()) > 0


def _fold_case(k=24, n=64, r=8, m=16):
  kw, kx = jax.random.split(jax.random.key(30))
  tree = randomize_b(jlora.apply({"up_proj": jax.random.normal(kw, (k, n))}, rank=r,
                                targets="all-linear"))
  x = jax.random.normal(kx, (2, m, k))
  return tree, x, lambda p, x: jnp.tanh(x @ p["up_proj"])


def test_folded_adapter_matmul_equals_the_unfolded_one(monkeypatch):
  """`[x, s·x·a]·[w; b]` as one matmul: same values, gradients (reverse and forward mode)
  and no full weight gradient for a frozen w; w's own gradient when w is differentiated."""
  tree, x, f = _fold_case()
  lv = tree["up_proj"]
  train, frozen = jlora.split(tree)
  tangent = jax.random.normal(jax.random.key(31), x.shape)
  res = {}
  for mode in ("never", "always"):
    loss = lambda tr, x: jnp.sum(jlora.lora(f, strict=True, fold=mode)(tr, x) ** 2)
    full = lambda tr, x: loss(jlora.combine(tr, frozen), x)
    wgrad = lambda w, x: jax.grad(
        lambda w: loss({"up_proj": dataclasses.replace(lv, w=w)}, x))(w)
    fwd_mode = lambda: jax.jvp(lambda x: jlora.lora(f, fold=mode)(tree, x), (x,), (tangent,))
    y = jlora.lora(f, fold=mode)(tree, x)
    (val, g), gx = jax.value_and_grad(full)(train, x), jax.grad(full, 1)(train, x)
    res[mode] = (y, val, g, gx, wgrad(lv.w, x), fwd_mode())
    jaxpr = jax.make_jaxpr(jax.grad(full))(train, x).jaxpr
    concats = [e for e in iter_eqns(jaxpr) if e.primitive.name == "concatenate"]
    assert len(concats) == (2 if mode == "always" else 0)
    dots = _dot_output_sizes(jaxpr)
    assert (24, 64) not in dots and (32, 64) not in dots, dots  # no (K or K+r) x N gradient
  for a, b in zip(jax.tree.leaves(res["always"]), jax.tree.leaves(res["never"])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)  # float32, other summation orders
  merged_w_grad = jax.grad(lambda w: jnp.sum(f({"up_proj": w + jlora.merge(tree)["up_proj"]
                                                - lv.w}, x) ** 2))(lv.w)
  np.testing.assert_allclose(res["always"][4], merged_w_grad, rtol=1e-4, atol=1e-4)
  assert float(jnp.abs(res["always"][2]["up_proj"].a).max()) > 0


def test_folded_matmul_is_kept_by_a_dots_remat_policy():
  """Under `jax.checkpoint` with XLA's `dots_with_no_batch_dims_saveable`, the folded matmul
  is a dot the policy keeps, as the unfolded `x·W` and `t·B` are: the backward pass does not
  run it again (the all-linear step on a GPU, where the rule folds the up-projections, ran
  every folded matmul twice and was 5 % slower than the same LoRA written inline)."""
  tree, x, f = _fold_case()
  train, frozen = jlora.split(tree)
  out_shape = x.shape[:-1] + (64,)
  counts = {}
  for policy in ("dots_with_no_batch_dims_saveable", "nothing_saveable"):
    g = jax.checkpoint(lambda tr, x: jnp.sum(f(tr, x) ** 2),
                       policy=getattr(jax.checkpoint_policies, policy))
    for mode in ("never", "always"):
      loss = lambda tr, x: jlora.lora(g, fold=mode)(jlora.combine(tr, frozen), x)
      jaxpr = jax.make_jaxpr(jax.grad(loss))(train, x).jaxpr
      counts[policy, mode] = sum(1 for e in iter_eqns(jaxpr) if e.primitive.name == "dot_general"
                                 and tuple(e.outvars[0].aval.shape) == out_shape)
  # x·W and t·B: run once and kept, or run again in the backward pass; folded: one matmul
  assert counts["dots_with_no_batch_dims_saveable", "never"] == 2, counts
  assert counts["dots_with_no_batch_dims_saveable", "always"] == 1, counts
  assert counts["nothing_saveable", "never"] == 4, counts
  assert counts["nothing_saveable", "always"] == 2, counts


def _folds(k, n, r, fold="auto", close_over_tree=False):
  """Whether jlora.lora folds `_fold_case(k, n, r)` (M = 32 rows) under a trace: the tree
  traced too (its platform unknown), or closed over as concrete arrays (on the CPU)."""
  tree, x, f = _fold_case(k, n, r)
  if close_over_tree:
    jaxpr = jax.make_jaxpr(lambda x: jlora.lora(f, fold=fold)(tree, x))(x).jaxpr
  else:
    jaxpr = jax.make_jaxpr(jlora.lora(f, fold=fold))(tree, x).jaxpr
  return any(e.primitive.name == "concatenate" for e in iter_eqns(jaxpr))


def _on_a_gpu(monkeypatch):
  """The default backend reads as a GPU (what jlora.lora falls back to under a trace)."""
  gpu = types.SimpleNamespace(platform="gpu")
  monkeypatch.setattr(jax, "devices", lambda *a, **k: [gpu])


def test_fold_rule_on_gpu_takes_wide_up_projections_only(monkeypatch):
  """By default the fold runs on GPUs only, for N >= 2K and K + r a multiple of 8."""
  assert jax.default_backend() == "cpu" and not _folds(24, 64, 8)
  _on_a_gpu(monkeypatch)
  assert _folds(24, 64, 8) and _folds(24, 48, 8)
  assert not _folds(24, 47, 8)  # N < 2K: the add is cheaper than the copies
  assert not _folds(24, 64, 4)  # K + r = 28: unaligned rows
  assert not _folds(24, 64, 8, fold="never")


def test_fold_rule_reads_the_platform_where_the_arrays_live(monkeypatch):
  """Concrete arrays (a tree closed over under a trace) and a mesh set with jax.set_mesh
  say where the function runs; the default backend only decides when neither does."""
  _on_a_gpu(monkeypatch)
  assert _folds(24, 64, 8)  # every operand traced: the default backend (faked GPU)
  assert not _folds(24, 64, 8, close_over_tree=True)  # the weights live on the CPU
  assert _folds(24, 64, 8, fold="always", close_over_tree=True)  # "always": any platform
  with jax.set_mesh(jax.make_mesh((1,), ("data",), devices=jax.local_devices()[:1])):
    # The mesh's devices are CPUs; a trace sees that where JAX's abstract mesh records its
    # platform (not on jax 0.7.2, where the default backend decides).
    seen = getattr(jax.sharding.get_abstract_mesh().abstract_device, "platform", None)
    assert _folds(24, 64, 8) == (seen is None)


def test_fold_argument_is_checked():
  with pytest.raises(ValueError, match=r"jlora.lora: fold='gpu' is not one of \('auto', "
                                       r"'never', 'always', 'bytes'\)"):
    jlora.lora(lambda p: p, fold="gpu")


def test_fold_rule_by_bytes_alone(monkeypatch):
  """`fold="bytes"` folds where 4·M·N > 2·M·K + 2·K·N, whatever N/K (GPUs only)."""
  assert not _folds(24, 20, 8, fold="bytes")  # on the CPU: never
  _on_a_gpu(monkeypatch)
  assert _folds(24, 20, 8, fold="bytes")  # 2560 > 1536 + 960
  assert not _folds(24, 16, 8, fold="bytes")  # 2048 < 1536 + 768
  assert not _folds(24, 20, 4, fold="bytes")  # K + r = 28: unaligned rows
