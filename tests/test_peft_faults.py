"""PEFT interop faults (issue 15): adapters whose weights jlora would read differently from PEFT.

Every adapter here is written by hand (adapter_config.json + adapter_model.safetensors) against a
tiny random tree laid out like `recipes.models.llama`, so no torch is needed. An adapter either
imports with the weights PEFT gives it, or is refused with a message naming the fix.
"""

import functools
import json
import math
import os
import re
import types

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import jlora
from recipes.models import llama
from tests.helpers import randomize_b

# This file's trees are laid out as recipes.models.llama's: its key map, unless a test gives one.
llama_hf = types.SimpleNamespace(**{
    f.__name__: functools.partial(f, key_map=llama.peft_key_map)
    for f in (jlora.hf.export_peft, jlora.hf.import_peft, jlora.hf.export_merged)})

L, D, DV = 2, 8, 4
MODS = {"q": ("self_attn", "q_proj", D, D), "v": ("self_attn", "v_proj", D, DV),
        "up": ("mlp", "up_proj", D, 12)}
PRE = "base_model.model."


def _params(seed=0):
  rng = np.random.default_rng(seed)
  n = lambda *s: rng.standard_normal(s).astype(np.float32)
  layers = {"self_attn": {}, "mlp": {}}
  for grp, m, i, o in MODS.values():
    layers[grp][m] = {"kernel": n(L, i, o)}
  layers["input_layernorm"] = {"scale": 1 + 0.1 * n(L, D)}
  return {"embed_tokens": {"embedding": n(16, D)}, "layers": layers, "norm": {"scale": n(D)}}


def _module(key, layer):
  grp, m, _, _ = MODS[key]
  return f"model.layers.{layer}.{grp}.{m}"


def _tensors(r=2, mods=("q", "v"), layers=range(L), seed=1, name=None):
  """Random lora_A (r, in) / lora_B (out, r) per module; `name` puts an adapter name in keys."""
  rng = np.random.default_rng(seed)
  mid = "" if name is None else f".{name}"
  out = {}
  for k in mods:
    _, _, i, o = MODS[k]
    for layer in layers:
      base = f"{PRE}{_module(k, layer)}"
      out[f"{base}.lora_A{mid}.weight"] = rng.standard_normal((r, i)).astype(np.float32)
      out[f"{base}.lora_B{mid}.weight"] = rng.standard_normal((o, r)).astype(np.float32)
  return out


def _config(r=2, alpha=6, mods=("q", "v"), **kw):
  return {"peft_type": "LORA", "r": r, "lora_alpha": alpha,
          "target_modules": [MODS[k][1] for k in mods], "bias": "none", "use_rslora": False,
          "init_lora_weights": True, **kw}


def _write(d, cfg, tensors):
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, "adapter_config.json"), "w", encoding="utf-8") as f:
    f.write(cfg if isinstance(cfg, str) else json.dumps(cfg))
  save_file(tensors, os.path.join(d, "adapter_model.safetensors"))
  return d


def _peft_weight(params, tensors, key, layer, scale, name=None):
  """The weight PEFT computes for a module, W + scale * B @ A, as an (in, out) kernel."""
  grp, m, _, _ = MODS[key]
  mid = "" if name is None else f".{name}"
  base = f"{PRE}{_module(key, layer)}"
  A, B = tensors[f"{base}.lora_A{mid}.weight"], tensors[f"{base}.lora_B{mid}.weight"]
  return params["layers"][grp][m]["kernel"][layer] + scale * (B @ A).T


def _check_weights(tree, params, tensors, scale, mods=("q", "v"), name=None):
  merged = jlora.merge(tree)
  for k in mods:
    grp, m, _, _ = MODS[k]
    for layer in range(L):
      np.testing.assert_allclose(merged["layers"][grp][m]["kernel"][layer],
                                 _peft_weight(params, tensors, k, layer, scale, name), rtol=1e-5,
                                 atol=1e-5, err_msg=f"{k} {layer}")


# ----------------------------------------------------------------------------- init_lora_weights


