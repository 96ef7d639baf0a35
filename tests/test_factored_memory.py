"""`jlora.lora` runs every `dot_general` as two skinny matmuls, whichever kernel axes it contracts.

Issue 15: a weight used transposed (`x @ w.T`, a tied LM head's `nn.Embed.attend`, an einsum
over the kernel's output axes, the backward pass of a `jax.grad` taken inside the function)
made the factored path form a tokens x out x in x rank tensor, because the rule always
computed `x·a` first. The rule now picks the order, `(x·a)·b` or `(x·b)·a`, whose rank-wide
intermediate is the smaller.

The bound every test here checks: with `x` the activation, `w` the kernel (stack axes
included) and `y` the output of one `dot_general` of the user's function, every
`dot_general` in the jaxpr of its factored form (forward and backward) outputs at most
`rank * max(x.size, w.size, y.size)` elements. Both orders' intermediates multiply to
`rank² · x.size · y.size` (for at most one stack axis), so the smaller one always fits.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax import lax

import jlora
from tests.helpers import iter_eqns, rand


def lora_leaf(w_shape, a_axes, rank, stack=0, seed=0, alpha=None):
  """A LoRA leaf with random `w`, `a` and `b` (never the zero `b` of init), any `a_axes`."""
  s, k = tuple(w_shape[:stack]), tuple(w_shape[stack:])
  a_shape = s + tuple(k[i] for i in a_axes) + (rank,)
  b_shape = s + (rank,) + tuple(k[i] for i in range(len(k)) if i not in a_axes)
  alpha = 1.5 * rank if alpha is None else alpha  # scale 1.5: a misplaced scale shows
  return jlora.LoRA(w=rand(w_shape, seed), a=rand(a_shape, seed + 1, scale=0.5),
                    b=rand(b_shape, seed + 2, scale=0.5), alpha=alpha, a_axes=tuple(a_axes),
                    stack=stack)


def dot_sizes(jaxpr):
  """The output sizes of every dot_general in `jaxpr` (nested jaxprs included)."""
  return [math.prod(e.outvars[0].aval.shape) for e in iter_eqns(jaxpr)
          if e.primitive.name == "dot_general"]


def grad_jaxpr_and_values(fn, tree, *args):
  """The jaxpr of `value_and_grad` of `sum(fn(tree, *args) * proj)` with respect to the
  trainable half and the (floating) arguments, with `fn` factored; and the factored and merged
  values (outputs and those gradients), for comparison."""
  train, frozen = jlora.split(tree)
  proj = rand(jax.eval_shape(lambda: fn(jlora.merge(tree), *args)).shape, 99)

  def loss(path_fn):
    return lambda tr, *a: jnp.sum(path_fn(jlora.combine(tr, frozen), *a) * proj)

  fact = jlora.lora(fn, strict=True)
  merged = lambda t, *a: fn(jlora.merge(t), *a)
  argnums = (0,) + tuple(i + 1 for i, a in enumerate(args)
                         if jnp.issubdtype(a.dtype, jnp.inexact))
  vg = lambda path_fn: jax.value_and_grad(loss(path_fn), argnums=argnums)
  jaxpr = jax.make_jaxpr(vg(fact))(train, *args).jaxpr

  @jax.jit
  def both(train, args):
    return ((fact(jlora.combine(train, frozen), *args), vg(fact)(train, *args)),
            (merged(jlora.combine(train, frozen), *args), vg(merged)(train, *args)))

  return jaxpr, both(train, args)


def assert_close_trees(got, want, rtol=1e-5, atol=1e-5):
  """Leaf by leaf; `atol` relative to each leaf's largest magnitude (float32)."""
  got_l, want_l = jax.tree.leaves(got), jax.tree.leaves(want)
  assert len(got_l) == len(want_l) > 0
  for g, w in zip(got_l, want_l):
    scale = max(1.0, float(jnp.max(jnp.abs(w))))
    np.testing.assert_allclose(g, w, rtol=rtol, atol=atol * scale)


