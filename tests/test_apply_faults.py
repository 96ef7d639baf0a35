"""`jlora.apply` faults of issue 15: unchecked inputs, targets left out, unclear errors."""

import math
import re

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import jlora
from tests.helpers import rand


def _lora_paths(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=jlora.is_lora)[0]
  return sorted("/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p)
                for p, x in flat if jlora.is_lora(x))


def _trainable_paths(tree):
  flat = jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=lambda x: isinstance(x, jlora.Trainable))[0]
  return sorted("/".join(str(k.key) for k in p) for p, x in flat
                if isinstance(x, jlora.Trainable))


PARAMS = {"block": {"q_proj": {"kernel": rand((8, 12), 1)}, "v_proj": {"kernel": rand((8, 12), 2)},
                    "mlp": {"kernel": rand((8, 16), 3), "bias": rand((16,), 4)}},
          "classifier": {"kernel": rand((8, 3), 5), "bias": rand((3,), 6)}}


# alpha -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf"), np.float32("nan")])
def test_alpha_not_finite(alpha):
  with pytest.raises(ValueError, match=r"jlora.apply: alpha (nan|inf|-inf) for 'block/q_proj/"
                                       r"kernel' is not finite.* alpha=None"):
    jlora.apply(PARAMS, rank=2, alpha=alpha)


def test_alpha_not_finite_in_a_mapping_names_the_pattern():
  with pytest.raises(ValueError, match=r"alpha nan for 'block/v_proj/kernel' \(from the pattern "
                                       r"'v_'\) is not finite"):
    jlora.apply(PARAMS, rank=2, alpha={"v_": float("nan"), ".*": 4.0})


@pytest.mark.parametrize("alpha", [0, 0.0, {"q_": 0.0, ".*": 2.0}])
def test_alpha_zero_cannot_train(alpha):
  with pytest.raises(ValueError, match=r"alpha 0(\.0)? for 'block/q_proj/kernel'.* scale 0: the "
                                       r"adapter never changes the model and gets no gradient"):
    jlora.apply(PARAMS, rank=2, alpha=alpha)


@pytest.mark.parametrize("alpha", [True, "4", 1 + 2j, [4.0]])
def test_alpha_not_a_number(alpha):
  with pytest.raises(TypeError, match=r"alpha for 'block/q_proj/kernel' must be a real number, "
                                      r"got"):
    jlora.apply(PARAMS, rank=2, alpha=alpha)


def test_alpha_numpy_and_jax_scalars_are_python_floats():
  for alpha in (np.float32(3.0), np.int64(3), jnp.float32(3.0)):
    leaf = jlora.apply(PARAMS, rank=2, alpha=alpha)["block"]["q_proj"]["kernel"]
    assert type(leaf.alpha) is float and leaf.alpha == 3.0


def test_negative_alpha_trains():
  # PEFT accepts any float alpha; a negative one flips the sign of the update and trains.
  t = jlora.apply(PARAMS, rank=2, alpha=-4.0)
  leaf = t["block"]["q_proj"]["kernel"]
  assert leaf.scale == -2.0
  x = rand((5, 8), 7)
  loss = lambda tree: jnp.sum((x @ jlora.merge(tree)["block"]["q_proj"]["kernel"] - 1.0) ** 2)
  g = jax.grad(loss)(t)["block"]["q_proj"]["kernel"]
  assert float(jnp.abs(g.b).max()) > 1e-3


# rank ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rank", [np.int64(2), np.int32(2), np.uint8(2), jnp.int32(2)])
def test_rank_numpy_integers(rank):
  t = jlora.apply(PARAMS, rank=rank)
  leaf = t["block"]["q_proj"]["kernel"]
  assert type(leaf.rank) is int and leaf.rank == 2 and leaf.a.shape == (8, 2)
  leaf = jlora.apply(PARAMS, rank={"q_": np.int64(3), ".*": 2})["block"]["q_proj"]["kernel"]
  assert leaf.rank == 3