@pytest.mark.parametrize("init", ["pissa_niter_4", "corda", "lora_ga"])
def test_init_that_changes_the_base_is_refused(tmp_path, init):
  # PEFT subtracts the adapter's initial product from the base weights for these, so reading the
  # factors onto the untouched base gives other weights than PEFT's ('pissa' and 'olora' jlora
  # rebuilds: tests/test_peft_variants.py).
  d = _write(tmp_path / "a", _config(init_lora_weights=init), _tensors())
  with pytest.raises(ValueError, match=rf"init_lora_weights='{init}'.*base weights.*"
                                       r"path_initial_model_for_weight_conversion"):
    llama_hf.import_peft(d, _params())


def test_loftq_is_refused_with_its_own_fix(tmp_path):
  d = _write(tmp_path / "a", _config(init_lora_weights="loftq", loftq_config={"loftq_bits": 4}),
             _tensors())
  with pytest.raises(ValueError, match="init_lora_weights='loftq'.*quantized backbone.*"
                                       "init_lora_weights.*true"):
    llama_hf.import_peft(d, _params())


@pytest.mark.parametrize("init", [True, False, "gaussian", "eva", "orthogonal", "mica", None])
def test_init_that_keeps_the_base_imports(tmp_path, init):
  cfg = _config(r=2, alpha=6, init_lora_weights=init)
  if init is None:
    del cfg["init_lora_weights"]  # PEFT's default, True
  t = _tensors(seed=3)
  p = _params()
  tree = llama_hf.import_peft(_write(tmp_path / "a", cfg, t), p)
  _check_weights(tree, p, t, 6 / 2)


@pytest.mark.parametrize("init", ["Pissa_fast", "bogus", 3, [True]])
def test_unknown_init_is_refused(tmp_path, init):
  d = _write(tmp_path / "a", _config(init_lora_weights=init), _tensors())
  with pytest.raises(ValueError, match="init_lora_weights=.*PEFT documents"):
    llama_hf.import_peft(d, _params())


# ----------------------------------------------------------------------------- r, alpha, patterns


def test_config_rank_must_match_the_tensors(tmp_path):
  p = _params()
  d = _write(tmp_path / "r", _config(r=3), _tensors(r=2))
  with pytest.raises(ValueError, match=r"rank 3 for 'model\.layers\.0\.self_attn\.q_proj' \(r\)"
                                       r".*lora_A .2, 8. and lora_B .8, 2. have rank 2"):
    llama_hf.import_peft(d, p)
  d = _write(tmp_path / "p", _config(r=2, rank_pattern={"v_proj": 4}), _tensors(r=2))
  with pytest.raises(ValueError, match=r"rank 4 for 'model\.layers\.0\.self_attn\.v_proj' "
                                       r"\(rank_pattern\['v_proj'\]\).*have rank 2"):
    llama_hf.import_peft(d, p)
  # r missing: PEFT's default, 8
  cfg = _config(r=2)
  del cfg["r"]
  with pytest.raises(ValueError, match=r"rank 8 .*\(r, PEFT's default\)"):
    llama_hf.import_peft(_write(tmp_path / "m", cfg, _tensors(r=2)), p)
  # a rank_pattern that does give the tensors' rank imports, with its alpha_pattern
  t = {**_tensors(r=2, mods=("q",)), **_tensors(r=4, mods=("v",), seed=5)}
  cfg = _config(r=2, alpha=6, rank_pattern={"v_proj": 4}, alpha_pattern={"v_proj": 2})
  tree = llama_hf.import_peft(_write(tmp_path / "ok", cfg, t), p)
  _check_weights(tree, p, t, 6 / 2, mods=("q",))
  _check_weights(tree, p, t, 2 / 4, mods=("v",))