# --------------------------------------------------------------------------- the cases


def test_transposed_weight_temp_memory_near_the_merged_one():
  """The issue's reproducer: `x @ w.T` compiled took 100.7 MB of temporaries (x ⊗ w ⊗ rank)
  against 0.2 MB merged; now no more than the merged path's."""
  t = {"w": lora_leaf((192, 256), (0,), 8)}
  x = rand((64, 256), 3)
  f = lambda p, x: x @ p["w"].T
  mem = lambda g: jax.jit(g).lower(t, x).compile().memory_analysis().temp_size_in_bytes
  fact, merged = mem(jlora.lora(f)), mem(lambda t, x: f(jlora.merge(t), x))
  assert fact <= 2 * merged, (fact, merged)
  np.testing.assert_allclose(jlora.lora(f)(t, x), f(jlora.merge(t), x), rtol=1e-5, atol=1e-4)


def test_transposed_weight_runs_x_b_first_named_and_scaled():
  """`x @ w.T` with a (out, in) kernel whose `a` spans the output axis: `x·bᵀ` first, a
  rank-wide intermediate named "jlora_xa" (the remat name) that carries the scale."""
  w = lora_leaf((48, 32), (0,), 4, alpha=10.0)  # scale 2.5
  x = rand((16, 32), 5)
  f = lambda p, x: x @ p["w"].T
  jaxpr = jax.make_jaxpr(jlora.lora(f, strict=True))({"w": w}, x).jaxpr
  named = [e for e in iter_eqns(jaxpr) if e.primitive.name == "name"]
  assert [tuple(e.outvars[0].aval.shape) for e in named] == [(16, 4)]
  assert max(dot_sizes(jaxpr)) == 16 * 48
  np.testing.assert_allclose(jlora.lora(f)({"w": w}, x), f(jlora.merge({"w": w}), x),
                             rtol=1e-5, atol=1e-4)
  # a remat policy that saves the name keeps the intermediate: one x·bᵀ, not two
  train, frozen = jlora.split({"w": w})

  def grad_of(policy):
    g = jax.checkpoint(lambda p, x: jnp.sum(jnp.tanh(f(p, x)) ** 2), policy=policy)
    loss = lambda tr: jlora.lora(g, strict=True)(jlora.combine(tr, frozen), x)
    return jax.make_jaxpr(jax.grad(loss))(train).jaxpr, jax.grad(loss)(train)

  cp = jax.checkpoint_policies
  xb = lambda j: sum(sorted(tuple(v.aval.shape) for v in e.invars) == [(4, 32), (16, 32)]
                     for e in iter_eqns(j) if e.primitive.name == "dot_general")
  (recompute, g0), (saved, g1) = grad_of(cp.nothing_saveable), grad_of(
      cp.save_only_these_names("jlora_xa"))
  assert (xb(recompute), xb(saved)) == (2, 1)
  assert_close_trees(g1, g0)


def test_grad_inside_the_function():
  """`jax.grad` taken inside the function: its backward pass contracts the kernel's output
  axis (`dy @ w.T`); values, gradients and second derivatives as merged, within the bound."""
  t = {"w": lora_leaf((24, 40), (0,), 4)}
  x = rand((32, 24), 7)
  f = lambda p, x: jax.grad(lambda x: jnp.sum(jnp.tanh(x @ p["w"]) ** 2))(x)
  jaxpr, (got, want) = grad_jaxpr_and_values(f, t, x)
  assert max(dot_sizes(jaxpr)) <= 4 * max(32 * 24, 24 * 40, 32 * 40)
  assert_close_trees(got, want, rtol=1e-4, atol=1e-5)


class TiedLM(nn.Module):
  """An embedding, one Dense layer and a tied LM head (`nn.Embed.attend`)."""
  vocab: int = 96
  dim: int = 32

  @nn.compact
  def __call__(self, ids):
    emb = nn.Embed(self.vocab, self.dim, name="embed_tokens")
    h = emb(ids)
    h = h + nn.Dense(self.dim, name="q_proj")(jnp.tanh(h))
    return emb.attend(h)