@pytest.mark.parametrize("rank", [np.True_, np.float64(2.0)])
def test_rank_numpy_non_integers(rank):
  with pytest.raises(TypeError, match=r"rank for 'block/q_proj/kernel' must be an int"):
    jlora.apply(PARAMS, rank=rank)


@pytest.mark.parametrize("shape", [(1, 16), (16, 1), (5, 4, 1)])
def test_rank_on_a_kernel_that_cannot_be_adapted(shape):
  with pytest.raises(ValueError) as e:
    jlora.apply({"q_proj": rand(shape)}, rank=1)
  msg = str(e.value)
  assert re.search(r"jlora.apply: the kernel at 'q_proj' of shape .* cannot carry a LoRA adapter",
                   msg), msg
  assert "leave it out of `targets`" in msg
  assert "rank={'q_proj': 1" not in msg and "rank={'q_proj': 0" not in msg
  if len(shape) > 2:
    assert "layout='fan'" in msg  # factored another way, (5, 4, 1) fits


@pytest.mark.parametrize("rank", [2, {"q_": 2, ".*": 1}])
def test_rank_suggestion_is_a_valid_rank(rank):
  params = {"q_proj": rand((2, 16)), "v_proj": rand((8, 8), 1)}
  with pytest.raises(ValueError, match=r"rank 2 for 'q_proj'") as e:
    jlora.apply(params, rank=rank)
  suggestion = re.search(r"e\.g\. rank=(\{.*?\})", str(e.value)).group(1)
  fixed = eval(suggestion)  # the suggested argument works as given
  assert jlora.apply(params, rank=fixed)["q_proj"].rank == 1


# stacked ---------------------------------------------------------------------------------------

def test_stacked_leaves_a_default_target_with_one_axis():
  params = {"layers": {"q_proj": {"kernel": rand((3, 8))}}, "head": {"v_proj": rand((8, 8), 1)}}
  with pytest.raises(ValueError, match=r"jlora.apply: stacked='\^layers/' leaves 'layers/q_proj/"
                                       r"kernel' of shape \(3, 8\) with kernel shape \(8,\) after "
                                       r"1 stack axis.* ndim >= 2"):
    jlora.apply(params, rank=2, stacked="^layers/")
  with pytest.raises(ValueError, match=r"leaves 'layers/q_proj/kernel' of shape \(3, 8\)"):
    jlora.apply({"layers": params["layers"]}, rank=2, stacked="^layers/")  # was "matched no kernel"


def test_stacked_leaves_an_explicit_target_with_one_axis():
  params = {"layers": {"mlp": {"kernel": rand((3, 8))}}, "head": {"kernel": rand((8, 8), 1)}}
  with pytest.raises(ValueError, match=r"leaves 'layers/mlp/kernel' of shape \(3, 8\) with kernel "
                                       r"shape \(8,\)"):
    jlora.apply(params, rank=2, targets="mlp|head", stacked="^layers/")
  with pytest.raises(ValueError, match=r"leaves 'layers/mlp/kernel' of shape \(3, 8\)"):
    jlora.apply(params, rank=2, targets="all-linear", stacked="^layers/")
  with pytest.raises(ValueError, match=r"stacked=\{'\^layers/': 2\} leaves 'layers/mlp/kernel' of "
                                       r"shape \(3, 8\) with kernel shape \(\) after 2 stack axes"):
    jlora.apply(params, rank=2, targets="mlp", stacked={"^layers/": 2})


def test_stacked_per_layer_vectors_stay_out_of_all_linear():
  # Stacked norms, biases and per-layer vectors are not kernels: all-linear leaves them out.
  params = {"layers": {"mlp": {"kernel": rand((3, 8, 16)), "bias": rand((3, 16), 1)},
                       "norm": {"scale": rand((3, 8), 2)}, "gate_scale": rand((3, 8), 3)}}
  lp = jlora.apply(params, rank=2, targets="all-linear", stacked="^layers/")
  assert _lora_paths(lp) == ["layers/mlp/kernel"]
  assert lp["layers"]["mlp"]["kernel"].stack == 1