@pytest.mark.parametrize("field,value,match", [
    ("lora_alpha", float("nan"), "lora_alpha=nan.*finite number"),
    ("lora_alpha", float("inf"), "lora_alpha=inf.*finite number"),
    ("lora_alpha", "8", "lora_alpha='8'.*finite number"),
    ("lora_alpha", True, "lora_alpha=True.*finite number"),
    ("alpha_pattern", {"q_proj": float("nan")}, r"alpha_pattern\['q_proj'\]=nan.*finite"),
    ("alpha_pattern", ["q_proj", 2], "alpha_pattern=.*a dict"),
    ("r", 0, "r=0.*positive int"),
    ("r", 2.0, "r=2.0.*positive int"),
    ("r", "2", "r='2'.*positive int"),
    ("rank_pattern", {"q_proj": -2}, r"rank_pattern\['q_proj'\]=-2.*positive int"),
    ("rank_pattern", {"q_proj(": 2}, r"rank_pattern key 'q_proj\(' is not a valid regex"),
    ("use_rslora", "false", "use_rslora='false'.*true or false"),
    ("bias", "some", "bias='some'.*'none', 'all' or 'lora_only'"),
    ("target_modules", 3, "target_modules=3.*a list of names or a regex"),
    ("target_modules", "q_proj(", "target_modules 'q_proj\\(' is not a valid regex"),
    ("layers_to_transform", "0", "layers_to_transform='0'.*int or a list of ints"),
])
def test_config_values_are_checked(tmp_path, field, value, match):
  d = _write(tmp_path / "a", _config(**{field: value}), _tensors())
  with pytest.raises(ValueError, match=f"jlora.hf.import_peft: .*adapter_config.json.*{match}"):
    llama_hf.import_peft(d, _params())


@pytest.mark.parametrize("extra,match", [
    ({"target_modules": ".*q_proj", "layers_to_transform": [0]},
     "layers_to_transform=.0. with the regex target_modules.*unless target_modules is a list"),
    ({"target_modules": "all-linear", "layers_pattern": "layers"},
     "layers_pattern='layers' with the regex target_modules"),
    ({"layers_pattern": "layers"}, "layers_pattern='layers' and no layers_to_transform"),
])
def test_config_combinations_peft_refuses_are_refused(tmp_path, extra, match):
  d = _write(tmp_path / "a", _config(**extra), _tensors())
  with pytest.raises(ValueError, match=f"jlora.hf.import_peft: .*adapter_config.json.*{match}"):
    llama_hf.import_peft(d, _params())


def test_nan_in_the_json_text_is_refused(tmp_path):
  # json.load reads the non-standard NaN token; the value must still be refused
  text = json.dumps(_config(alpha=6)).replace('"lora_alpha": 6', '"lora_alpha": NaN')
  assert "NaN" in text
  with pytest.raises(ValueError, match="lora_alpha=nan.*finite number"):
    llama_hf.import_peft(_write(tmp_path / "a", text, _tensors()), _params())


# ----------------------------------------------------------------------------- adapter names


def test_one_adapter_name_in_the_keys_imports(tmp_path):
  p = _params()
  t = _tensors(name="default", seed=4)
  tree = llama_hf.import_peft(_write(tmp_path / "a", _config(), t), p)
  _check_weights(tree, p, t, 3.0, name="default")


def test_two_adapter_names_for_one_module_are_refused_or_picked(tmp_path):
  p = _params()
  t1, t2 = _tensors(name="default", seed=4), _tensors(name="other", seed=5)
  d = _write(tmp_path / "a", _config(), {**t1, **t2})
  with pytest.raises(ValueError, match=r"several adapters \('default', 'other':.*"
                                       r"adapter_name='default'"):
    llama_hf.import_peft(d, p)
  _check_weights(llama_hf.import_peft(d, p, adapter_name="other"), p, t2, 3.0, name="other")
  _check_weights(llama_hf.import_peft(d, p, adapter_name="default"), p, t1, 3.0, name="default")
  with pytest.raises(ValueError, match=r"no tensor of adapter 'nope'.*'default', 'other'"):
    llama_hf.import_peft(d, p, adapter_name="nope")
  # unnamed keys (PEFT's own format) beside named ones: also two adapters
  t0 = _tensors(seed=6)
  d = _write(tmp_path / "b", _config(), {**t0, **t2})
  with pytest.raises(ValueError, match=r"several adapters \(\(no name\), 'other':"):
    llama_hf.import_peft(d, p)
  _check_weights(llama_hf.import_peft(d, p, adapter_name="other"), p, t2, 3.0, name="other")
  with pytest.raises(TypeError, match="adapter_name must be a str or None"):
    llama_hf.import_peft(d, p, adapter_name=1)