def test_tied_head_with_the_embedding_adapted():
  """`nn.Embed.attend` on an adapted table is `h @ (w + s·a@b)ᵀ`: `h·bᵀ` then `·aᵀ`, never
  tokens x vocab x dim x rank (1.5M elements here; the bound is 49k)."""
  m, r = TiedLM(), 8
  ids = jnp.asarray(np.random.default_rng(11).integers(0, 96, (4, 16)), jnp.int32)
  p = m.init(jax.random.key(0), ids)["params"]
  t = jlora.apply(p, rank=r, targets=["embed_tokens", "q_proj"])
  t = jax.tree.map(lambda x: lora_leaf(x.w.shape, x.a_axes, r, seed=x.w.size % 97)
                   if jlora.is_lora(x) else x, t, is_leaf=jlora.is_lora)
  fn = lambda p, ids: m.apply({"params": p}, ids)
  jaxpr, ((y_f, (l_f, g_f)), (y_m, (l_m, g_m))) = grad_jaxpr_and_values(fn, t, ids)
  assert max(dot_sizes(jaxpr)) <= r * max(64 * 96, 96 * 32, 64 * 32)
  assert_close_trees((y_f, l_f, g_f[0]), (y_m, l_m, g_m[0]), rtol=1e-4)


def test_tied_llama_gradient_temp_memory_near_the_merged_one():
  """`recipes.models.llama` with tied embeddings and `embed_tokens` adapted (the issue: 2.7 MB
  merged, 203.8 MB factored): the factored gradient's temporaries stay within 2x merged."""
  from recipes.models import llama
  cfg = llama.LlamaConfig.tiny(vocab_size=512, num_layers=1)
  model = llama.Llama(cfg)
  tokens = jnp.asarray(np.random.default_rng(12).integers(0, 512, (2, 32)), jnp.int32)
  params = model.init(jax.random.key(1), tokens)["params"]
  t = jlora.apply(params, rank=8, targets=["embed_tokens", "q_proj", "v_proj"],
                  stacked=r"^layers/")
  assert jlora.is_lora(t["embed_tokens"]["embedding"])
  train, frozen = jlora.split(t)
  fact = jlora.lora(lambda p, x: model.apply({"params": p}, x), strict=True)
  merged = lambda p, x: model.apply({"params": jlora.merge(p)}, x)

  def temp(fn):
    loss = lambda tr, x: llama.lm_loss(fn(jlora.combine(tr, frozen), x), x)
    c = jax.jit(jax.grad(loss)).lower(train, tokens).compile()
    return c.memory_analysis().temp_size_in_bytes

  f, m = temp(fact), temp(merged)
  assert f <= 2 * m, (f, m)


# --------------------------------------------------------------------------- random einsums


@st.composite
def dot_cases(draw):
  """A random `dot_general` of an activation and a LoRA kernel.

  The kernel has 2-4 axes and at most one stack axis; `a` spans any nonempty proper subset
  of the kernel axes (Keras, fan-in, per-head, transposed layouts alike); each kernel axis
  (stack axis included) is contracted with `x`, a batch axis of both, or free; `x` has 0-2
  free axes of its own, its axes in random order; the kernel is the lhs or the rhs.
  """
  nk = draw(st.integers(2, 4), label="kernel axes")
  ns = draw(st.integers(0, 1), label="stack axes")
  w_shape = tuple(draw(st.lists(st.integers(2, 4), min_size=ns + nk, max_size=ns + nk)))
  a_axes = tuple(sorted(draw(st.sets(st.integers(0, nk - 1), min_size=1, max_size=nk - 1),
                             label="a_axes")))
  roles = draw(st.lists(st.sampled_from("cbf"), min_size=ns + nk, max_size=ns + nk)
               .filter(lambda r: "c" in r), label="roles (contracted, batch, free)")
  x_free = tuple(draw(st.lists(st.integers(2, 5), max_size=2), label="x free dims"))
  w_axes = [i for i, r in enumerate(roles) if r in "cb"]
  x_dims = [w_shape[i] for i in w_axes] + list(x_free)
  order = draw(st.permutations(range(len(x_dims))), label="x axis order")
  x_shape = tuple(x_dims[j] for j in order)
  pos = {j: order.index(j) for j in range(len(x_dims))}  # x axis of logical axis j
  wc = tuple(i for i in w_axes if roles[i] == "c")
  wb = tuple(i for i in w_axes if roles[i] == "b")
  xc = tuple(pos[w_axes.index(i)] for i in wc)
  xb = tuple(pos[w_axes.index(i)] for i in wb)
  return dict(w_shape=w_shape, ns=ns, a_axes=a_axes, x_shape=x_shape, wc=wc, wb=wb, xc=xc,
              xb=xb, lhs=draw(st.booleans(), label="kernel is lhs"),
              rank=draw(st.integers(1, 4), label="rank"),
              seed=draw(st.integers(0, 2**16), label="seed"))