@pytest.mark.parametrize("stacked", ["^layer/", {"^layer/": 1}, ["^layer/", "^blocks/"]])
def test_stacked_matches_no_leaf(stacked):
  params = {"layers": {"q_proj": rand((3, 8, 8))}}
  with pytest.raises(ValueError, match=r"jlora.apply: stacked=.* matched no leaf.* Nearest paths: "
                                       r"\[.*'layers/q_proj'"):
    jlora.apply(params, rank=2, stacked=stacked)


@pytest.mark.parametrize("n", [-1, 1.5, True, "1"])
def test_stacked_count_not_a_natural_number(n):
  params = {"layers": {"q_proj": rand((3, 8, 8))}}
  with pytest.raises((TypeError, ValueError), match=r"stacked=.* gives .* stack axes for "
                                                    r"'layers/q_proj'; it must be an int >= 0"):
    jlora.apply(params, rank=2, stacked={"layers": n})


def test_stacked_numpy_count():
  params = {"layers": {"q_proj": rand((3, 8, 8))}}
  leaf = jlora.apply(params, rank=2, stacked={"layers": np.int64(1)})["layers"]["q_proj"]
  assert type(leaf.stack) is int and leaf.stack == 1


# embeddings and norms by whole components ---------------------------------------------------------

@pytest.mark.parametrize("path", [("text_embedder", "attn", "query", "kernel"),
                                  ("denormalizer", "query", "kernel"),
                                  ("embedding_head", "value", "kernel"),
                                  ("normalization_free", "q_proj", "kernel"),
                                  ("token_embedder_mlp", "attn", "v_proj", "kernel")])
def test_default_targets_under_embed_or_norm_named_modules(path):
  params = {}
  node = params
  for k in path[:-1]:
    node = node.setdefault(k, {})
  node[path[-1]] = rand((8, 12))
  assert _lora_paths(jlora.apply(params, rank=2)) == ["/".join(path)]


def test_all_linear_adapts_patch_embedding_projections():
  params = {"patch_embed": {"proj": {"kernel": rand((4, 4, 3, 16))}},  # timm / ViT
            "embeddings": {"patch_embeddings": {"projection": {"kernel": rand((4, 4, 3, 16), 1)}},
                           "cls_token": rand((1, 1, 16), 2),
                           "position_embeddings": rand((1, 5, 16), 3)},
            "pos_embed": rand((1, 5, 16), 4),
            "text_embedder": {"dense": {"kernel": rand((16, 16), 5)}},
            "blocks": {"attn": {"qkv": {"kernel": rand((16, 48), 6)}},
                       "norm1": {"scale": rand((16,), 7), "bias": rand((16,), 8)}}}
  lp = jlora.apply(params, rank=2, targets="all-linear")
  assert _lora_paths(lp) == ["blocks/attn/qkv/kernel",
                             "embeddings/patch_embeddings/projection/kernel",
                             "patch_embed/proj/kernel", "text_embedder/dense/kernel"]


@pytest.mark.parametrize("table", [
    "embed_tokens/embedding", "model.embed_tokens.weight", "wte", "transformer.wte.weight",
    "Embed_0/embedding", "embedder/input_embedding", "token_embedding/embeddings",
    "embeddings/word_embeddings/embedding", "token_embd.weight", "wpe", "pos_embedding",
    "tok_embeddings/weight", "gpt_neox.embed_in.weight", "encoder/pos_embed"])
def test_all_linear_leaves_out_embedding_tables(table):
  params = {table: rand((30, 8)), "mlp": {"kernel": rand((8, 8), 1)}}
  assert _lora_paths(jlora.apply(params, rank=2, targets="all-linear")) == ["mlp/kernel"]


@pytest.mark.parametrize("norm", [
    "input_layernorm/scale", "post_attention_layernorm/scale", "LayerNorm_0/scale", "norm/scale",
    "ln_f/scale", "ln_1/g", "RMSNorm_0/scale", "q_norm/scale", "final_normalization/scale",
    "layer_norm1/scale", "model.norm.weight", "blk.0.attn_norm.weight", "norm_f/weight",
    "self_attention_layer_norm/gamma", "BatchNorm_0/scale", "final_norm"])
