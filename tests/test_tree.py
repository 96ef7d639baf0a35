"""split/combine, merge/base, count/summary, and jit/grad/vmap through LoRA leaves."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from tests.helpers import rand as _rand, randomize_b as _randomize_b


def _reference_delta(leaf):
  """scale * a @ b in kernel order, in float64 numpy, written independently of jlora."""
  a, b = np.asarray(leaf.a, np.float64), np.asarray(leaf.b, np.float64)
  s, r = leaf.stack, leaf.rank
  lead = a.shape[:s]
  a_dims, b_dims = a.shape[s:-1], b.shape[s + 1:]
  ab = np.matmul(a.reshape(lead + (math.prod(a_dims), r)), b.reshape(lead + (r, math.prod(b_dims))))
  ab = ab.reshape(lead + a_dims + b_dims)
  # ab's kernel axes are ordered a_axes then b_axes; put them back in kernel order.
  order = list(leaf.a_axes) + [i for i in range(leaf.ndim) if i not in leaf.a_axes]
  ab = np.moveaxis(ab, [s + j for j in range(leaf.ndim)], [s + i for i in order])
  return leaf.scale * ab


def _assert_trees_equal(x, y):
  assert jax.tree.structure(x) == jax.tree.structure(y)
  for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
    assert u.dtype == v.dtype and u.shape == v.shape
    np.testing.assert_array_equal(u, v)


PARAMS = {"block": {"query": {"kernel": _rand((8, 12), 1), "bias": _rand((12,), 2)},
                    "value": {"kernel": _rand((4, 8, 6), 3)},
                    "norm": {"scale": _rand((8,), 4)}},
          "head": {"kernel": _rand((12, 3), 5)}}


def _lora_tree():
  return jlora.apply(PARAMS, rank=2, trainable="^head/")


def test_split_holes_and_round_trip():
  lp = _lora_tree()
  halves = jlora.split(lp)
  assert isinstance(halves, jlora.Split) and halves._fields == ("trainable", "frozen")
  t, f = halves
  q_t, q_f = t["block"]["query"]["kernel"], f["block"]["query"]["kernel"]
  assert q_t.w is None and q_t.a is not None and q_t.b is not None
  assert q_f.w is not None and q_f.a is None and q_f.b is None
  assert t["block"]["query"]["bias"] is None and f["block"]["query"]["bias"] is not None
  assert isinstance(t["head"]["kernel"], jlora.Trainable)
  assert f["head"]["kernel"] == jlora.Trainable(None)
  assert q_t.rank == 2 and q_f.shape == (8, 12)  # metadata survives in both halves
  back = jlora.combine(t, f)
  assert jax.tree.structure(back) == jax.tree.structure(lp)
  for u, v in zip(jax.tree.leaves(back), jax.tree.leaves(lp)):
    assert u is v
  # Counts add up over the halves.
  assert jlora.count(t).trainable == jlora.count(lp).trainable
  assert jlora.count(f).frozen == jlora.count(lp).frozen


def test_split_under_jit():
  lp = _lora_tree()
  t, f = jax.jit(jlora.split)(lp)
  _assert_trees_equal(jax.jit(jlora.combine)(t, f), lp)


def test_merge_at_init_is_exactly_the_base():
  lp = _lora_tree()
  merged = jlora.merge(lp)
  expected = jax.tree.map(lambda x: x, PARAMS)
  _assert_trees_equal(merged, expected)


@pytest.mark.parametrize("layout,in_axes,rslora", [
    ("keras", None, False), ("fan", (1,), False), ("keras", None, True)])
def test_merge_equals_w_plus_scaled_a_b(layout, in_axes, rslora):
  lp = _randomize_b(jlora.apply(PARAMS, rank=2, alpha=3.0, layout=layout, in_axes=in_axes,
                                rslora=rslora, targets="all-linear"))
  merged = jlora.merge(lp)
  for name in ("query", "value"):
    leaf = lp["block"][name]["kernel"]
    expected = np.asarray(leaf.w, np.float64) + _reference_delta(leaf)
    got = merged["block"][name]["kernel"]
    assert got.dtype == jnp.float32 and got.shape == leaf.w.shape
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    assert not np.allclose(got, leaf.w, atol=1e-3)  # the update is not negligible
  np.testing.assert_allclose(lp["block"]["query"]["kernel"].scale,
                             3.0 / math.sqrt(2) if rslora else 1.5)


def test_merge_bfloat16_kernel():
  params = {"q_proj": _rand((16, 32), dtype=jnp.bfloat16)}
  lp = _randomize_b(jlora.apply(params, rank=4, alpha=8.0))
  got = jlora.merge(lp)["q_proj"]
  assert got.dtype == jnp.bfloat16
  leaf = lp["q_proj"]
  expected = np.asarray(leaf.w, np.float64) + _reference_delta(leaf)
  # One bf16 rounding of the float32 sum: relative error <= 2**-8.
  eps = float(jnp.finfo(jnp.bfloat16).eps)
  np.testing.assert_allclose(np.asarray(got, np.float64), expected, rtol=eps, atol=eps)
  assert float(jnp.max(jnp.abs(got.astype(jnp.float32) - leaf.w.astype(jnp.float32)))) > 0.1


def test_merge_stacked_equals_per_slice_merge():
  params = {"layers": {"value": _rand((3, 8, 6))}}
  lp = _randomize_b(jlora.apply(params, rank=2, stacked="^layers/"))
  merged = jlora.merge(lp)["layers"]["value"]
  leaf = lp["layers"]["value"]
  for i in range(3):
    one = dataclasses.replace(leaf, w=leaf.w[i], a=leaf.a[i], b=leaf.b[i], stack=0)
    np.testing.assert_allclose(merged[i], jlora.merge({"v": one})["v"], rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(merged, np.asarray(leaf.w) + _reference_delta(leaf), rtol=1e-6,
                             atol=1e-6)


def test_merge_donate():
  params = jax.tree.map(jnp.copy, PARAMS)  # donation deletes the frozen buffers
  lp = _randomize_b(jlora.apply(params, rank=2, trainable="^head/"))
  expected = jlora.merge(lp)
  merged = jlora.merge(lp, donate=True)  # pytest's filterwarnings=error: no unusable donation
  _assert_trees_equal(merged, expected)
  assert params["block"]["query"]["kernel"].is_deleted()
  assert not lp["block"]["query"]["kernel"].a.is_deleted()  # adapters are not donated


def test_base_undoes_apply_and_merge_keeps_structure():
  lp = _randomize_b(_lora_tree())
  _assert_trees_equal(jlora.base(lp), PARAMS)
  assert jlora.base(lp)["block"]["value"]["kernel"] is PARAMS["block"]["value"]["kernel"]
  merged = jlora.merge(lp)
  assert jax.tree.structure(merged) == jax.tree.structure(PARAMS)
  _assert_trees_equal(jlora.base(merged), merged)  # a plain tree is its own base


def test_merge_and_base_under_jit():
  lp = _randomize_b(_lora_tree())
  _assert_trees_equal(jax.jit(jlora.merge)(lp), jlora.merge(lp))
  _assert_trees_equal(jax.jit(jlora.base)(lp), PARAMS)


def test_count_and_summary():
  lp = _lora_tree()
  q, v = (8 * 2 + 2 * 12), (4 * 8 * 2 + 2 * 6)
  frozen = 8 * 12 + 12 + 4 * 8 * 6 + 8
  c = jlora.count(lp)
  assert isinstance(c, jlora.Count)
  assert c == (frozen + q + v + 12 * 3, q + v + 12 * 3, frozen)
  assert jlora.count(PARAMS) == (frozen + 36, 0, frozen + 36)
  text = jlora.summary(lp)
  lines = text.splitlines()
  assert lines[-3:] == [f"Total params: {c.total:,}", f"Trainable params: {c.trainable:,}",
                        f"Non-trainable params: {c.frozen:,}"]
  row = next(r for r in lines if r.startswith("block/value/kernel"))
  assert row.split()[1:] == ["(4,", "8,", "6)", "float32", "2", f"{v}", "+", "192", "frozen"]
  assert any(r.split()[:4] == [".a", "(4,", "8,", "2)"] for r in lines)
  assert any(r.startswith("head/kernel") and "full" in r for r in lines)
  short = jlora.summary(lp, max_rows=2).splitlines()
  assert len(lines) == 3 + 9 + 4  # rule, head, rule; 9 rows (LoRA: + .a, .b); rule, totals
  assert "... 7 more rows" in short and short[-3:] == lines[-3:]


def test_summary_uses_thousands_separators():
  params = {"q_proj": jax.ShapeDtypeStruct((1024, 2048), jnp.bfloat16)}
  lp = jax.eval_shape(lambda p: jlora.apply(p, rank=8), params)
  lines = jlora.summary(lp).splitlines()
  assert lines[-3:] == ["Total params: 2,121,728", "Trainable params: 24,576",
                        "Non-trainable params: 2,097,152"]
  assert any("24,576 + 2,097,152 frozen" in r and "bfloat16" in r for r in lines)


def test_keystr_paths_end_in_w_a_b():
  lp = _lora_tree()
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(lp)[0]]
  assert "['block']['query']['kernel'].w" in paths
  assert "['block']['query']['kernel'].a" in paths
  assert "['block']['query']['kernel'].b" in paths
  assert "['head']['kernel'].value" in paths
  assert "['block']['query']['bias']" in paths


def test_jit_grad_vmap_pass_through_lora_leaves():
  lp = _randomize_b(jlora.apply({"q_proj": _rand((8, 12))}, rank=2))
  x = _rand((5, 8), 9)

  def f(tree, x):
    return jnp.sum(jnp.tanh(x @ jlora.merge(tree)["q_proj"]))

  # jit: LoRA leaves in, LoRA leaves out.
  same = jax.jit(lambda t: t)(lp)
  assert jlora.is_lora(same["q_proj"]) and same["q_proj"].alpha == 2.0
  # grad: a LoRA-shaped gradient; d/dw of w + s*a@b is the identity, so g.a = s * g.w @ b.T.
  g = jax.jit(jax.grad(f))(lp, x)["q_proj"]
  assert jlora.is_lora(g) and g.a.shape == (8, 2) and g.b.shape == (2, 12)
  leaf = lp["q_proj"]
  np.testing.assert_allclose(g.a, leaf.scale * g.w @ leaf.b.T, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(g.b, leaf.scale * leaf.a.T @ g.w, rtol=1e-5, atol=1e-6)
  # vmap over a batch of inputs, the tree broadcast.
  ys = jax.vmap(f, in_axes=(None, 0))(lp, x[:, None, :])
  np.testing.assert_allclose(ys, [f(lp, x[i:i + 1]) for i in range(5)], rtol=1e-5)
  # vmap over a batch of LoRA trees (each with its own adapters).
  trees = [_randomize_b(jlora.apply({"q_proj": _rand((8, 12))}, rank=2, key=jax.random.key(i)),
                        seed=i) for i in range(3)]
  batched = jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  merged = jax.vmap(jlora.merge)(batched)["q_proj"]
  for i in range(3):
    np.testing.assert_allclose(merged[i], jlora.merge(trees[i])["q_proj"], rtol=1e-6)


def test_merge_keeps_sharding():
  from jax.sharding import NamedSharding, PartitionSpec as P
  mesh = jax.make_mesh((2,), ("x",), devices=jax.devices()[:2])
  rng = np.random.default_rng(0)
  shard = lambda spec, *s: jax.device_put(rng.standard_normal(s, np.float32),
                                          NamedSharding(mesh, spec))
  params = {"q_proj": shard(P(None, "x"), 8, 16), "v_proj": shard(P("x", None), 8, 16)}
  lp = _randomize_b(jlora.apply(params, rank=2))
  want = {k: np.asarray(params[k]) + _reference_delta(lp[k]) for k in params}
  for merged in (jlora.merge(lp), jlora.merge(_randomize_b(jlora.apply(params, rank=2)),
                                              donate=True)):
    for name in params:
      assert merged[name].sharding.is_equivalent_to(params[name].sharding, 2), name
      assert len(merged[name].addressable_shards) == 2, name
      np.testing.assert_allclose(merged[name], want[name], rtol=1e-5, atol=1e-5, err_msg=name)


def test_summary_and_count_of_split_halves():
  t = jlora.apply({"q_proj": jnp.asarray(np.random.default_rng(0).normal(size=(6, 8)), jnp.float32),
                   "head": jnp.ones(8)}, rank=2, trainable="head")
  tr, fr = jlora.split(t)
  s_tr, s_fr = jlora.summary(tr), jlora.summary(fr)
  assert "Trainable params: 36" in s_tr and "Non-trainable params: 0" in s_tr
  assert "Trainable params: 0" in s_fr and "Non-trainable params: 48" in s_fr
  assert tr["q_proj"].rank == 2 and fr["q_proj"].rank is None
  assert fr["q_proj"].dtype == jnp.float32 and tr["q_proj"].dtype == jnp.float32


def test_all_linear_keeps_bert_output_dense_and_trainable_wins_over_preset():
  k = jnp.ones((4, 6))
  params = {"encoder": {"attention": {"output": {"dense": {"kernel": k}}}},
            "lm_head": {"kernel": k}, "output": {"kernel": k},
            "classifier": {"kernel": jnp.ones((4, 2))}}
  t = jlora.apply(params, rank=2, targets="all-linear", trainable="^classifier/")
  assert isinstance(t["encoder"]["attention"]["output"]["dense"]["kernel"], jlora.LoRA)
  assert not isinstance(t["lm_head"]["kernel"], jlora.LoRA)
  assert not isinstance(t["output"]["kernel"], jlora.LoRA)
  assert isinstance(t["classifier"]["kernel"], jlora.Trainable)


def test_merge_donating_a_tree_with_tied_frozen_weights():
  w = _rand((8, 6), 3)
  emb = _rand((6, 8), 4)
  tree = jlora.apply({"q_proj": w, "embed": emb, "head": emb}, rank=2, targets="q_proj")
  want = jlora.merge(tree)
  got = jlora.merge(tree, donate=True)  # "head" and "embed" are one buffer: donated once
  for k in want:
    np.testing.assert_array_equal(np.asarray(got[k]), np.asarray(want[k]))
