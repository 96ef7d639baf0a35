"""Sharded LoRA on a device mesh: adapter shardings, optimizer state, a sharded train step.

Spec derivation needs no devices; the mesh tests use the 8 host CPU devices that
tests/conftest.py sets up.
"""

from __future__ import annotations

import math
import re
import types

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jlora
from jlora import sharding as S

# The Llama decoder's FSDP x tensor layout (frozen base).
LLAMA_RULES = [
    (r"layers/.*(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel", ("", "fsdp", "tensor")),
    (r"layers/.*(o_proj|down_proj)/kernel", ("", "tensor", "fsdp")),
    (r"embed_tokens/embedding", ("tensor", "fsdp")),
]


def _rules():
  from jax.sharding import PartitionSpec as P
  return [(pat, P(*(a or None for a in spec))) for pat, spec in LLAMA_RULES]


def _expected_ab(w_spec, a_axes, stack, ndim):
  """Reference derivation, written out independently of jlora's."""
  ws = list(w_spec) + [None] * (ndim - len(w_spec))
  k = ws[stack:]
  a = ws[:stack] + [k[i] for i in a_axes] + [None]
  b = ws[:stack] + [None] + [k[i] for i in range(len(k)) if i not in a_axes]
  strip = lambda t: tuple(t[:max([i + 1 for i, x in enumerate(t) if x is not None] or [0])])
  return strip(a), strip(b)


# ----------------------------------------------------------------------------- no devices needed


def test_adapter_specs_random_layouts():
  from jlora.sharding import adapter_specs
  rng = np.random.default_rng(0)
  axes = ["data", "fsdp", "tensor", "expert", None, None]
  for _ in range(200):
    stack = int(rng.integers(0, 3))
    nk = int(rng.integers(2, 5))
    ndim = stack + nk
    n_a = int(rng.integers(1, nk))
    a_axes = tuple(sorted(rng.choice(nk, n_a, replace=False).tolist()))
    names = list(rng.permutation(axes))[:ndim]
    w_spec = tuple(names[:int(rng.integers(0, ndim + 1))])
    a, b = adapter_specs(w_spec, a_axes, stack, ndim)
    assert (tuple(a), tuple(b)) == _expected_ab(w_spec, a_axes, stack, ndim)
    assert len(tuple(a)) <= stack + n_a + 1 and len(tuple(b)) <= ndim - n_a + 1


def test_partition_specs_of_abstract_llama_and_gemma_trees():
  import jax
  from jax.sharding import PartitionSpec as P

  import jlora
  from jlora.sharding import partition_specs, path_specs
  from recipes.models import gemma, llama
  cfg = llama.LlamaConfig.tiny()
  tok = jax.ShapeDtypeStruct((1, 4), np.int32)
  shapes = jax.eval_shape(lambda t: llama.Llama(cfg).init(jax.random.key(0), t), tok)["params"]
  lp = jax.eval_shape(lambda p: jlora.apply(p, rank=4, targets="all-linear",
                                            stacked=r"^layers/"), shapes)
  specs = partition_specs(lp, base=path_specs(shapes, _rules()))
  o = specs["layers"]["self_attn"]["o_proj"]["kernel"]
  assert (o.w, o.a, o.b) == (P(None, "tensor", "fsdp"), P(None, "tensor"), P(None, None, "fsdp"))
  assert specs["norm"]["scale"] == P() and specs["embed_tokens"]["embedding"] == P("tensor", "fsdp")
  # Gemma (keras layout, per-head query kernels): a spans (heads, D), b spans hd.
  gs = gemma.abstract_params(gemma.small_config())
  glp = jax.eval_shape(lambda p: jlora.apply(p, rank=2), gs)
  gspec = partition_specs(glp, base=path_specs(gs, [(r"attention/(query|value)/kernel",
                                                     P("tensor", "fsdp", None))]))
  q = gspec["decoder_block_1/attention/query/kernel"]
  assert (q.a, q.b) == (P("tensor", "fsdp"), P())
  rep = partition_specs(glp, base=path_specs(gs, [(r"query", P("tensor", "fsdp"))]),
                        adapters="replicated")["decoder_block_0/attention/query/kernel"]
  assert (rep.w, rep.a, rep.b) == (P("tensor", "fsdp"), P(), P())