def test_all_linear_leaves_out_2d_norms(norm):
  # 2-D: a norm's scale stacked over layers, with `stacked` not given.
  params = {norm: rand((3, 8)), "mlp": {"kernel": rand((8, 8), 1)}}
  assert _lora_paths(jlora.apply(params, rank=2, targets="all-linear")) == ["mlp/kernel"]


# explicit patterns and bias-named leaves ----------------------------------------------------------

def test_explicit_regex_naming_a_2d_b_adapts_it():
  params = {"attn": {"w": rand((8, 8)), "b": rand((8, 12), 1)}, "q_proj": rand((8, 8), 2)}
  assert _lora_paths(jlora.apply(params, rank=2, targets="attn/b")) == ["attn/b"]
  assert _lora_paths(jlora.apply(params, rank=2, targets=r"attn/(w|b)$")) == ["attn/b", "attn/w"]
  # Matching only the module keeps bias-named leaves out, as before.
  assert _lora_paths(jlora.apply(params, rank=2, targets="attn")) == ["attn/w"]


def test_explicit_regex_naming_a_2d_bias_adapts_it():
  params = {"query": {"kernel": rand((8, 12)), "bias": rand((4, 3), 1)}}
  assert _lora_paths(jlora.apply(params, rank=2, targets="query/bias")) == ["query/bias"]
  assert _lora_paths(jlora.apply(params, rank=2, targets="query")) == ["query/kernel"]


@pytest.mark.parametrize("targets", [r"attn/(w|b)$", ["attn/w", "attn/b"]])
def test_explicit_regex_naming_a_1d_bias(targets):
  params = {"attn": {"w": rand((8, 8)), "b": rand((8,), 1)}}
  with pytest.raises(ValueError, match=r"jlora.apply: targets=.* selects 'attn/b' of shape \(8,\) "
                                       r"\(a bias\).* ndim >= 2.* Narrow the pattern"):
    jlora.apply(params, rank=2, targets=targets)


def test_explicit_regex_naming_only_a_1d_leaf_says_why():
  with pytest.raises(ValueError, match=r"targets='attn/b' matched no kernel.* it selected 'attn/b' "
                                       r"of shape \(8,\) \(a bias\)"):
    jlora.apply({"attn": {"b": rand((8,))}, "q": rand((8, 8), 1)}, rank=2, targets="attn/b")


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.bool_])
def test_explicit_regex_naming_a_1d_integer_leaf(dtype):
  params = {"q_proj": rand((8, 8)), "ids": jnp.ones((4,), dtype)}
  kind = "a boolean" if dtype == jnp.bool_ else "an integer"
  with pytest.raises(TypeError, match=rf"jlora.apply: targets='ids' matched 'ids' of dtype "
                                      rf"{jnp.dtype(dtype).name}; only floating kernels can carry "
                                      rf"LoRA \(this is {kind} array\)"):
    jlora.apply(params, rank=2, targets="ids")


def test_module_regex_skips_integer_vectors_it_does_not_name():
  params = {"block": {"q_proj": rand((8, 8)), "step": jnp.ones((1,), jnp.int32)}}
  assert _lora_paths(jlora.apply(params, rank=2, targets="^block/")) == ["block/q_proj"]


# trainable ------------------------------------------------------------------------------------

@pytest.mark.parametrize("trainable", ["classifer", ["classifer"], re.compile("classifer")])
def test_trainable_matches_nothing(trainable):
  with pytest.raises(ValueError, match=r"jlora.apply: trainable=.* matched no leaf.* Nearest "
                                       r"paths: \[.*'classifier"):
    jlora.apply(PARAMS, rank=2, trainable=trainable)
  with pytest.raises(ValueError, match=r"jlora.apply: trainable=<function .* matched no leaf"):
    jlora.apply(PARAMS, rank=2, trainable=lambda path, leaf: False)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.uint8, jnp.bool_])
