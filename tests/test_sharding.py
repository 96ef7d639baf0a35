"""Sharded LoRA on a device mesh: adapter shardings, optimizer state, a sharded train step.

The mesh tests need 8 devices, so they run in one subprocess of this file with
`XLA_FLAGS=--xla_force_host_platform_device_count=8` set before jax is
imported (`python tests/test_sharding.py` prints a JSON report); the tests
below assert on that report. Spec derivation needs no devices and runs here.
"""

from __future__ import annotations

import json
import os
import re
import sys

import numpy as np
import pytest

from tests.helpers import Background

# The Llama decoder's FSDP x tensor layout (frozen base), shared with the worker.
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
  import jlora
  from jax.sharding import PartitionSpec as P
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
  import jlora
  from jax.sharding import PartitionSpec as P
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

def _worker_env(env):
  env = dict(env)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
  env["JAX_PLATFORMS"] = "cpu"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  return env


# The worker runs beside the tests before these (tests/conftest.py starts it after collection).
WORKER = Background([sys.executable, os.path.abspath(__file__)], env=_worker_env, timeout=600)


def _report() -> dict:
  """The worker's JSON report (the worker runs once; `Background` keeps its output)."""
  return json.loads(WORKER.output().strip().splitlines()[-1])


@pytest.mark.background(WORKER)
def test_apply_places_adapters_after_sharded_weights():
  r = _report()
  assert r["devices"] == 8
  assert r["targets"] == 7  # all-linear on the Llama decoder
  for path, got in r["placed"].items():
    assert got["a"] == got["a_expected"], path
    assert got["b"] == got["b_expected"], path
    assert got["a_values_equal_unsharded"], path
  o = r["placed"]["layers/self_attn/o_proj/kernel"]
  assert o["a"] == [None, "tensor"] and o["b"] == [None, None, "fsdp"]


@pytest.mark.background(WORKER)
def test_shardings_and_state_shardings():
  r = _report()
  assert r["shardings_match_arrays"]
  for path, s in r["state"].items():
    assert s["mu"] == s["nu"] == s["param"], path
  assert r["state_count_spec"] == []
  assert r["state_leaves_matched"] == 2 * 2 * r["targets"]  # mu, nu of a and b
  assert r["restore_target_ok"]


@pytest.mark.background(WORKER)
def test_sharded_step_equals_single_device_step():
  r = _report()
  assert len(r["loss_sharded"]) == 2
  np.testing.assert_allclose(r["loss_sharded"], r["loss_single"], rtol=1e-5, atol=1e-6)
  assert r["loss_sharded"][1] < r["loss_sharded"][0]
  # Adam with eps 1e-3: with the default 1e-8, g/sqrt(v) of a near-zero gradient flips sign with
  # the float32 reduction order, and one step then moves an entry by 2·lr.
  assert r["max_adapter_diff"] < 1e-4
  assert r["b_moved"] > 1e-4  # the comparison is not between two untouched zero b's
  assert r["shardings_kept_after_step"]
  assert r["frozen_unchanged"]


@pytest.mark.background(WORKER)
def test_merge_keeps_the_weight_shardings():
  r = _report()
  assert r["merge_shardings_equal_w"]
  assert r["merge_equals_single_device"] < 1e-4  # the adapters differ by float32 reduction order


def _norm(spec):
  """A PartitionSpec as a list without trailing Nones (JAX may or may not keep them)."""
  spec = list(spec)
  while spec and spec[-1] is None:
    spec.pop()
  return spec


@pytest.mark.background(WORKER)
def test_flax_boxes_and_nnx_metadata():
  r = _report()
  assert _norm(r["linen"]["a"]) == ["fsdp"] and _norm(r["linen"]["b"]) == [None, "tensor"]
  assert r["linen"]["abstract_specs"] == [["fsdp", "tensor"], ["fsdp"], [None, "tensor"]]
  assert _norm(r["nnx"]["a"]) == ["fsdp"] and _norm(r["nnx"]["b"]) == [None, "tensor"]
  assert r["nnx"]["specs_keep_variable"]
  assert r["nnx"]["specs"] == [["fsdp", "tensor"], ["fsdp"], [None, "tensor"]]


@pytest.mark.background(WORKER)
def test_factored_backward_gathers_no_extra_full_weight():
  h = _report()["hlo"]
  # FSDP: the forward all-gathers each full weight; the factored train step
  # gathers no more full weights than that and never reduces a weight-sized
  # gradient, while the merge path reduces a full weight gradient per kernel.
  assert h["forward_w_gathers"] >= 2
  assert h["factored_w_gathers"] <= h["forward_w_gathers"]
  assert h["factored_w_reductions"] == 0
  assert h["merge_w_reductions"] >= 2
  assert h["replicated_w_gathers"] <= h["forward_w_gathers"]
  assert h["replicated_w_reductions"] == 0