def test_errors_name_the_path_and_the_fix():
  import jax
  import jax.numpy as jnp
  from jax.sharding import PartitionSpec as P

  import jlora
  from jlora.sharding import partition_specs, path_specs, shardings
  params = {"q_proj": jax.ShapeDtypeStruct((8, 16), jnp.float32)}
  with pytest.raises(ValueError, match=r"'q_proj' of shape \(8, 16\).*at most 2 entries"):
    path_specs(params, [("q_proj", P("a", "b", "c"))])
  lp = jax.eval_shape(lambda p: jlora.apply(p, rank=2), params)
  with pytest.raises(ValueError, match=r"'q_proj'.*one entry per axis"):
    partition_specs(lp, base={"q_proj": P("a", "b", "c")})
  with pytest.raises(ValueError, match=r"no mesh.*jax.make_mesh"):
    shardings(lp)
  with pytest.raises(ValueError, match=r"adapters='sharded' is not one of"):
    partition_specs(lp, adapters="sharded")


# ----------------------------------------------------------------------------- 8 host devices


def _path(path) -> str:
  return "/".join(str(getattr(k, "key", k)) for k in path)


def _mesh(shape, names):
  """A mesh over the first devices of the 8 host CPU devices (tests/conftest.py)."""
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape),
                       devices=jax.devices()[:math.prod(shape)])


@pytest.fixture(scope="module")
def llama_mesh():
  """The tiny Llama decoder, its parameters on one device and on a (data, fsdp, tensor) mesh
  (FSDP x tensor), the arguments of `jlora.apply`, and a sharded and a one-device train step."""
  from recipes.models import llama
  assert jax.device_count() == 8
  mesh = _mesh((2, 2, 2), ("data", "fsdp", "tensor"))
  cfg = llama.LlamaConfig.tiny()
  model = llama.Llama(cfg)
  ks = jax.random.split(jax.random.key(int(np.random.default_rng().integers(1 << 30))), 4)
  tokens = jax.random.randint(ks[0], (8, 16), 0, cfg.vocab_size)
  params = jax.jit(model.init)(ks[1], tokens[:1])["params"]  # one compilation, not one per op
  base_specs = S.path_specs(params, _rules())
  sparams = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), base_specs))
  loss = lambda t, tok: llama.lm_loss(jlora.lora(model.apply)({"params": t}, tok), tok)
  # Adam with eps 1e-3: with the default 1e-8, g/sqrt(v) of a near-zero gradient flips sign with
  # the float32 reduction order, and one step then moves an entry by 2·lr.
  return types.SimpleNamespace(
      mesh=mesh, tokens=tokens, params=params, sparams=sparams,
      kw=dict(rank=4, targets="all-linear", stacked=r"^layers/", key=ks[2]),
      step=jlora.train_step(loss, optax.adam(3e-2, eps=1e-3), mesh=mesh),
      ref=jlora.train_step(loss, optax.adam(3e-2, eps=1e-3)))