def test_trainable_integer_leaf(dtype):
  params = {**PARAMS, "head": {"ids": jnp.ones((4, 4), dtype), "kernel": rand((8, 3))}}
  with pytest.raises(TypeError, match=rf"jlora.apply: trainable='\^head/' matched 'head/ids' of "
                                      rf"dtype {jnp.dtype(dtype).name}.* no gradient.* Narrow the "
                                      rf"pattern"):
    jlora.apply(params, rank=2, trainable="^head/")


def test_trainable_python_int_leaf():
  with pytest.raises(TypeError, match=r"trainable='\^n\$' matched 'n' of type int"):
    jlora.apply({**PARAMS, "n": 3}, rank=2, trainable="^n$")


def test_trainable_complex_and_python_float_leaves():
  params = {**PARAMS, "phase": rand((4,)).astype(jnp.complex64), "temp": 0.5}
  lp = jlora.apply(params, rank=2, trainable="^(phase|temp)$")
  assert _trainable_paths(lp) == ["phase", "temp"]


# regular expressions in every argument -----------------------------------------------------------

@pytest.mark.parametrize("arg", ["rank", "alpha", "layout", "in_axes", "stacked"])
def test_invalid_regex_in_a_mapping(arg):
  value = {"rank": 2, "alpha": 2.0, "layout": "fan", "in_axes": (0,), "stacked": 0}[arg]
  with pytest.raises(ValueError, match=rf"jlora.apply: {arg}=\{{'q_\(': .*\}} has an invalid "
                                       rf"regular expression 'q_\(' as a key: missing \).* "
                                       rf"re.escape"):
    jlora.apply(PARAMS, **{arg: {"q_(": value}})


@pytest.mark.parametrize("arg", ["targets", "trainable", "stacked"])
def test_invalid_regex_in_a_pattern(arg):
  with pytest.raises(ValueError, match=rf"jlora.apply: {arg}=\['q_proj', 'q_\('\] holds an invalid "
                                       rf"regular expression 'q_\(': missing \).* re.escape"):
    jlora.apply(PARAMS, rank=2, **{arg: ["q_proj", "q_("]})


def test_mapping_key_not_a_string():
  with pytest.raises(TypeError, match=r"jlora.apply: the keys of rank= must be regular expressions "
                                      r"\(str\); got 0"):
    jlora.apply(PARAMS, rank={0: 2})


# other arguments -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [jnp.int32, "foo", jnp.bool_])
def test_adapter_dtype_not_floating(dtype):
  with pytest.raises((TypeError, ValueError), match=r"jlora.apply: dtype=.* (is not a floating "
                                                    r"dtype|is not a dtype).* jnp.float32"):
    jlora.apply(PARAMS, rank=2, dtype=dtype)


def test_adapter_dtype_none_is_float32():
  leaf = jlora.apply(PARAMS, rank=2, dtype=None)["block"]["q_proj"]["kernel"]
  assert leaf.a.dtype == jnp.float32 and leaf.b.dtype == jnp.float32


@pytest.mark.parametrize("rslora", ["no", 1, None])
def test_rslora_not_a_bool(rslora):
  with pytest.raises(TypeError, match=r"jlora.apply: rslora=.* must be True or False"):
    jlora.apply(PARAMS, rank=2, rslora=rslora)


@pytest.mark.parametrize("key", [3, np.arange(2), jnp.zeros((2,), jnp.float32),
                                 jax.random.split(jax.random.key(0), 2)])
def test_key_not_a_prng_key(key):
  with pytest.raises(TypeError, match=r"jlora.apply: key=.* is not a PRNG key.* jax.random.key"):
    jlora.apply(PARAMS, rank=2, key=key)


def test_legacy_raw_key_still_works():
  a = jlora.apply(PARAMS, rank=2, key=jax.random.PRNGKey(3))["block"]["q_proj"]["kernel"].a
  assert a.shape == (8, 2) and float(jnp.abs(a).max()) > 0