# ----------------------------------------------------------------------------- the worker


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


def _worker() -> dict:
  import warnings
  warnings.simplefilter("error")
  warnings.filterwarnings("ignore", category=DeprecationWarning)
  import jax
  import optax
  from jax.sharding import AxisType, NamedSharding

  import jlora
  from jlora import sharding as S
  from recipes.models import llama

  out: dict = {"devices": jax.device_count()}
  spec_list = lambda s: list(tuple(s))
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  cfg = llama.LlamaConfig.tiny()
  model = llama.Llama(cfg)
  ks = jax.random.split(jax.random.key(int(np.random.default_rng().integers(1 << 30))), 4)
  tokens = jax.random.randint(ks[0], (8, 16), 0, cfg.vocab_size)
  params = jax.jit(model.init)(ks[1], tokens[:1])["params"]  # one compilation, not one per op
  base_specs = S.path_specs(params, _rules())
  sparams = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), base_specs))
  kw = dict(rank=4, targets="all-linear", stacked=r"^layers/", key=ks[2])
  lp_s = jlora.apply(sparams, **kw)
  lp_1 = jlora.apply(params, **kw)

  # 1. apply: a/b placed after w.
  placed, leaves = {}, []
  flat_s = jax.tree_util.tree_flatten_with_path(lp_s, is_leaf=jlora.is_lora)[0]
  flat_1 = jax.tree_util.tree_leaves(lp_1, is_leaf=jlora.is_lora)
  for (path, x), x1 in zip(flat_s, flat_1):
    if not isinstance(x, jlora.LoRA):
      continue
    ps = "/".join(str(getattr(k, "key", k)) for k in path)
    ea, eb = _expected_ab(tuple(x.w.sharding.spec), x.a_axes, x.stack, x.w.ndim)
    placed[ps] = dict(a=spec_list(x.a.sharding.spec), b=spec_list(x.b.sharding.spec),
                      a_expected=list(ea), b_expected=list(eb),
                      a_values_equal_unsharded=bool((np.asarray(x.a) == np.asarray(x1.a)).all()))
    leaves.append(x)
  out["placed"], out["targets"] = placed, len(placed)

  # 2. shardings for the tree and the optimizer state.
  sh = S.shardings(lp_s)
  arr_sh = jax.tree.map(lambda x: x.sharding, lp_s)
  out["shardings_match_arrays"] = all(
      a.spec == b.spec and a.mesh == b.mesh
      for a, b in zip(jax.tree.leaves(sh), jax.tree.leaves(arr_sh)))
  step = jlora.train_step(lambda t, tok: llama.lm_loss(jlora.lora(model.apply)(
      {"params": t}, tok), tok), optax.adam(3e-2, eps=1e-3), mesh=mesh)
  state = step.init(lp_s)
  inner = state.inner_states["train"].inner_state[0] if hasattr(state, "inner_states") else None
  if inner is None:
    inner = state[0].inner_states["train"].inner_state[0]
  st, p_specs = {}, S.partition_specs(lp_s)
  for path, x in jax.tree_util.tree_flatten_with_path(inner.mu, is_leaf=jlora.is_lora)[0]:
    ps = "/".join(str(getattr(k, "key", k)) for k in path)
    for half in ("a", "b"):
      st[f"{ps}.{half}"] = dict(mu=spec_list(getattr(x, half).sharding.spec),
                                param=spec_list(_get(p_specs, ps, half)))
  for path, x in jax.tree_util.tree_flatten_with_path(inner.nu, is_leaf=jlora.is_lora)[0]:
    ps = "/".join(str(getattr(k, "key", k)) for k in path)
    for half in ("a", "b"):
      st[f"{ps}.{half}"]["nu"] = spec_list(getattr(x, half).sharding.spec)
  out["state"] = st
  out["state_count_spec"] = spec_list(inner.count.sharding.spec)
  matched = 0
  for s, x in zip(jax.tree.leaves(step.state_shardings), jax.tree.leaves(state)):
    assert s == x.sharding, (s, x.sharding)
    matched += x.ndim > 0
  out["state_leaves_matched"] = matched
  target = S.abstract(jlora.split(lp_s).trainable, jlora.split(sh).trainable)
  t_leaves = jax.tree.leaves(target)
  out["restore_target_ok"] = all(
      isinstance(t, jax.ShapeDtypeStruct) and t.sharding == x.sharding and t.shape == x.shape
      for t, x in zip(t_leaves, jax.tree.leaves(jlora.split(lp_s).trainable)))

  # 3. the sharded step vs the single-device step.
  w_before = np.asarray(lp_s["layers"]["self_attn"]["q_proj"]["kernel"].w)
  ref = jlora.train_step(lambda t, tok: llama.lm_loss(jlora.lora(model.apply)(
      {"params": t}, tok), tok), optax.adam(3e-2, eps=1e-3))
  state_1 = ref.init(lp_1)
  ls, l1 = [], []
  for _ in range(2):
    lp_s, state, loss_s = step(lp_s, state, tokens)
    lp_1, state_1, loss_1 = ref(lp_1, state_1, tokens)
    ls.append(float(loss_s)), l1.append(float(loss_1))
  out["loss_sharded"], out["loss_single"] = ls, l1
  diffs = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
           for a, b in zip(jax.tree.leaves(jlora.split(lp_s).trainable),
                           jax.tree.leaves(jlora.split(lp_1).trainable))]
  out["max_adapter_diff"] = max(diffs)
  out["b_moved"] = float(np.abs(np.asarray(lp_s["layers"]["mlp"]["down_proj"]["kernel"].b)).max())
  now = jax.tree.map(lambda x: x.sharding, lp_s)
  out["shardings_kept_after_step"] = all(
      a.spec == b.spec for a, b in zip(jax.tree.leaves(now), jax.tree.leaves(sh)))
  out["frozen_unchanged"] = bool(
      (np.asarray(lp_s["layers"]["self_attn"]["q_proj"]["kernel"].w) == w_before).all())

  # 4. merge keeps w's shardings.
  merged = jlora.merge(lp_s)
  ok = True
  for x, m in zip(jax.tree_util.tree_leaves(lp_s, is_leaf=jlora.is_lora), jax.tree.leaves(merged)):
    w = x.w if isinstance(x, jlora.LoRA) else x
    ok &= m.sharding.is_equivalent_to(w.sharding, m.ndim)
  out["merge_shardings_equal_w"] = bool(ok)
  m1 = jlora.merge(lp_1)
  out["merge_equals_single_device"] = max(
      float(np.abs(np.asarray(a) - np.asarray(b)).max())
      for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(m1)))

  out["linen"], out["nnx"] = _flax_boxes(mesh)
  out["hlo"] = _hlo_counts()
  return out