def test_apply_places_adapters_after_sharded_weights(llama_mesh):
  lp_s = jlora.apply(llama_mesh.sparams, **llama_mesh.kw)
  lp_1 = jlora.apply(llama_mesh.params, **llama_mesh.kw)
  flat_s = jax.tree_util.tree_flatten_with_path(lp_s, is_leaf=jlora.is_lora)[0]
  flat_1 = jax.tree_util.tree_leaves(lp_1, is_leaf=jlora.is_lora)
  placed = []
  for (path, x), x1 in zip(flat_s, flat_1):
    if not isinstance(x, jlora.LoRA):
      continue
    ps = _path(path)
    ea, eb = _expected_ab(tuple(x.w.sharding.spec), x.a_axes, x.stack, x.w.ndim)
    assert tuple(x.a.sharding.spec) == ea, ps
    assert tuple(x.b.sharding.spec) == eb, ps
    np.testing.assert_array_equal(np.asarray(x.a), np.asarray(x1.a), err_msg=ps)
    placed.append(ps)
  assert len(placed) == 7  # all-linear on the Llama decoder
  o = lp_s["layers"]["self_attn"]["o_proj"]["kernel"]
  assert tuple(o.a.sharding.spec) == (None, "tensor")
  assert tuple(o.b.sharding.spec) == (None, None, "fsdp")


def test_shardings_and_state_shardings(llama_mesh):
  lp_s = jlora.apply(llama_mesh.sparams, **llama_mesh.kw)
  sh = S.shardings(lp_s)
  arr_sh = jax.tree.map(lambda x: x.sharding, lp_s)
  assert jax.tree.structure(sh) == jax.tree.structure(arr_sh)
  for a, b in zip(jax.tree.leaves(sh), jax.tree.leaves(arr_sh)):
    assert a.spec == b.spec and a.mesh == b.mesh, (a, b)
  step = llama_mesh.step
  state = step.init(lp_s)
  inner = state.inner_states["train"].inner_state[0] if hasattr(state, "inner_states") else None
  if inner is None:
    inner = state[0].inner_states["train"].inner_state[0]
  p_specs = S.partition_specs(lp_s)
  n = 0
  for moment in (inner.mu, inner.nu):
    for path, x in jax.tree_util.tree_flatten_with_path(moment, is_leaf=jlora.is_lora)[0]:
      ps = _path(path)
      for half in ("a", "b"):
        assert tuple(getattr(x, half).sharding.spec) == tuple(_get(p_specs, ps, half)), (ps, half)
        n += 1
  assert n == 2 * 2 * 7  # mu and nu of a and b, at each of the 7 targets
  assert tuple(inner.count.sharding.spec) == ()
  matched = 0
  for s, x in zip(jax.tree.leaves(step.state_shardings), jax.tree.leaves(state)):
    assert s == x.sharding, (s, x.sharding)
    matched += x.ndim > 0
  assert matched == 2 * 2 * 7
  target = S.abstract(jlora.split(lp_s).trainable, jlora.split(sh).trainable)
  arrays = jax.tree.leaves(jlora.split(lp_s).trainable)
  assert len(jax.tree.leaves(target)) == len(arrays)
  for t, x in zip(jax.tree.leaves(target), arrays):
    assert isinstance(t, jax.ShapeDtypeStruct) and t.sharding == x.sharding and t.shape == x.shape


@pytest.fixture(scope="module")
def trained(llama_mesh):
  """Two steps of the sharded and of the one-device train step from the same adapters."""
  lp_s = jlora.apply(llama_mesh.sparams, **llama_mesh.kw)
  lp_1 = jlora.apply(llama_mesh.params, **llama_mesh.kw)
  sh = S.shardings(lp_s)
  w_before = np.asarray(lp_s["layers"]["self_attn"]["q_proj"]["kernel"].w)
  step, ref = llama_mesh.step, llama_mesh.ref
  state, state_1 = step.init(lp_s), ref.init(lp_1)
  losses, losses_1 = [], []
  for _ in range(2):
    lp_s, state, loss_s = step(lp_s, state, llama_mesh.tokens)
    lp_1, state_1, loss_1 = ref(lp_1, state_1, llama_mesh.tokens)
    losses.append(float(loss_s))
    losses_1.append(float(loss_1))
  return types.SimpleNamespace(lp_s=lp_s, lp_1=lp_1, shardings=sh, w_before=w_before,
                               losses=losses, losses_1=losses_1)