@pytest.mark.parametrize("in_axes", [(0.5,), "0", (True,), ((0,),)])
def test_in_axes_not_ints(in_axes):
  with pytest.raises(TypeError, match=r"jlora.apply: in_axes=.* for 'query' must be an int or a "
                                      r"tuple of ints"):
    jlora.apply({"query": rand((4, 8, 6))}, rank=2, layout="fan", in_axes=in_axes)


def test_in_axes_numpy_ints_are_python_ints():
  leaf = jlora.apply({"query": rand((4, 8, 6))}, rank=2, layout="fan",
                     in_axes=(np.int64(1),))["query"]
  assert leaf.a_axes == (1,) and all(type(i) is int for i in leaf.a_axes)


def test_in_axes_without_fan_layout():
  with pytest.raises(ValueError, match=r"jlora.apply: in_axes=\(1,\) is used only by "
                                       r"layout='fan'.* layout='fan'"):
    jlora.apply({"query": rand((4, 8, 6))}, rank=2, in_axes=(1,))


def test_merge_and_training_unaffected_by_checks():
  # The checks accept every valid input the old code accepted: same adapters, same merge.
  params = {"layers": {"q_proj": rand((2, 8, 12)), "norm": {"scale": rand((2, 8), 1)}},
            "head": {"kernel": rand((8, 3), 2)}}
  lp = jlora.apply(params, rank=np.int64(2), alpha=np.float32(4.0), stacked={"^layers/": 1},
                   trainable="^head/", key=jax.random.key(1))
  leaf = lp["layers"]["q_proj"]
  assert leaf.stack == 1 and leaf.a.shape == (2, 8, 2) and math.isclose(leaf.scale, 2.0)
  np.testing.assert_array_equal(jlora.merge(lp)["layers"]["q_proj"], params["layers"]["q_proj"])


def test_pattern_matching_part_of_a_leaf_name_does_not_name_it():
  # "head" selects the flat `head_bias` as part of the head, like a module: biases stay out.
  params = {"head": rand((8, 3)), "head_bias": rand((3,), 1), "q_proj": {"kernel": rand((8, 8), 2),
                                                                           "bias": rand((8,), 3)}}
  assert _lora_paths(jlora.apply(params, rank=2, targets="head")) == ["head"]
  assert _lora_paths(jlora.apply(params, rank=2, targets="q_proj/.*")) == ["q_proj/kernel"]
  with pytest.raises(ValueError, match=r"selects 'q_proj/bias' of shape \(8,\) \(a bias\)"):
    jlora.apply(params, rank=2, targets=r"q_proj/(kernel|bias)")


# properties over random trees ---------------------------------------------------------------------
# Abstract leaves (jax.ShapeDtypeStruct) under jax.eval_shape: no compilation per example.

_SETTINGS = dict(deadline=None, derandomize=True, database=None)
# Module names, many holding "embed" or "norm" as a substring (none is an embedding or a norm).
_MODULES = ["attn", "mlp", "block_0", "encoder", "text_embedder", "denormalizer", "patch_embed",
            "normalizer", "embedding_head", "embedder_mlp", "proj", "dense", "qkv", "gate",
            "unnormed", "tokens", "out"]
_QV = ["query", "value", "q_proj", "v_proj", "wq", "wv", "q", "v", "attn_q", "query_dense"]
# Leaves that all-linear and the default leave out, whatever module holds them.
_NOT_KERNELS = {"bias": (6,), "b": (6,), "out_bias": (6,), "embedding": (30, 6),
                "embeddings": (30, 6), "wte": (30, 6), "pos_embed": (5, 6)}
_NORMS = ["norm", "layernorm", "input_layernorm", "LayerNorm_0", "ln_f", "q_norm", "norm1"]


def _sds(shape, dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype)