@settings(max_examples=12, deadline=None, derandomize=True, database=None)
@given(case=dot_cases())
def test_random_dot_generals_stay_skinny_and_exact(case):
  c = case
  t = {"w": lora_leaf(c["w_shape"], c["a_axes"], c["rank"], c["ns"], c["seed"])}
  x = rand(c["x_shape"], c["seed"] + 3)
  if c["lhs"]:
    dn = ((c["wc"], c["xc"]), (c["wb"], c["xb"]))
    f = lambda p, x: lax.dot_general(p["w"], x, dn)
  else:
    dn = ((c["xc"], c["wc"]), (c["xb"], c["wb"]))
    f = lambda p, x: lax.dot_general(x, p["w"], dn)
  y_size = math.prod(jax.eval_shape(f, {"w": t["w"].w}, x).shape)
  bound = c["rank"] * max(x.size, t["w"].w.size, y_size)
  jaxpr, (got, want) = grad_jaxpr_and_values(f, t, x)
  sizes = dot_sizes(jaxpr)
  assert sizes and max(sizes) <= bound, (sizes, bound)
  assert_close_trees(got, want, rtol=1e-5, atol=1e-5)


def test_contracting_a_stack_axis():
  """A stack axis contracted with `x` (a sum over layers, "li,lij->j"): each layer's
  adapter pairs with its own activations (the rule summed b over the layers on its own)."""
  t = {"w": lora_leaf((3, 5, 6), (0,), 2, stack=1)}
  x = rand((3, 5), 4)
  f = lambda p, x: jnp.einsum("li,lij->j", x, p["w"])
  jaxpr, (got, want) = grad_jaxpr_and_values(f, t, x)
  assert max(dot_sizes(jaxpr)) <= 2 * 90
  assert_close_trees(got, want)


def test_two_stack_axes_contracted_and_kept_materialize_with_a_warning():
  """Two stack axes, one contracted and one kept: every factored order keeps both with `x`'s
  free axes and the rank (no bound), so the weight is materialized, with a warning."""
  t = {"w": lora_leaf((4, 4, 2, 2), (0,), 2, stack=2)}
  x = rand((16, 4, 2), 4)  # x·a: (16, 4, 4, 2), 512 > 2·max(128, 64, 128)
  f = lambda p, x: jnp.einsum("nli,mlij->nmj", x, p["w"])
  with pytest.warns(jlora.MaterializeWarning, match="stack axis"):
    y = jlora.lora(f)(t, x)
  np.testing.assert_allclose(y, f(jlora.merge(t), x), rtol=1e-5, atol=1e-4)
  with pytest.raises(ValueError, match="strict=True"):
    jlora.lora(f, strict=True)(t, x)


# --------------------------------------------------------------------------- convolutions


def conv_sizes(jaxpr):
  """The output sizes of every conv_general_dilated and dot_general in `jaxpr`."""
  return [math.prod(e.outvars[0].aval.shape) for e in iter_eqns(jaxpr)
          if e.primitive.name in ("conv_general_dilated", "dot_general")]