def test_sharded_step_equals_single_device_step(trained):
  assert len(trained.losses) == 2
  np.testing.assert_allclose(trained.losses, trained.losses_1, rtol=1e-5, atol=1e-6)
  assert trained.losses[1] < trained.losses[0]
  ts, t1 = jlora.split(trained.lp_s).trainable, jlora.split(trained.lp_1).trainable
  assert jax.tree.structure(ts) == jax.tree.structure(t1)
  for a, b in zip(jax.tree.leaves(ts), jax.tree.leaves(t1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-4)
  # The comparison is not between two untouched zero b's.
  assert np.abs(np.asarray(trained.lp_s["layers"]["mlp"]["down_proj"]["kernel"].b)).max() > 1e-4
  now = jax.tree.map(lambda x: x.sharding, trained.lp_s)
  for a, b in zip(jax.tree.leaves(now), jax.tree.leaves(trained.shardings)):
    assert a.spec == b.spec, (a, b)
  np.testing.assert_array_equal(
      np.asarray(trained.lp_s["layers"]["self_attn"]["q_proj"]["kernel"].w), trained.w_before)


def test_merge_keeps_the_weight_shardings(trained):
  merged = jlora.merge(trained.lp_s)
  leaves = jax.tree_util.tree_leaves(trained.lp_s, is_leaf=jlora.is_lora)
  assert len(leaves) == len(jax.tree.leaves(merged))
  for x, m in zip(leaves, jax.tree.leaves(merged)):
    w = x.w if isinstance(x, jlora.LoRA) else x
    assert m.sharding.is_equivalent_to(w.sharding, m.ndim), (m.sharding, w.sharding)
  # The adapters differ by float32 reduction order.
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(jlora.merge(trained.lp_1))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-4)


def _spec(x):
  """A PartitionSpec as a tuple without trailing Nones (JAX may or may not keep them)."""
  spec = list(x)
  while spec and spec[-1] is None:
    spec.pop()
  return tuple(spec)


def test_flax_boxes_and_nnx_metadata():
  import flax.linen as nn
  import jax.numpy as jnp
  from flax import nnx

  from tests.helpers import variable_value

  mesh = _mesh((2, 2, 2), ("data", "fsdp", "tensor"))
  rules = (("embed", "fsdp"), ("mlp", "tensor"))
  init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))

  class M(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(16, use_bias=False, kernel_init=init, name="q_proj")(x)

  x = jnp.ones((2, 8))
  abstract = jax.eval_shape(M().init, jax.random.key(0), x)
  with nn.logical_axis_rules(rules):
    out_sh = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, rules)
  variables = jax.jit(M().init, out_shardings=out_sh)(jax.random.key(0), x)
  lp = jlora.apply(variables["params"], rank=2)
  leaf = nn.unbox(lp)["q_proj"]["kernel"]
  assert _spec(leaf.a.sharding.spec) == ("fsdp",)
  assert _spec(leaf.b.sharding.spec) == (None, "tensor")
  # Abstract boxes: the names alone, resolved with the rules.
  abs_lp = jax.eval_shape(lambda p: jlora.apply(p, rank=2), abstract["params"])
  sp = S.partition_specs(abs_lp, rules=rules)["q_proj"]["kernel"]
  assert (tuple(sp.w), tuple(sp.a), tuple(sp.b)) == (("fsdp", "tensor"), ("fsdp",),
                                                     (None, "tensor"))

  class N(nnx.Module):
    def __init__(self, rngs):
      self.q_proj = nnx.Linear(8, 16, use_bias=False, rngs=rngs, kernel_init=nnx.with_partitioning(
          nnx.initializers.lecun_normal(), ("fsdp", "tensor")))

  with jax.set_mesh(mesh):
    state = nnx.state(N(nnx.Rngs(0)))
    # flax >= 0.12 shards at init under set_mesh, 0.11 keeps only the names: place it either way.
    state = jax.device_put(state, nnx.get_named_sharding(state, mesh))
  lst = jlora.apply(state, rank=2)
  leaf = variable_value(lst["q_proj"]["kernel"])
  assert _spec(leaf.a.sharding.spec) == ("fsdp",)
  assert _spec(leaf.b.sharding.spec) == (None, "tensor")
  sv = S.partition_specs(lst)["q_proj"]["kernel"]
  assert isinstance(sv, nnx.Variable)
  sv = variable_value(sv)
  assert (tuple(sv.w), tuple(sv.a), tuple(sv.b)) == (("fsdp", "tensor"), ("fsdp",),
                                                     (None, "tensor"))


