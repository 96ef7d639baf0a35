"""benchmarks/nnx_lora.py on the tiny model: Flax's own LoRA and jlora train the same thing.

The two implementations must be one experiment: the same trainable parameters, the same loss
from the same weights and adapters, and the model's math that of the hand-written baseline
(benchmarks/baselines/jax_handwritten.py), so the rows compare the LoRA and nothing else.
"""

import dataclasses
import math
import os
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jlora
from tests.helpers import iter_eqns, randomize_b

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
import bench_common as C  # noqa: E402
import nnx_lora as N  # noqa: E402
from baselines import jax_handwritten as H  # noqa: E402

TINY = C.shape_of(True)


def _ids(seed, batch=C.TINY_BATCH, seq=C.TINY_SEQ):
  return jax.random.randint(jax.random.key(seed), (batch, seq + 1), 0, TINY["vocab_size"])


def _lora_pairs(adapters):
  """`{(block, projection): (lora_a, lora_b)}` of the builtin implementation's adapters."""
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(adapters)[0]:
    _, block, name, which = (k.key for k in path[:4])
    out.setdefault((block, name), {})[which] = x
  return {k: (v["lora_a"], v["lora_b"]) for k, v in out.items()}


def _with_adapters(tree, pairs):
  """The jlora tree with each LoRA leaf's `a` and `b` copied from `pairs`."""
  def f(path, x):
    if not jlora.is_lora(x):
      return x
    a, b = pairs[(path[1].key, path[2].key)]
    return dataclasses.replace(x, a=jnp.copy(a), b=jnp.copy(b))  # each step donates its own
  return jax.tree_util.tree_map_with_path(f, tree, is_leaf=jlora.is_lora)


def _jlora_pairs(tree):
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=jlora.is_lora)[0]:
    if jlora.is_lora(x):
      out[(path[1].key, path[2].key)] = (x.a, x.b)
  return out


def _builtin_with(adapters, pairs):
  """The builtin implementation's adapters replaced by `pairs` (a jlora tree's `a`, `b`)."""
  def f(path, x):
    a, b = pairs[(path[1].key, path[2].key)]
    return a if path[3].key == "lora_a" else b
  return jax.tree_util.tree_map_with_path(f, adapters)


def _both(config, key):
  """Both implementations from one key, the jlora tree given the builtin adapters' values."""
  built = N.build("builtin", config, TINY, key=key)
  jl = N.build("jlora", config, TINY, key=key)
  step, (tree, _), n, parts = jl
  tree = _with_adapters(tree, _lora_pairs(built[1][0]))
  return built, (step, (tree, parts["train"].init(tree)), n, parts)


@pytest.mark.parametrize("config", sorted(C.CONFIGS))
def test_full_size_trainable_counts(config):
  """At Gemma 2 2B's widths (abstract: nothing allocated; one block, the 26 alike) both train
  README's counts."""
  rank, targets = C.CONFIGS[config]
  s = dict(C.shape_of(False), num_hidden_layers=1)

  def model(lora):
    m = N.Gemma2(s, attention=None, remat="dots", rngs=nnx.Rngs(0))
    return N.add_lora(m, rank, targets, nnx.Rngs(1)) if lora else m

  plain = nnx.eval_shape(lambda: model(False))
  assert sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(plain))) == C.num_params(s)
  builtin = sum(math.prod(x.shape) for x in
                jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: model(True)), nnx.LoRAParam)))
  tree = jax.eval_shape(lambda st: jlora.apply(st, rank=rank, targets=list(targets)),
                        nnx.state(plain))
  assert builtin == jlora.count(tree).trainable
  assert 26 * builtin == {"qv4": 798_720, "all16": 20_766_720}[config]


def test_same_loss_and_training_from_the_same_weights():
  """All seven projections adapted: equal counts, the same step-0 loss to float rounding, and
  the same losses over three AdamW steps (the gradients agree to bf16 rounding)."""
  (bstep, bstate, bn, _), (jstep, jstate, jn, _) = _both("all16", jax.random.key(7))
  assert bn == jn == 2 * 16 * (2 * (64 + 64) + 2 * (64 + 32) + 3 * (64 + 128))
  ids = _ids(3)
  blosses, jlosses = [], []
  for _ in range(4):
    bstate, bl = bstep(bstate, ids)
    jstate, jl = jstep(jstate, ids)
    blosses.append(float(bl))
    jlosses.append(float(jl))
  np.testing.assert_allclose(jlosses[0], blosses[0], rtol=1e-6)
  assert blosses[-1] < blosses[0] - 1e-3 and jlosses[-1] < jlosses[0] - 1e-3  # both train
  np.testing.assert_allclose(jlosses, blosses, rtol=1e-5)
  # The adapters moved alike: b from zero to the same values (AdamW's first steps are
  # about lr * sign(g), so equal signs of the gradients give equal b).
  bp, jp = _lora_pairs(bstate[0]), _jlora_pairs(jstate[0])
  assert set(bp) == set(jp) and len(bp) == 2 * 7
  for k in bp:
    assert float(jnp.abs(bp[k][1]).max()) > 0
    np.testing.assert_allclose(jp[k][1], bp[k][1], atol=1e-6)