@st.composite
def _trees(draw):
  """A random tree, depth >= 2: modules holding kernels, biases, tables, norms and ints."""
  tree = {}
  for _ in range(draw(st.integers(1, 4))):
    node = tree.setdefault(draw(st.sampled_from(_MODULES + _QV + _NORMS)), {})
    for j in range(draw(st.integers(1, 3))):
      kind = draw(st.sampled_from(["kernel", "weight", "w", "not_kernel", "int", "sub"]))
      if kind == "not_kernel":
        leaf = draw(st.sampled_from(sorted(_NOT_KERNELS)))
        node[leaf] = _sds(_NOT_KERNELS[leaf])
      elif kind == "int":
        node[f"ids_{j}"] = _sds((4, 4), jnp.int32)
      elif kind == "sub":
        sub = draw(st.sampled_from(_MODULES + _QV))
        node[sub] = {"kernel": _sds(draw(st.sampled_from([(6, 8), (8, 6), (4, 6, 8)])))}
      else:
        node[kind] = _sds(draw(st.sampled_from([(6, 8), (8, 6), (4, 6, 8)])))
  return tree


def _adapted(tree, **kw):
  return _lora_paths(jax.eval_shape(lambda p: jlora.apply(p, rank=2, **kw), tree))


def _leaves(tree):
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return [("/".join(str(k.key) for k in p), x) for p, x in flat]


def _safe(f):
  """`f()`'s adapted paths, or None where it raises "matched no kernel" (nothing to adapt)."""
  try:
    return f()
  except ValueError as e:
    assert "matched no kernel" in str(e), str(e)
    return None


@settings(max_examples=60, **_SETTINGS)
@given(_trees(), st.sampled_from(["text_embedder", "denormalizer", "patch_embed", "embed",
                                  "norm", "layernorm", "wte", "embeddings", "block"]))
def test_presets_do_not_depend_on_the_modules_above_the_leaf(tree, prefix):
  # A module above the leaf's own module never decides: prefixing the whole tree changes nothing.
  for targets in (None, "all-linear"):
    plain = _safe(lambda: _adapted(tree, targets=targets))
    nested = _safe(lambda: _adapted({prefix: tree}, targets=targets))
    assert nested == (None if plain is None else [f"{prefix}/{p}" for p in plain])


@settings(max_examples=60, **_SETTINGS)
@given(_trees())
def test_presets_adapt_every_kernel_and_nothing_else(tree):
  kernels = [p for p, x in _leaves(tree)
             if x.dtype == jnp.float32 and len(x.shape) >= 2
             and p.split("/")[-1] in ("kernel", "weight", "w") and p.split("/")[-2] not in _NORMS]
  qv = [p for p in kernels if set(p.split("/")[:-1]) & set(_QV)]
  everything = _safe(lambda: _adapted(tree, targets="all-linear"))
  assert everything == (sorted(kernels) or None)
  assert _safe(lambda: _adapted(tree)) == (sorted(qv) or None)


@settings(max_examples=40, **_SETTINGS)
@given(_trees(), st.data())
def test_a_pattern_naming_one_leaf_adapts_it_or_says_why(tree, data):
  path, leaf = data.draw(st.sampled_from(_leaves(tree)))
  named = "^" + re.escape(path) + "$"
  if leaf.dtype != jnp.float32:
    with pytest.raises(TypeError, match=rf"matched {re.escape(repr(path))} of dtype int32"):
      _adapted(tree, targets=named)
  elif len(leaf.shape) < 2:
    with pytest.raises(ValueError, match=rf"it selected {re.escape(repr(path))} of shape"):
      _adapted(tree, targets=named)
  else:  # a 2-D bias, norm or embedding table too: the pattern names it
    assert _adapted(tree, targets=named) == [path]


def test_pattern_naming_a_leaf_that_is_not_an_array():
  params = {"q_proj": rand((8, 8)), "temperature": 0.5}
  with pytest.raises(ValueError, match=r"the targets callable selected 'temperature', a float "
                                       r"\(not an array\).* Return False for it"):
    jlora.apply(params, rank=2, targets=lambda path, leaf: True)
  with pytest.raises(ValueError, match=r"targets='q_proj\|temperature' selects 'temperature', a "
                                       r"float \(not an array\); LoRA needs a kernel"):
    jlora.apply(params, rank=2, targets="q_proj|temperature")
