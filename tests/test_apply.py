"""`jlora.apply`: targets, layouts, ranks, alpha, init, dtype, stacked leaves."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora


def _rand(shape, seed=0, dtype=jnp.float32):
  # numpy, not jax.random: no compilation per shape keeps the suite fast.
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, np.float32), dtype)


def _lora_paths(tree):
  """The '/'-joined paths of the LoRA leaves of `tree`, sorted."""
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=jlora.is_lora)[0]
  return sorted("/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p)
                for p, x in flat if jlora.is_lora(x))


def _attention_block(q, k, v, o, extra=None):
  """One attention block with the given projection names, plus an MLP and norms."""
  block = {q: {"kernel": _rand((8, 12), 1)}, k: {"kernel": _rand((8, 12), 2)},
           v: {"kernel": _rand((8, 12), 3)}, o: {"kernel": _rand((12, 8), 4)},
           "mlp": {"kernel": _rand((8, 16), 5), "bias": _rand((16,), 6)},
           "norm": {"scale": _rand((8,), 7)}}
  block.update(extra or {})
  return {"block_0": block}


@pytest.mark.parametrize("q,k,v,o", [
    ("query", "key", "value", "attention_output"),  # Keras, Flax
    ("query_dense", "key_dense", "value_dense", "output_dense"),  # Keras BERT
    ("q_proj", "k_proj", "v_proj", "o_proj"),  # Hugging Face
    ("attn_q", "attn_k", "attn_v", "attn_output"),  # llama.cpp GGUF
    ("wq", "wk", "wv", "wo"),  # Meta Llama
    ("q", "k", "v", "o"),  # T5
])
def test_default_targets_are_query_and_value(q, k, v, o):
  lp = jlora.apply(_attention_block(q, k, v, o), rank=2)
  assert _lora_paths(lp) == sorted([f"block_0/{q}/kernel", f"block_0/{v}/kernel"])


def test_default_targets_flat_checkpoint_names():
  # Flat dicts keyed by checkpoint tensor names: components end at '.'.
  params = {"blk.0.attn_q.weight": _rand((8, 12), 1), "blk.0.attn_k.weight": _rand((8, 12), 2),
            "blk.0.attn_v.weight": _rand((8, 12), 3), "blk.0.attn_q.bias": _rand((12,), 4),
            "model.layers.0.self_attn.v_proj.weight": _rand((8, 12), 5),
            "output.weight": _rand((8, 30), 6), "token_embd.weight": _rand((30, 8), 7)}
  lp = jlora.apply(params, rank=2)
  assert _lora_paths(lp) == ["blk.0.attn_q.weight", "blk.0.attn_v.weight",
                             "model.layers.0.self_attn.v_proj.weight"]
  lp = jlora.apply(params, rank=2, targets="all-linear")
  assert "output.weight" not in _lora_paths(lp)  # the LM head
  assert "token_embd.weight" not in _lora_paths(lp)


def test_gemma_q_einsum_is_a_default_target():
  params = {"layer_0": {"attn": {"q_einsum": {"w": _rand((4, 8, 6))},
                                 "attn_vec_einsum": {"w": _rand((4, 6, 8))}}}}
  assert _lora_paths(jlora.apply(params, rank=2)) == ["layer_0/attn/q_einsum/w"]


def test_all_linear_skips_embeddings_head_biases_norms_scalars():
  params = _attention_block("query", "key", "value", "out", extra={
      "scalar": jnp.float32(3.0), "gate": jnp.ones((2, 2), jnp.int32) * 3})
  params["embedder"] = {"embedding": _rand((30, 8), 8)}
  params["lm_head"] = {"kernel": _rand((8, 30), 9)}
  lp = jlora.apply(params, rank=2, targets="all-linear")
  assert _lora_paths(lp) == [f"block_0/{n}/kernel" for n in ("key", "mlp", "out", "query", "value")]
  # Untouched leaves are the very same arrays.
  assert lp["embedder"]["embedding"] is params["embedder"]["embedding"]
  assert lp["block_0"]["mlp"]["bias"] is params["block_0"]["mlp"]["bias"]


def test_embedding_only_when_named_explicitly():
  params = {"embed": {"embedding": _rand((30, 8))}, "query": {"kernel": _rand((8, 8))}}
  assert _lora_paths(jlora.apply(params, rank=2)) == ["query/kernel"]
  lp = jlora.apply(params, rank=2, targets=r"embed/embedding")
  assert _lora_paths(lp) == ["embed/embedding"]
  assert lp["embed"]["embedding"].a.shape == (30, 2)


def test_regex_list_and_callable_targets():
  params = _attention_block("query", "key", "value", "out")
  assert _lora_paths(jlora.apply(params, targets=r"/key/")) == ["block_0/key/kernel"]
  assert _lora_paths(jlora.apply(params, targets=["key", r"^block_0/mlp"])) == [
      "block_0/key/kernel", "block_0/mlp/kernel"]
  picked = jlora.apply(params, targets=lambda path, leaf: leaf.shape == (12, 8))
  assert _lora_paths(picked) == ["block_0/out/kernel"]
  # A regex never turns a bias or a norm into LoRA, even a 2-D one.
  params["block_0"]["query"]["bias"] = _rand((3, 4))
  assert _lora_paths(jlora.apply(params, targets="query")) == ["block_0/query/kernel"]


def test_lora_leaf_at_init():
  w = _rand((8, 12))
  lp = jlora.apply({"q_proj": w}, rank=3)
  leaf = lp["q_proj"]
  assert leaf.w is w
  assert leaf.a.shape == (8, 3) and leaf.b.shape == (3, 12)
  assert not np.any(np.asarray(leaf.b))
  assert np.all(np.asarray(leaf.a) != 0)
  assert leaf.alpha == 3.0 and leaf.scale == 1.0 and leaf.rank == 3
  assert leaf.shape == (8, 12) and leaf.dtype == jnp.float32 and leaf.ndim == 2
  assert "LoRA(w=float32[8, 12], a=float32[8, 3], b=float32[3, 12]" in repr(leaf)


def test_he_uniform_and_gaussian_init():
  w = _rand((256, 64))
  a = np.asarray(jlora.apply({"q": w}, rank=8)["q"].a)
  lim = math.sqrt(6.0 / 256)
  assert np.abs(a).max() <= lim and np.abs(a).max() > 0.9 * lim
  np.testing.assert_allclose(a.std(), lim / math.sqrt(3), rtol=0.05)
  g = np.asarray(jlora.apply({"q": w}, rank=8, init="gaussian")["q"].a)
  np.testing.assert_allclose(g.std(), 1 / 8, rtol=0.05)
  assert abs(g.mean()) < 0.01


def test_he_uniform_fan_in_spans_all_a_axes():
  # Keras computes fan_in over A's own leading axes: 4 * 64 here.
  a = np.asarray(jlora.apply({"query": _rand((4, 64, 16))}, rank=2)["query"].a)
  lim = math.sqrt(6.0 / (4 * 64))
  assert np.abs(a).max() <= lim and np.abs(a).max() > 0.9 * lim


def test_keys_per_leaf_and_per_call():
  params = {"q_proj": _rand((8, 12)), "v_proj": _rand((8, 12))}
  lp = jlora.apply(params, rank=2)
  assert not np.array_equal(lp["q_proj"].a, lp["v_proj"].a)
  again = jlora.apply(params, rank=2)
  np.testing.assert_array_equal(lp["q_proj"].a, again["q_proj"].a)
  other = jlora.apply(params, rank=2, key=jax.random.key(7))
  assert not np.array_equal(lp["q_proj"].a, other["q_proj"].a)


def test_adapter_dtype_float32_whatever_the_kernel():
  w = _rand((8, 12), dtype=jnp.bfloat16)
  leaf = jlora.apply({"q_proj": w}, rank=2)["q_proj"]
  assert leaf.w.dtype == jnp.bfloat16 and leaf.dtype == jnp.bfloat16
  assert leaf.a.dtype == jnp.float32 and leaf.b.dtype == jnp.float32
  leaf = jlora.apply({"q_proj": w}, rank=2, dtype=jnp.bfloat16)["q_proj"]
  assert leaf.a.dtype == jnp.bfloat16 and leaf.b.dtype == jnp.bfloat16


def test_rank_and_alpha_mappings_and_rslora():
  params = {"q_proj": _rand((8, 12)), "v_proj": _rand((8, 12))}
  lp = jlora.apply(params, rank={"q_": 2, ".*": 4}, alpha={"v_": 16.0})
  q, v = lp["q_proj"], lp["v_proj"]
  assert (q.rank, q.alpha, q.scale) == (2, 2.0, 1.0)  # alpha defaults to the rank
  assert (v.rank, v.alpha, v.scale) == (4, 16.0, 4.0)
  rs = jlora.apply(params, rank=4, alpha=8.0, rslora=True)["q_proj"]
  assert rs.rslora and rs.scale == 8.0 / 2.0
  assert jlora.apply(params, rank=4, alpha=8.0)["q_proj"].scale == 2.0


@pytest.mark.parametrize("shape,rank,layout,in_axes,a_shape,b_shape", [
    ((8, 12), 3, "keras", None, (8, 3), (3, 12)),
    ((8, 12), 3, "fan", None, (8, 3), (3, 12)),
    ((4, 16, 6), 2, "keras", None, (4, 16, 2), (2, 6)),  # Keras EinsumDense: per-head A
    ((16, 4, 6), 2, "fan", (0,), (16, 2), (2, 4, 6)),  # Flax DenseGeneral (in, heads, hd)
    ((4, 6, 16), 2, "fan", (0, 1), (4, 6, 2), (2, 16)),  # output projection (heads, hd, out)
    ((4, 16, 6), 2, "fan", (1,), (16, 2), (2, 4, 6)),  # gemma q_einsum (heads, d, hd)
    ((4, 16, 6), 2, "fan", (-2,), (16, 2), (2, 4, 6)),  # negative axes count from the end
    ((3, 3, 4, 8), 2, "keras", None, (3, 3, 4, 2), (2, 8)),  # conv (kh, kw, in, out)
])
def test_layouts(shape, rank, layout, in_axes, a_shape, b_shape):
  leaf = jlora.apply({"query": _rand(shape)}, rank=rank, layout=layout, in_axes=in_axes)["query"]
  assert leaf.a.shape == a_shape and leaf.b.shape == b_shape
  assert leaf.shape == shape and leaf.delta().shape == shape
  c = jlora.count({"query": leaf})
  assert c == (math.prod(shape) + math.prod(a_shape) + math.prod(b_shape),
               math.prod(a_shape) + math.prod(b_shape), math.prod(shape))


def test_layout_and_in_axes_mappings():
  params = {"query": _rand((4, 16, 6)), "value": _rand((8, 12))}
  lp = jlora.apply(params, rank=2, layout={"query": "fan", ".*": "keras"},
                   in_axes={"query": (1,)})
  assert lp["query"].a.shape == (16, 2) and lp["query"].b.shape == (2, 4, 6)
  assert lp["value"].a.shape == (8, 2) and lp["value"].b.shape == (2, 12)


# Gemma 2 2B (keras `gemma2_2b_en` architecture), abstract: see README "Layouts".
_GEMMA = dict(vocab=256000, layers=26, heads=8, kv_heads=4, hidden=2304, ffw=9216, head_dim=256)


def _gemma2_2b_abstract(stacked=False):
  g = _GEMMA
  f = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
  block = lambda *lead: {
      "attention": {"query": {"kernel": f(*lead, g["heads"], g["hidden"], g["head_dim"])},
                    "key": {"kernel": f(*lead, g["kv_heads"], g["hidden"], g["head_dim"])},
                    "value": {"kernel": f(*lead, g["kv_heads"], g["hidden"], g["head_dim"])},
                    "attention_output": {
                        "kernel": f(*lead, g["heads"], g["head_dim"], g["hidden"])}},
      "ffw_gating": {"kernel": f(*lead, g["hidden"], g["ffw"])},
      "ffw_gating_2": {"kernel": f(*lead, g["hidden"], g["ffw"])},
      "ffw_linear": {"kernel": f(*lead, g["ffw"], g["hidden"])},
      **{n: {"scale": f(*lead, g["hidden"])} for n in (
          "pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm")}}
  tree = {"token_embedding": {"embeddings": f(g["vocab"], g["hidden"])},
          "final_normalization": {"scale": f(g["hidden"])}}
  if stacked:
    tree["layers"] = block(g["layers"])
  else:
    tree.update({f"decoder_block_{i}": block() for i in range(g["layers"])})
  return tree


@pytest.mark.parametrize("stacked", [False, True])
def test_gemma2_2b_counts_match_keras(stacked):
  params = _gemma2_2b_abstract(stacked)
  kw = dict(stacked=r"^layers/") if stacked else {}
  lp = jax.eval_shape(lambda p: jlora.apply(p, rank=4, **kw), params)
  c = jlora.count(lp)
  assert c.total - c.trainable == 2_614_341_888  # keras count_params()
  assert c.trainable == 2_928_640  # keras enable_lora(rank=4)
  fan = jax.eval_shape(lambda p: jlora.apply(p, rank=4, layout="fan", in_axes=(-2,), **kw),
                       params)
  assert jlora.count(fan).trainable == 798_720  # A (2304, r), B (r, heads * head_dim)


def test_stacked_leaves_get_one_adapter_per_slice():
  params = {"layers": {"query": {"kernel": _rand((3, 8, 12))}, "norm": {"scale": _rand((3, 8))}},
            "head": {"query": {"kernel": _rand((8, 12), 1)}}}
  lp = jlora.apply(params, rank=2, stacked=r"^layers/")
  leaf = lp["layers"]["query"]["kernel"]
  assert leaf.stack == 1 and leaf.a.shape == (3, 8, 2) and leaf.b.shape == (3, 2, 12)
  assert leaf.shape == (3, 8, 12)
  assert not np.array_equal(leaf.a[0], leaf.a[1])  # own init per slice
  assert lp["head"]["query"]["kernel"].stack == 0
  c = jlora.count(lp)
  assert c.trainable == 3 * (8 * 2 + 2 * 12) + (8 * 2 + 2 * 12)
  assert c.frozen == 3 * 8 * 12 + 3 * 8 + 8 * 12


def test_stacked_mapping_with_two_stack_axes():
  params = {"stages": {"value": _rand((2, 3, 4, 8, 6))}}
  leaf = jlora.apply(params, rank=2, stacked={"^stages/": 2})["stages"]["value"]
  assert leaf.stack == 2
  assert leaf.a.shape == (2, 3, 4, 8, 2) and leaf.b.shape == (2, 3, 2, 6)
  assert leaf.delta().shape == (2, 3, 4, 8, 6)


def test_trainable_pattern_wraps_leaves():
  params = {"q_proj": _rand((8, 12)), "classifier": {"kernel": _rand((8, 3)), "bias": _rand((3,))}}
  lp = jlora.apply(params, rank=2, trainable="^classifier/")
  assert isinstance(lp["classifier"]["kernel"], jlora.Trainable)
  assert isinstance(lp["classifier"]["bias"], jlora.Trainable)
  assert lp["classifier"]["bias"].value is params["classifier"]["bias"]
  assert repr(lp["classifier"]["bias"]) == "Trainable(float32[3])"
  assert jlora.count(lp).trainable == 8 * 2 + 2 * 12 + 8 * 3 + 3


def test_apply_to_other_targets_of_a_lora_tree():
  params = {"q_proj": _rand((8, 12)), "k_proj": _rand((8, 12), 1)}
  lp = jlora.apply(jlora.apply(params, rank=2), rank=3, targets="k_proj")
  assert lp["q_proj"].rank == 2 and lp["k_proj"].rank == 3


def test_list_and_tuple_pytrees():
  params = [{"q_proj": _rand((8, 12))}, (_rand((8, 12)), {"v_proj": _rand((6, 4))})]
  lp = jlora.apply(params, rank=2)
  assert jlora.is_lora(lp[0]["q_proj"]) and jlora.is_lora(lp[1][1]["v_proj"])
  assert not jlora.is_lora(lp[1][0])
  assert isinstance(lp[1], tuple)


def test_apply_under_jit():
  params = {"q_proj": _rand((8, 12))}
  lp = jax.jit(lambda p: jlora.apply(p, rank=2))(params)
  eager = jlora.apply(params, rank=2)
  np.testing.assert_array_equal(lp["q_proj"].a, eager["q_proj"].a)
  np.testing.assert_array_equal(lp["q_proj"].w, params["q_proj"])