def test_model_is_the_handwritten_baselines_math():
  """With random `b` (LoRA active), the NNX model under either implementation gives the loss of
  jax_handwritten's scanned model on the same weights and adapters."""
  rank, targets = C.CONFIGS["qv4"]
  _, (tree, _), _, parts = N.build("jlora", "qv4", TINY, remat="nothing", key=jax.random.key(2))
  tree = randomize_b(tree, scale=0.3)
  pure = nnx.to_pure_dict(jlora.base(tree))
  blocks = [pure["blocks"][i] for i in range(TINY["num_hidden_layers"])]
  stack = lambda get: jnp.stack([get(b) for b in blocks])
  weights = dict(embed=pure["embed"]["embedding"], final_norm=pure["final_norm"]["scale"],
                 blocks={name: stack(lambda b: b[name]["kernel"]) for name in C.PROJECTIONS})
  for hw, ours in (("pre_attn", "pre_attn_norm"), ("post_attn", "post_attn_norm"),
                   ("pre_ffw", "pre_ffw_norm"), ("post_ffw", "post_ffw_norm")):
    weights["blocks"][hw] = stack(lambda b: b[ours]["scale"])
  pairs = _jlora_pairs(tree)
  adapters = {name: dict(a=jnp.stack([pairs[(i, name)][0] for i in range(len(blocks))]),
                         b=jnp.stack([pairs[(i, name)][1] for i in range(len(blocks))]))
              for name in targets}
  ids = _ids(4)
  expected = jax.jit(H.make_loss(TINY, None, "nothing"))(adapters, weights, ids)
  got = jax.jit(parts["loss"])(tree, ids)
  np.testing.assert_allclose(got, expected, rtol=5e-4)  # bf16: a scan against a loop
  # The builtin model, same weights (same key) and the same adapters.
  _, (adapters_b, _), _, bparts = N.build("builtin", "qv4", TINY, remat="nothing",
                                          key=jax.random.key(2))
  adapters_b = _builtin_with(adapters_b, pairs)
  got_b = jax.jit(bparts["loss"])(adapters_b, bparts["frozen"], ids)
  np.testing.assert_allclose(got_b, got, rtol=1e-6)
  # And the adapters matter: without them the loss moves far more than the tolerance above.
  plain = jax.jit(lambda st: N.loss_fn(nnx.merge(parts["graphdef"], st), ids))(jlora.base(tree))
  assert abs(float(plain) - float(got)) > 0.05


def test_jlora_gradient_forms_no_weight_sized_array():
  """Under the benchmark's remat (`dots`), jlora's gradient of the adapters runs factored:
  nothing materialized, no array of a targeted kernel's shape formed."""
  _, (tree, _), _, parts = N.build("jlora", "all16", TINY, key=jax.random.key(5))
  train, frozen = jlora.split(randomize_b(tree))
  ids = _ids(6, batch=3, seq=16)  # 48 tokens: no activation has a kernel's shape
  grad = jax.grad(lambda t: parts["loss"](jlora.combine(t, frozen), ids))
  with warnings.catch_warnings():
    warnings.simplefilter("error", jlora.MaterializeWarning)
    jaxpr = jax.make_jaxpr(grad)(train).jaxpr
  kernels = {tuple(x.w.shape) for x in jax.tree.leaves(tree, is_leaf=jlora.is_lora)
             if jlora.is_lora(x)}
  assert len(kernels) == 4  # (64, 64), (64, 32), (64, 128), (128, 64)
  shapes = {tuple(v.aval.shape) for e in iter_eqns(jaxpr) for v in e.outvars}
  assert not shapes & kernels
  assert any(e.primitive.name.startswith("remat") or e.primitive.name == "checkpoint"
             for e in iter_eqns(jaxpr))
  # The same loss differentiated with the weights merged does form them: the check sees them.
  merged_loss = lambda t: N.loss_fn(nnx.merge(parts["graphdef"], jlora.merge(t)), ids)
  merged = jax.make_jaxpr(jax.grad(lambda t: merged_loss(jlora.combine(t, frozen))))(train).jaxpr
  assert {tuple(v.aval.shape) for e in iter_eqns(merged) for v in e.outvars} & kernels


def test_script_rows_on_the_tiny_model(capsys):
  """`main` prints one row per implementation, with the row's fields and equal step-0 losses."""
  rows = [N.main(["qv4", "--impl", impl, "--tiny", "--warmup", "1", "--steps", "1",
                  "--rounds", "1"]) for impl in N.IMPLS]
  for row, impl in zip(rows, N.IMPLS):
    assert row["suite"] == "nnx" and row["name"] == f"nnx-{impl}-qv4-dots"
    assert row["impl"] == impl and row["remat"] == "dots" and row["tiny"]
    assert row["trainable"] == 1792 and row["tokens_s"] > 0
  assert rows[0]["loss_first"] == rows[1]["loss_first"]
  assert capsys.readouterr().out.count('"suite": "nnx"') == 2


def test_bad_arguments():
  with pytest.raises(ValueError, match="impl="):
    N.build("peft", "qv4", TINY)
  with pytest.raises(ValueError, match="remat="):
    N.Gemma2(TINY, attention=None, remat="everything", rngs=nnx.Rngs(0))
  with pytest.raises(SystemExit):
    N.main(["qv4", "--tiny"])  # --impl is required


@pytest.mark.parametrize("config,remat", [("qv4", "none"), ("all16", "dots")])
def test_jlora_step_is_flax_lora_step(config, remat):
  """From Flax's `nnx.LoRA` and from jlora the train step compiles to one program (the same
  instruction counts, temporary bytes and FLOPs): the rows' differences are run-to-run."""
  ids = _ids(5)
  stats = {}
  for impl in N.IMPLS:
    _, state, _, parts = N.build(impl, config, TINY, remat=remat)
    args = (state[0], state[1], parts["frozen"], ids) if impl == "builtin" else (*state, ids)
    stats[impl] = H.hlo_stats(parts["train"].lower(*args).compile())
  assert stats["builtin"]["instructions"].get("dot", 0) > 0
  assert stats["jlora"] == stats["builtin"]