CONV = nn.Conv(6, (3, 3), padding="SAME", use_bias=False)
CONV_FNS = {
    "conv": lambda p, x: CONV.apply({"params": p}, x),
    # the backward pass convolves with the kernel reversed and its feature axes swapped
    "grad inside": lambda p, x: jax.grad(
        lambda x: jnp.sum(jnp.tanh(CONV.apply({"params": p}, x)) ** 2))(x),
    "strided transposed conv": lambda p, x: lax.conv_transpose(
        x, p["kernel"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")),
}


@pytest.mark.parametrize("fn", list(CONV_FNS))
@pytest.mark.parametrize("a_axes", [(0, 1, 2), (2,), (3,), (0, 1, 3)],
                         ids=["keras", "fan (a: in)", "a: out", "b: in"])
def test_conv_runs_factored_whichever_factor_spans_one_feature_axis(fn, a_axes):
  """A conv kernel whose `a` or `b` spans one feature axis alone runs as a convolution with
  r features there and a pointwise product with that factor: `conv(x, A)·B`, `(x·A) ⊛ B`,
  and the same with the factors' roles swapped, as a backward pass uses the kernel (a `rev`
  of its spatial axes keeps the factoring). No materialization (strict), values and
  gradients as merged, and no intermediate over r * max(x, w, y)."""
  t = {"kernel": lora_leaf((3, 3, 4, 6), a_axes, 2, seed=sum(a_axes))}
  x = rand((2, 7, 7, 4) if fn != "strided transposed conv" else (2, 4, 4, 4), 8)
  f = CONV_FNS[fn]
  y = jax.eval_shape(f, {"kernel": t["kernel"].w}, x)
  jaxpr, (got, want) = grad_jaxpr_and_values(f, t, x)
  assert max(conv_sizes(jaxpr)) <= 2 * max(x.size, 3 * 3 * 4 * 6, math.prod(y.shape))
  assert_close_trees(got, want, rtol=1e-4, atol=1e-5)


def test_conv_with_spatial_only_adapter_materializes_with_a_warning():
  """`a` spanning the spatial axes alone (`b` both feature axes) has no factored conv form."""
  t = {"kernel": lora_leaf((3, 3, 4, 6), (0, 1), 2)}
  x = rand((2, 7, 7, 4), 8)
  with pytest.warns(jlora.MaterializeWarning, match="conv_general_dilated"):
    y = jlora.lora(CONV_FNS["conv"])(t, x)
  np.testing.assert_allclose(y, CONV_FNS["conv"](jlora.merge(t), x), rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------- slices of a kernel

SLICE_FNS = {
    # a fused q/k/v kernel cut into its three projections along the output axis
    "fused qkv": lambda p, x: sum(jnp.tanh(x @ p["w"][:, i * 4:(i + 1) * 4]) for i in range(3)),
    "input rows, strided": lambda p, x: x[:, :5] @ p["w"][1::2],
    "dynamic_slice": lambda p, x: x @ lax.dynamic_slice_in_dim(p["w"], x.shape[0] - 3, 6, 1),
    "dynamic_slice, input axis": lambda p, x: x[:, :4] @ lax.dynamic_slice_in_dim(
        p["w"], jnp.int32(x.shape[0]), 4, 0),
}


@pytest.mark.parametrize("fn", list(SLICE_FNS))
def test_slices_of_kernel_axes_stay_factored(fn):
  """Slicing a kernel axis slices the factor that spans it: no materialization (strict),
  values and gradients as merged, nothing larger than rank * max(x, w, y)."""
  t = {"w": lora_leaf((10, 12), (0,), 3)}
  x = rand((5, 10), 9)
  f = SLICE_FNS[fn]
  jaxpr, (got, want) = grad_jaxpr_and_values(f, t, x)
  assert max(dot_sizes(jaxpr)) <= 3 * 120
  assert_close_trees(got, want)