def test_one_module_reached_from_two_leaves_is_refused(tmp_path):
  # a key map that gives two leaves of params the same Hugging Face name: the last one won
  p = _params()
  p["layers"]["self_attn"]["k_proj"] = {"kernel": p["layers"]["self_attn"]["q_proj"]["kernel"] + 1}
  km = lambda s: (("model.layers.{}.self_attn.q_proj.weight", True) if s.endswith("k_proj/kernel")
                  else llama.peft_key_map(s))
  d = _write(tmp_path / "a", _config(mods=("q",)), _tensors(mods=("q",)))
  with pytest.raises(ValueError, match=r"maps both 'layers/self_attn/k_proj/kernel' and "
                                       r"'layers/self_attn/q_proj/kernel' to "
                                       r"'model\.layers\.0\.self_attn\.q_proj'"):
    llama_hf.import_peft(d, p, key_map=km)


# ----------------------------------------------------------------------------- other config fields


@pytest.mark.parametrize("field,value,match", [
    ("lora_bias", True, "lora_bias.*bias"),
    ("fan_in_fan_out", True, "fan_in_fan_out"),
    ("alora_invocation_tokens", [3, 4], "alora_invocation_tokens.*Activated LoRA"),
    ("use_qalora", True, "use_qalora.*QA-LoRA"),
    ("layer_replication", [[0, 2], [1, 2]], "layer_replication.*layers"),
    ("target_parameters", ["experts.gate_up_proj"], "target_parameters.*nn.Parameter"),
    ("trainable_token_indices", [1, 2], "trainable_token_indices.*embedding rows"),
    ("kasa_config", {"x": 1}, "kasa_config.*base weights"),
    ("use_bdlora", {"nblocks": 2}, "use_bdlora.*block-diagonal"),
    ("arrow_config", {"top_k": 2}, "arrow_config.*routes"),
    ("monteclora_config", {"n": 2}, "monteclora_config"),
    ("ensure_weight_tying", True, "ensure_weight_tying.*tie"),
    ("some_future_option", 1, "'some_future_option'.*jlora does not know"),
])
def test_config_fields_that_change_the_weights_are_refused(tmp_path, field, value, match):
  d = _write(tmp_path / "a", _config(**{field: value}), _tensors())
  with pytest.raises(ValueError, match=f"jlora.hf.import_peft: .*adapter_config.json.*{match}"):
    llama_hf.import_peft(d, _params())


def test_config_fields_that_keep_the_weights_import(tmp_path):
  p = _params()
  t = _tensors(seed=7)
  cfg = _config(alpha=5, bias="all", lora_dropout=0.1, inference_mode=False, modules_to_save=None,
                megatron_core="megatron.core", loftq_config={}, eva_config=None,
                qalora_group_size=16, use_dora=False, fan_in_fan_out=False, task_type="CAUSAL_LM",
                base_model_name_or_path="tiny", revision=None, layers_pattern=None,
                some_future_option=None, another_one=[], runtime_config={})
  _check_weights(llama_hf.import_peft(_write(tmp_path / "a", cfg, t), p), p, t, 5 / 2)
  # rslora: the scale is alpha / sqrt(r)
  t = _tensors(r=4, seed=8)
  tree = llama_hf.import_peft(_write(tmp_path / "b", _config(r=4, alpha=6, use_rslora=True), t), p)
  assert tree["layers"]["self_attn"]["q_proj"]["kernel"].rslora
  _check_weights(tree, p, t, 6 / math.sqrt(4))


@pytest.mark.parametrize("extra,match", [
    ({"target_modules": ["k_proj", "v_proj"]}, "target_modules"),
    ({"target_modules": r".*\.v_proj"}, "target_modules"),
    ({"exclude_modules": ["q_proj"]}, "exclude_modules"),
    ({"exclude_modules": r".*layers\.1\.self_attn\.q_proj"}, "exclude_modules"),
    ({"modules_to_save": ["q_proj"]}, "modules_to_save"),
    ({"layers_to_transform": [1]}, "layers_to_transform"),
    ({"layers_to_transform": 0, "layers_pattern": "layers"}, "layers_to_transform"),
    ({"layers_to_transform": [0, 1], "layers_pattern": ["blocks"]}, "layers_to_transform"),
    ({"target_modules": "all-linear", "modules_to_save": ["v_proj"]}, "modules_to_save"),
])
def test_tensors_of_modules_the_config_does_not_select_are_refused(tmp_path, extra, match):
  # PEFT builds LoRA layers only where the config selects a module and drops the other tensors
  # without a word, so their weights would differ from jlora's.
  d = _write(tmp_path / "a", _config(**extra), _tensors())
  with pytest.raises(ValueError, match=rf"holds lora_A/lora_B for 'model\.layers\.\d\.self_attn\."
                                       rf"[qv]_proj', a module its config.*{match}"):
    llama_hf.import_peft(d, _params())