def _get(specs, ps, half):
  node = specs
  for k in ps.split("/"):
    node = node[k]
  return getattr(node, half)


def _flax_boxes(mesh):
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import PartitionSpec as P

  import jlora
  from jlora import sharding as S
  from tests.helpers import variable_value

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
  lin = dict(a=list(tuple(leaf.a.sharding.spec)), b=list(tuple(leaf.b.sharding.spec)))
  # Abstract boxes: the names alone, resolved with the rules.
  abs_lp = jax.eval_shape(lambda p: jlora.apply(p, rank=2), abstract["params"])
  sp = S.partition_specs(abs_lp, rules=rules)["q_proj"]["kernel"]
  lin["abstract_specs"] = [list(tuple(sp.w)), list(tuple(sp.a)), list(tuple(sp.b))]

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
  specs = S.partition_specs(lst)
  sv = specs["q_proj"]["kernel"]
  nn_out = dict(a=list(tuple(leaf.a.sharding.spec)), b=list(tuple(leaf.b.sharding.spec)),
                specs_keep_variable=isinstance(sv, nnx.Variable))
  sv = variable_value(sv)
  nn_out["specs"] = [list(tuple(sv.w)), list(tuple(sv.a)), list(tuple(sv.b))]
  del P
  return lin, nn_out


def _hlo_counts():
  """FSDP toy (2 kernels, batch larger than weights): collectives of full-weight size."""
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import AxisType, NamedSharding
  from jax.sharding import PartitionSpec as P

  import jlora
  from jlora import sharding as S

  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Auto,) * 2)
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
  out = {}
  fwd = jax.jit(fact, in_shardings=(S.shardings(lp), NamedSharding(mesh, P(("data", "fsdp")))))
  out["forward_w_gathers"], _ = _collectives(fwd.lower(lp, x).compile().as_text(), w_shapes)
  for name, fn, adapters in (("factored", fact, "derived"), ("merge", merge, "derived"),
                             ("replicated", fact, "replicated")):
    step = jlora.train_step(fn, optax.sgd(1e-2), mesh=mesh, adapters=adapters)
    state = step.init(lp)
    g, red = _collectives(step.lower(lp, state, x).compile().as_text(), w_shapes)
    out[f"{name}_w_gathers"], out[f"{name}_w_reductions"] = g, red
  return out


if __name__ == "__main__":
  print(json.dumps(_worker()))