def _collectives(hlo: str, w_shapes) -> tuple[int, int]:
  """(all-gathers, reductions) whose result holds a full weight of `w_shapes`."""
  full = {tuple(s) for s in w_shapes} | {tuple(reversed(s)) for s in w_shapes}
  gathers = reductions = 0
  for m in re.finditer(r"= (\([^=]*?\)|\w+\[[\d,]*\]\S*) (all-gather|all-reduce|"
                       r"reduce-scatter)(-start)?\(", hlo):
    shapes = {tuple(int(d) for d in g.split(",") if d)
              for g in re.findall(r"\w+\[([\d,]*)\]", m.group(1))}
    if shapes & full:
      if m.group(2) == "all-gather":
        gathers += 1
      else:
        reductions += 1
  return gathers, reductions


def test_factored_backward_gathers_no_extra_full_weight():
  """FSDP toy (2 kernels, batch larger than weights): the forward all-gathers each full weight;
  the factored train step gathers no more full weights than that and never reduces a
  weight-sized gradient, while the merge path reduces a full weight gradient per kernel."""
  import jax.numpy as jnp

  mesh = _mesh((2, 4), ("data", "fsdp"))
  k = jax.random.split(jax.random.key(1), 3)
  params = {"up_proj": {"kernel": jax.random.normal(k[0], (256, 512)) / 16},
            "down_proj": {"kernel": jax.random.normal(k[1], (512, 256)) / 22}}
  specs = {"up_proj": {"kernel": P("fsdp")}, "down_proj": {"kernel": P(None, "fsdp")}}
  params = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
  lp = jlora.apply(params, rank=4, targets="all-linear")
  x = jax.random.normal(k[2], (1024, 256))
  w_shapes = [(256, 512)]

  def f(p, x):
    return jax.nn.relu(x @ p["up_proj"]["kernel"]) @ p["down_proj"]["kernel"]

  fact = lambda t, x: jnp.mean((jlora.lora(f)(t, x) - x) ** 2)
  merge = lambda t, x: jnp.mean((f(jlora.merge(t), x) - x) ** 2)
  fwd = jax.jit(fact, in_shardings=(S.shardings(lp), NamedSharding(mesh, P(("data", "fsdp")))))
  forward_gathers, _ = _collectives(fwd.lower(lp, x).compile().as_text(), w_shapes)
  assert forward_gathers >= 2
  counts = {}
  for name, fn, adapters in (("factored", fact, "derived"), ("merge", merge, "derived"),
                             ("replicated", fact, "replicated")):
    step = jlora.train_step(fn, optax.sgd(1e-2), mesh=mesh, adapters=adapters)
    state = step.init(lp)
    counts[name] = _collectives(step.lower(lp, state, x).compile().as_text(), w_shapes)
  assert counts["factored"][0] <= forward_gathers and counts["factored"][1] == 0, counts
  assert counts["merge"][1] >= 2, counts
  assert counts["replicated"][0] <= forward_gathers and counts["replicated"][1] == 0, counts


def _get(specs, ps, half):
  node = specs
  for k in ps.split("/"):
    node = node[k]
  return getattr(node, half)