@pytest.mark.parametrize("extra,layers", [
    ({"target_modules": r"model\.layers\.\d+\.self_attn\.(q|v)_proj"}, range(L)),
    ({"target_modules": "all-linear"}, range(L)),
    ({"target_modules": "ALL-LINEAR"}, range(L)),
    ({"target_modules": ["q_proj", "v_proj"], "layers_to_transform": [1]}, [1]),
    ({"target_modules": ["q_proj", "v_proj"], "layers_to_transform": 0,
      "layers_pattern": "layers"}, [0]),
    ({"target_modules": None}, range(L)),
    ({"exclude_modules": ["k_proj"], "modules_to_save": ["lm_head"]}, range(L)),
])
def test_tensors_of_selected_modules_import(tmp_path, extra, layers):
  p = _params()
  t = _tensors(layers=layers, seed=9)
  tree = llama_hf.import_peft(_write(tmp_path / "a", _config(**extra), t), p)
  merged = jlora.merge(tree)
  for k in ("q", "v"):
    grp, m, _, _ = MODS[k]
    for layer in range(L):
      want = (_peft_weight(p, t, k, layer, 3.0) if layer in layers
              else p["layers"][grp][m]["kernel"][layer])
      np.testing.assert_allclose(merged["layers"][grp][m]["kernel"][layer], want, rtol=1e-5,
                                 atol=1e-5)


@pytest.mark.parametrize("key,match", [
    ("model.lm_head.weight", "modules_to_save"),
    ("model.layers.0.self_attn.q_proj.bias", "bias"),
    ("model.embed_tokens.lora_embedding_A", "embedding"),
    ("model.embed_tokens.token_adapter.trainable_tokens_delta", "trainable tokens"),
])
def test_tensors_jlora_would_ignore_are_refused(tmp_path, key, match):
  t = {**_tensors(), PRE + key: np.ones((2, 2), np.float32)}
  with pytest.raises(ValueError, match=rf"'{PRE + key}', which is not.*{match}"):
    llama_hf.import_peft(_write(tmp_path / "a", _config(), t), _params())


def test_dora_magnitude_without_use_dora_is_refused(tmp_path):
  t = {**_tensors(), PRE + "model.layers.0.self_attn.q_proj.lora_magnitude_vector":
       np.ones((8,), np.float32)}
  with pytest.raises(ValueError, match="lora_magnitude_vector for 'model.layers.0.self_attn.q_proj'"
                                       ".*does not set use_dora=true"):
    llama_hf.import_peft(_write(tmp_path / "a", _config(), t), _params())
  bad = {**t, PRE + "model.layers.0.self_attn.q_proj.lora_magnitude_vector":
         np.ones((3,), np.float32)}
  with pytest.raises(ValueError,
                     match="lora_magnitude_vector of shape \\(3,\\).*expected \\(8,\\)"):
    llama_hf.import_peft(_write(tmp_path / "b", {**_config(), "use_dora": True}, {
        k: v for k, v in bad.items() if ".layers.0.self_attn.q_proj." in k}), _params())


@pytest.mark.parametrize("shape_a,shape_b", [((), (D, 2)), ((2,), (D, 2)), ((2, D, 1), (D, 2)),
                                             ((2, D), (D, 3)), ((2, D + 1), (D, 2))])
def test_tensor_shapes_that_do_not_fit_are_refused(tmp_path, shape_a, shape_b):
  t = _tensors(mods=("q",))
  rng = np.random.default_rng(2)
  t[f"{PRE}{_module('q', 1)}.lora_A.weight"] = rng.standard_normal(shape_a).astype(np.float32)
  t[f"{PRE}{_module('q', 1)}.lora_B.weight"] = rng.standard_normal(shape_b).astype(np.float32)
  with pytest.raises(ValueError, match=r"'model\.layers\.1\.self_attn\.q_proj' has lora_A "
                                       r".*which do not fit the kernel \(8, 8\)"):
    llama_hf.import_peft(_write(tmp_path / "a", _config(mods=("q",)), t), _params())


# ----------------------------------------------------------------------------- export


def _nonfinite_alpha_tree(alpha):
  """A tree with one LoRA leaf of alpha `alpha`, built around any check LoRA's constructor makes.

  Such a leaf reaches export_peft from trees built before alpha was checked (an old pickle, a
  `dataclasses.replace`), so export must refuse it itself.
  """
  attn = {"q_proj": {"kernel": np.ones((L, D, D), np.float32)},
          "v_proj": {"kernel": np.ones((L, D, DV), np.float32)}}
  t = jlora.apply({"layers": {"self_attn": attn}}, rank=2, stacked="^layers/",
                  key=jax.random.key(0))
  leaf = t["layers"]["self_attn"]["v_proj"]["kernel"]
  bad = object.__new__(jlora.LoRA)
  for f in ("w", "a", "b", "a_axes", "stack", "rslora"):
    object.__setattr__(bad, f, getattr(leaf, f))
  object.__setattr__(bad, "alpha", alpha)
  t["layers"]["self_attn"]["v_proj"]["kernel"] = bad
  return t


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf")])
def test_export_refuses_a_nonfinite_alpha(tmp_path, alpha):
  with pytest.raises(ValueError, match=r"jlora.hf.export_peft: the LoRA leaf at "
                                       r"'layers/self_attn/v_proj/kernel' has alpha "
                                       r"(nan|inf|-inf).*finite"):
    llama_hf.export_peft(tmp_path / "a", _nonfinite_alpha_tree(alpha))
  assert not os.path.exists(tmp_path / "a")


def test_export_writes_strict_json(tmp_path):
  def refuse(token):
    raise AssertionError(f"non-standard JSON token {token}")

  t = jlora.apply(_params(), rank={"q_proj": 4, ".*": 2}, alpha={"v_proj": 0.5, ".*": 3.0},
                  targets=["q_proj", "v_proj"], stacked="^layers/", key=jax.random.key(1))
  d = llama_hf.export_peft(tmp_path / "a", t)
  with open(os.path.join(d, "adapter_config.json"), encoding="utf-8") as f:
    cfg = json.loads(f.read(), parse_constant=refuse)
  assert cfg["lora_alpha"] == 3 and set(cfg["alpha_pattern"].values()) == {0.5}


def test_export_patterns_select_exactly_their_module(tmp_path):
  # PEFT matches a rank/alpha pattern against any module name that *ends* in it, so an unanchored
  # pattern for 'enc.q' also gave its alpha to 'dec.enc.q'.
  rng = np.random.default_rng(0)
  names = {"x": "enc.q", "y": "dec.enc.q", "z": "m0", "w": "m1"}
  params = {k: rng.standard_normal((6, 6)).astype(np.float32) for k in names}
  km = lambda p: (f"{names[p]}.weight", True)
  t = randomize_b(jlora.apply(params, rank={"x": 4, ".*": 2}, alpha={"x": 2.0, ".*": 8.0},
                              targets=".*", key=jax.random.key(2)))
  d = llama_hf.export_peft(tmp_path / "a", t, key_map=km)
  back = llama_hf.import_peft(d, params, key_map=km)
  for k in names:
    assert (back[k].alpha, back[k].rank) == (t[k].alpha, t[k].rank), k
  np.testing.assert_allclose(jlora.merge(back)["y"], jlora.merge(t)["y"], rtol=1e-6)
  # the patterns PEFT reads select one module each
  with open(os.path.join(d, "adapter_config.json"), encoding="utf-8") as f:
    cfg = json.load(f)
  for pattern in (*cfg["rank_pattern"], *cfg["alpha_pattern"]):  # PEFT's get_pattern_key
    assert [m for m in names.values() if re.match(rf"(.*\.)?({pattern})$", m)] == ["enc.q"]
  assert load_file(os.path.join(d, "adapter_model.safetensors"))
