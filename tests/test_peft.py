"""PEFT interop: export/import of LoRA adapters and merged safetensors, checked against peft."""

import functools
import json
import os
import types

import jax
import jax.numpy as jnp
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

# A tiny Llama: 2 layers, D=32, 4 query / 2 kv heads of 8, F=48, V=64.
L, D, HQ, HKV, HD, F, V = 2, 32, 4, 2, 8, 48, 64
PROJ = {"self_attn": {"q_proj": (D, HQ * HD), "k_proj": (D, HKV * HD), "v_proj": (D, HKV * HD),
                      "o_proj": (HQ * HD, D)},
        "mlp": {"gate_proj": (D, F), "up_proj": (D, F), "down_proj": (F, D)}}


def _llama_params(seed=0):
  rng = np.random.default_rng(seed)
  n = lambda *s: jnp.asarray(rng.standard_normal(s).astype(np.float32) * 0.2)
  layers = {grp: {m: {"kernel": n(L, *s)} for m, s in mods.items()} for grp, mods in PROJ.items()}
  layers["input_layernorm"] = {"scale": 1.0 + n(L, D)}
  layers["post_attention_layernorm"] = {"scale": 1.0 + n(L, D)}
  return {"embed_tokens": {"embedding": n(V, D)}, "layers": layers, "norm": {"scale": 1 + n(D)}}


def _lora_tree(**kw):
  kw = {"rank": {"q_proj": 4, ".*": 2}, "alpha": {"v_proj": 3.0, ".*": 8.0},
        "targets": "all-linear", "stacked": "^layers/", **kw}
  return randomize_b(jlora.apply(_llama_params(), key=jax.random.key(3), **kw))


def _json(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _bytes(path):
  with open(path, "rb") as f:
    return f.read()


def _write(path, data):
  with open(path, "wb") as f:
    f.write(data)


# ----------------------------------------------------------------------------- key map


def test_llama_key_map():
  km = llama.peft_key_map
  assert km("layers/self_attn/o_proj/kernel") == ("model.layers.{}.self_attn.o_proj.weight", True)
  assert km("layers/post_attention_layernorm/scale") == (
      "model.layers.{}.post_attention_layernorm.weight", False)
  assert km("layers/1/mlp/up_proj/kernel") == ("model.layers.1.mlp.up_proj.weight", True)
  assert km("norm/scale") == ("model.norm.weight", False)
  assert km("embed_tokens/embedding") == ("model.embed_tokens.weight", False)
  assert km("lm_head/kernel") == ("lm_head.weight", True)
  assert km("kernel") is None and km("rope/cos") is None and km("head/extra/kernel") is None


# ------------------------------------------------------------------------ round trip (no torch)


def test_export_then_import_round_trip(tmp_path):
  t = _lora_tree()
  d = llama_hf.export_peft(tmp_path / "adapter", t, base_model_name_or_path="tiny")
  cfg = _json(os.path.join(d, "adapter_config.json"))
  assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and cfg["lora_alpha"] == 8
  assert cfg["base_model_name_or_path"] == "tiny" and cfg["use_rslora"] is False
  assert cfg["rank_pattern"] == {r"^model\.layers\.0\.self_attn\.q_proj": 4,
                                 r"^model\.layers\.1\.self_attn\.q_proj": 4}
  assert set(cfg["alpha_pattern"].values()) == {3}
  assert len(cfg["target_modules"]) == 2 * 7
  w = load_file(os.path.join(d, "adapter_model.safetensors"))
  qa = w["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"]
  qb = w["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
  q = t["layers"]["self_attn"]["q_proj"]["kernel"]
  np.testing.assert_array_equal(qa, np.asarray(q.a[1]).T)  # (r, in)
  np.testing.assert_array_equal(qb, np.asarray(q.b[1]).T)  # (out, r)
  assert qa.shape == (4, D) and qb.shape == (HQ * HD, 4)

  back = llama_hf.import_peft(d, _llama_params())
  for p, x in jax.tree_util.tree_flatten_with_path(t, is_leaf=jlora.is_lora)[0]:
    y = back
    for k in p:
      y = y[k.key]
    if isinstance(x, jlora.LoRA):
      assert (y.alpha, y.a_axes, y.stack, y.rslora) == (x.alpha, x.a_axes, x.stack, x.rslora)
      np.testing.assert_array_equal(y.a, x.a)
      np.testing.assert_array_equal(y.b, x.b)
    else:
      np.testing.assert_array_equal(y, x)


def test_rslora_and_bfloat16_round_trip(tmp_path):
  t = _lora_tree(rank=2, alpha=4.0, rslora=True, targets=["q_proj", "v_proj"], dtype=jnp.bfloat16)
  d = llama_hf.export_peft(tmp_path / "a", t)
  cfg = _json(os.path.join(d, "adapter_config.json"))
  assert cfg["use_rslora"] is True and cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
  assert load_file(os.path.join(d, "adapter_model.safetensors"))[
      "base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].dtype.name == "bfloat16"
  back = llama_hf.import_peft(d, _llama_params(), dtype=jnp.bfloat16)
  v = back["layers"]["self_attn"]["v_proj"]["kernel"]
  assert v.rslora and v.a.dtype == jnp.bfloat16
  np.testing.assert_array_equal(jlora.merge(back)["layers"]["self_attn"]["v_proj"]["kernel"],
                                jlora.merge(t)["layers"]["self_attn"]["v_proj"]["kernel"])


def test_partial_layers_get_zero_adapters(tmp_path):
  t = _lora_tree(rank=2, targets="q_proj")
  d = llama_hf.export_peft(tmp_path / "a", t)
  f = os.path.join(d, "adapter_model.safetensors")
  w = {k: v for k, v in load_file(f).items() if ".layers.1." not in k}
  save_file(w, f)
  q = llama_hf.import_peft(d, _llama_params())["layers"]["self_attn"]["q_proj"]["kernel"]
  np.testing.assert_array_equal(q.b[0], t["layers"]["self_attn"]["q_proj"]["kernel"].b[0])
  assert not np.any(q.a[1]) and not np.any(q.b[1])


def test_export_merged_names_and_values(tmp_path):
  t = _lora_tree()
  f = llama_hf.export_merged(tmp_path / "m" / "model.safetensors", t, dtype=jnp.bfloat16)
  w = load_file(f)
  assert len(w) == 1 + 1 + L * 9
  merged = jlora.merge(t)
  want = np.asarray(merged["layers"]["mlp"]["down_proj"]["kernel"][1]).T.astype(jnp.bfloat16)
  np.testing.assert_array_equal(w["model.layers.1.mlp.down_proj.weight"], want)
  assert w["model.layers.1.mlp.down_proj.weight"].shape == (D, F)
  np.testing.assert_array_equal(w["model.layers.0.input_layernorm.weight"],
                                np.asarray(merged["layers"]["input_layernorm"]["scale"][0],
                                           jnp.bfloat16))
  with pytest.raises(FileExistsError, match="overwrite=True"):
    llama_hf.export_merged(f, t)
  llama_hf.export_merged(f, jlora.base(t), overwrite=True)
  np.testing.assert_array_equal(load_file(f)["model.norm.weight"], t["norm"]["scale"])
  assert os.listdir(tmp_path / "m") == ["model.safetensors"]


def test_user_key_map_for_another_model(tmp_path):
  params = {"blocks": [{"attn": {"wq": jnp.asarray(np.random.default_rng(0).standard_normal(
      (6, 10)), jnp.float32)}} for _ in range(2)]}
  t = randomize_b(jlora.apply(params, rank=2, targets="wq"))
  km = lambda p: (f"encoder.layer.{p.split('/')[1]}.attention.query.weight", True)
  d = llama_hf.export_peft(tmp_path / "a", t, key_map=km)
  keys = sorted(load_file(os.path.join(d, "adapter_model.safetensors")))
  assert keys[0] == "base_model.model.encoder.layer.0.attention.query.lora_A.weight"
  back = llama_hf.import_peft(d, params, key_map=km)
  np.testing.assert_array_equal(back["blocks"][1]["attn"]["wq"].b, t["blocks"][1]["attn"]["wq"].b)


# ----------------------------------------------------------------------------- bad input


def test_export_errors(tmp_path):
  p = _llama_params()
  with pytest.raises(ValueError, match="no jlora.LoRA leaf"):
    llama_hf.export_peft(tmp_path / "x", p)
  t = jlora.apply(p, rank=2, targets="q_proj", stacked="^layers/", trainable="^norm/scale")
  with pytest.raises(ValueError, match="'norm/scale' is a jlora.Trainable.*export_merged"):
    llama_hf.export_peft(tmp_path / "x", t)
  nd = {"layers": {"self_attn": {"q_proj": {"kernel": jnp.ones((2, 8, 2, 4))}}}}
  with pytest.raises(ValueError, match="'layers/self_attn/q_proj/kernel' adapts a 3-d kernel"):
    llama_hf.export_peft(tmp_path / "x", jlora.apply(nd, rank=2, stacked="^layers/"))
  with pytest.raises(ValueError, match="no Hugging Face name for the LoRA leaf at 'foo/q_proj'"):
    llama_hf.export_peft(tmp_path / "x", jlora.apply({"foo": {"q_proj": jnp.ones((4, 6))}}, rank=2))
  unstacked = jlora.apply({"layers": {"self_attn": {"q_proj": {"kernel": jnp.ones((8, 8))}}}},
                          rank=2)
  with pytest.raises(ValueError, match="0 stack axes but .* has 1 '\\{\\}' fields"):
    llama_hf.export_peft(tmp_path / "x", unstacked)
  t2 = jlora.apply(p, rank=2, targets="q_proj", stacked="^layers/")
  with pytest.raises(ValueError, match="transpose=False.*nn.Linear"):
    llama_hf.export_peft(tmp_path / "x", t2, key_map=lambda s: ("model.layers.{}.q.weight", False)
                   if "q_proj" in s else None)
  with pytest.raises(ValueError, match="maps two leaves to 'model.layers.0.q'"):
    llama_hf.export_peft(tmp_path / "x", jlora.apply(p, rank=2, targets="q_proj|k_proj",
                                               stacked="^layers/"),
                   key_map=lambda s: ("model.layers.{}.q.weight", True))
  mixed = jax.tree.map(lambda x: x, jlora.apply(p, rank=2, targets="q_proj", stacked="^layers/"),
                       is_leaf=jlora.is_lora)
  k = mixed["layers"]["self_attn"]
  k["k_proj"]["kernel"] = jlora.apply({"x": k["k_proj"]["kernel"]}, rank=2, stacked="x",
                                      targets="x", rslora=True)["x"]
  with pytest.raises(ValueError, match="some LoRA leaves use rslora"):
    llama_hf.export_peft(tmp_path / "x", mixed)
  with pytest.raises(TypeError, match=r"key_map\('layers/self_attn/q_proj/kernel'\) returned"):
    llama_hf.export_peft(tmp_path / "x", t, key_map=lambda s: "model.q.weight")
  with pytest.raises(TypeError, match=r"jlora.hf.export_peft: key_map must be a callable path "
                                      r"-> \(name, transpose\) \| None; got 'gpt2'"):
    llama_hf.export_peft(tmp_path / "x", t, key_map="gpt2")
  for fn, target in ((jlora.hf.export_peft, t), (jlora.hf.export_merged, t),
                     (jlora.hf.import_peft, _llama_params())):  # the key map is required
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'key_map'"):
      fn(tmp_path / "x", target)
  with pytest.raises(ValueError, match="has no adapters .the frozen half"):
    llama_hf.export_peft(tmp_path / "x", jlora.split(t).frozen)
  assert not os.path.exists(tmp_path / "x")


def test_export_refuses_to_overwrite(tmp_path):
  t = _lora_tree(targets="q_proj", rank=2)
  d = llama_hf.export_peft(tmp_path / "a", t)
  before = _bytes(os.path.join(d, "adapter_model.safetensors"))
  with pytest.raises(FileExistsError, match="adapter_.* already exists"):
    llama_hf.export_peft(d, _lora_tree(targets="q_proj", rank=3))
  assert _bytes(os.path.join(d, "adapter_model.safetensors")) == before
  llama_hf.export_peft(d, _lora_tree(targets="q_proj", rank=3), overwrite=True)
  assert _json(os.path.join(d, "adapter_config.json"))["r"] == 3
  assert sorted(os.listdir(d)) == ["adapter_config.json", "adapter_model.safetensors"]


def test_export_merged_errors(tmp_path):
  t = _lora_tree(targets="q_proj", rank=2)
  with pytest.raises(ValueError, match=r"no Hugging Face name for \['extra/thing'\]"):
    llama_hf.export_merged(tmp_path / "m.safetensors", {**t, "extra": {"thing": jnp.ones(3)}})
  with pytest.raises(ValueError, match="'norm/scale' has shape \\(32,\\).*2 '\\{\\}' stack"):
    llama_hf.export_merged(tmp_path / "m.safetensors", t,
                     key_map=lambda p: ("x.{}.{}", False) if p == "norm/scale" else
                     llama.peft_key_map(p))
  with pytest.raises(ValueError, match="gives the name 'model.norm.weight' twice"):
    llama_hf.export_merged(tmp_path / "m.safetensors", t,
                     key_map=lambda p: ("model.norm.weight", False) if "norm" in p else
                     llama.peft_key_map(p))
  assert not os.listdir(tmp_path)


def _write_adapter(d, cfg=None, tensors=None):
  os.makedirs(d, exist_ok=True)
  if cfg is not None:
    with open(os.path.join(d, "adapter_config.json"), "w") as f:
      f.write(cfg if isinstance(cfg, str) else json.dumps(cfg))
  if tensors is not None:
    save_file(tensors, os.path.join(d, "adapter_model.safetensors"))
  return d


def test_import_errors(tmp_path):
  p = _llama_params()
  good = llama_hf.export_peft(tmp_path / "good", _lora_tree(targets="q_proj", rank=2))
  cfg = _json(os.path.join(good, "adapter_config.json"))
  w = load_file(os.path.join(good, "adapter_model.safetensors"))
  with pytest.raises(FileNotFoundError, match="no adapter directory"):
    llama_hf.import_peft(tmp_path / "nope", p)
  with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
    llama_hf.import_peft(_write_adapter(tmp_path / "e"), p)
  with pytest.raises(ValueError, match="not valid JSON"):
    llama_hf.import_peft(_write_adapter(tmp_path / "j", '{"r": 4'), p)
  with pytest.raises(ValueError, match="holds list, not a PEFT config"):
    llama_hf.import_peft(_write_adapter(tmp_path / "l", "[1]"), p)
  with pytest.raises(ValueError, match="IA3 adapter"):
    llama_hf.import_peft(_write_adapter(tmp_path / "i", {**cfg, "peft_type": "IA3"}), p)
  with pytest.raises(ValueError, match="use_dora=true.*no lora_magnitude_vector"):
    llama_hf.import_peft(_write_adapter(tmp_path / "do", {**cfg, "use_dora": True}, w), p)
  d = _write_adapter(tmp_path / "bin", cfg)
  _write(os.path.join(d, "adapter_model.bin"), b"x")
  with pytest.raises(FileNotFoundError, match="adapter_model.bin.*safe_serialization"):
    llama_hf.import_peft(d, p)
  d = _write_adapter(tmp_path / "c", cfg)
  _write(os.path.join(d, "adapter_model.safetensors"), b"\x10\x00garbage")
  with pytest.raises(ValueError, match="not a readable safetensors file"):
    llama_hf.import_peft(d, p)
  with pytest.raises(ValueError, match="'base_model.model.lm_head.weight', which is not"):
    llama_hf.import_peft(_write_adapter(tmp_path / "s", cfg, {
        **w, "base_model.model.lm_head.weight": np.ones((2, 2), np.float32)}), p)
  half = {k: v for k, v in w.items() if not ("layers.0" in k and "lora_B" in k)}
  with pytest.raises(ValueError, match="no lora_B for 'model.layers.0.self_attn.q_proj'"):
    llama_hf.import_peft(_write_adapter(tmp_path / "h", cfg, half), p)
  with pytest.raises(ValueError, match="adapts 'model.layers.0.self_attn.q_proj'.*nearest"):
    llama_hf.import_peft(good, {"embed_tokens": p["embed_tokens"]})
  small = jax.tree.map(lambda x: x[..., :16] if x.ndim == 3 else x, p)
  with pytest.raises(ValueError, match="do not fit the kernel \\(32, 16\\)"):
    llama_hf.import_peft(good, small)
  ranks = dict(w)
  for hf in ("A", "B"):
    k = f"base_model.model.model.layers.1.self_attn.q_proj.lora_{hf}.weight"
    ranks[k] = np.concatenate([w[k], w[k]], axis=0 if hf == "A" else 1)
  with pytest.raises(ValueError, match="gives rank 2 for 'model.layers.1.self_attn.q_proj'"):
    llama_hf.import_peft(_write_adapter(tmp_path / "r0", cfg, ranks), p)
  with pytest.raises(ValueError, match="different ranks.*one dict per layer"):
    llama_hf.import_peft(_write_adapter(tmp_path / "r", {
        **cfg, "rank_pattern": {r"layers\.1\.self_attn\.q_proj": 4}}, ranks), p)
  alphas = {**cfg, "alpha_pattern": {r"layers\.1\.self_attn\.q_proj": 2}}
  with pytest.raises(ValueError, match="different lora_alphas"):
    llama_hf.import_peft(_write_adapter(tmp_path / "a", alphas, w), p)
  with pytest.raises(ValueError, match="already a jlora LoRA"):
    llama_hf.import_peft(good, jlora.apply(p, rank=2, targets="q_proj", stacked="^layers/"))
  with pytest.raises(ValueError, match="2-D \\(in, out\\) kernel"):
    jlora.hf.import_peft(good, p, key_map=lambda s: (
        ("model.layers.{}.self_attn.q_proj.weight", False) if s.endswith("q_proj/kernel")
        else None))


# ----------------------------------------------------------------------------- against peft
# (torch, transformers and peft: the slow lane)


@pytest.fixture(scope="module")
def hf():
  """A tiny random LlamaForCausalLM, its state dict and the matching jlora params."""
  import peft  # noqa: F401  (the test extra pins torch, transformers and peft)
  import torch
  import transformers
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(
      vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L,
      num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=HD, max_position_embeddings=64,
      tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():  # non-trivial norms
    for name, prm in model.named_parameters():
      if "norm" in name:
        prm.add_(0.1 * torch.randn_like(prm))
  sd = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  return cfg, sd


def _hf_to_params(sd):
  """HF Llama state dict -> the recipes.models.llama tree (kernels (in, out), layers stacked)."""
  lay = lambda n: np.stack([sd[f"model.layers.{i}.{n}.weight"] for i in range(L)])
  layers = {grp: {m: {"kernel": jnp.asarray(lay(f"{grp}.{m}").transpose(0, 2, 1))} for m in mods}
            for grp, mods in PROJ.items()}
  for n in ("input_layernorm", "post_attention_layernorm"):
    layers[n] = {"scale": jnp.asarray(lay(n))}
  return {"embed_tokens": {"embedding": jnp.asarray(sd["model.embed_tokens.weight"])},
          "layers": layers, "norm": {"scale": jnp.asarray(sd["model.norm.weight"])}}


def _fresh_model(cfg, sd):
  import torch
  import transformers
  m = transformers.LlamaForCausalLM(cfg).eval()
  m.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)
  return m


def _logits(model, tokens):
  import torch
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens))).logits.numpy()


def _flax_logits(cfg, params, tokens):
  """Logits of recipes.models.llama, when that model is available; else None."""
  try:
    from recipes.models import llama
  except ImportError:
    return None
  c = llama.LlamaConfig.from_hf(cfg.to_dict())
  return np.asarray(llama.Llama(c).apply({"params": params}, jnp.asarray(tokens)))


_PEFT_WARNINGS = pytest.mark.filterwarnings(
    "ignore:.*is_gradient_checkpointing.*:FutureWarning")


@pytest.mark.slow
@_PEFT_WARNINGS
def test_peft_adapter_imports_into_jlora(hf, tmp_path):
  import peft
  import torch
  cfg, sd = hf
  model = _fresh_model(cfg, sd)
  lcfg = peft.LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"],
                         rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 3},
                         use_rslora=True)
  pm = peft.get_peft_model(model, lcfg)
  torch.manual_seed(1)
  with torch.no_grad():
    for name, prm in pm.named_parameters():
      if "lora_B" in name:
        prm.copy_(torch.randn_like(prm) * 0.1)
  pm.save_pretrained(str(tmp_path / "adapter"))
  tokens = np.random.default_rng(0).integers(0, V, (2, 7))
  want_logits = _logits(pm, tokens)
  merged = {k: v.detach().numpy() for k, v in pm.merge_and_unload().state_dict().items()}

  tree = llama_hf.import_peft(tmp_path / "adapter", _hf_to_params(sd))
  v = tree["layers"]["self_attn"]["v_proj"]["kernel"]
  assert v.rank == 2 and v.alpha == 6 and v.rslora and v.stack == 1
  assert tree["layers"]["mlp"]["down_proj"]["kernel"].alpha == 3
  assert not isinstance(tree["layers"]["self_attn"]["k_proj"]["kernel"], jlora.LoRA)
  got = jlora.merge(tree)
  for grp, m in (("self_attn", "q_proj"), ("self_attn", "v_proj"), ("mlp", "down_proj"),
                 ("mlp", "up_proj")):
    for i in range(L):
      np.testing.assert_allclose(np.asarray(got["layers"][grp][m]["kernel"][i]).T,
                                 merged[f"model.layers.{i}.{grp}.{m}.weight"], atol=2e-6)
  # the same logits from the weights jlora writes for serving ...
  f = llama_hf.export_merged(tmp_path / "merged.safetensors", tree)
  np.testing.assert_allclose(_logits(_fresh_model(cfg, load_file(f)), tokens), want_logits,
                             atol=1e-4)
  # ... and from the Flax model, when present
  flax_logits = _flax_logits(cfg, got, tokens)
  if flax_logits is not None:
    np.testing.assert_allclose(flax_logits, want_logits, atol=1e-4)


@pytest.mark.slow
@_PEFT_WARNINGS
def test_jlora_adapter_loads_in_peft(hf, tmp_path):
  import peft
  cfg, sd = hf
  params = _hf_to_params(sd)
  tree = randomize_b(jlora.apply(params, rank={"q_proj": 4, ".*": 2},
                                 alpha={"v_proj": 3.0, ".*": 8.0}, targets="all-linear",
                                 stacked="^layers/", key=jax.random.key(5)), seed=2, scale=0.1)
  llama_hf.export_peft(tmp_path / "adapter", tree, task_type="CAUSAL_LM")
  pm = peft.PeftModel.from_pretrained(_fresh_model(cfg, sd), str(tmp_path / "adapter"))
  lora_layers = [n for n, _ in pm.named_modules() if n.endswith("q_proj.lora_A.default")]
  assert len(lora_layers) == L
  tokens = np.random.default_rng(1).integers(0, V, (2, 9))
  peft_logits = _logits(pm, tokens)
  f = llama_hf.export_merged(tmp_path / "merged.safetensors", tree)
  np.testing.assert_allclose(_logits(_fresh_model(cfg, load_file(f)), tokens), peft_logits,
                             atol=1e-4)
  assert not np.allclose(_logits(_fresh_model(cfg, sd), tokens), peft_logits, atol=1e-3)
  merged = {k: v.detach().numpy() for k, v in pm.merge_and_unload().state_dict().items()}
  ours = load_file(f)
  for k, v in merged.items():
    if k == "lm_head.weight":
      continue  # tied to the embedding, not a separate tensor in the jlora tree
    np.testing.assert_allclose(ours[k], v, atol=2e-6, err_msg=k)
  flax_logits = _flax_logits(cfg, jlora.merge(tree), tokens)
  if flax_logits is not None:
    np.testing.assert_allclose(flax_logits, peft_logits, atol=1e-4)


# ----------------------------------------------------------------------------- faults, against peft


@pytest.mark.slow
@_PEFT_WARNINGS
@pytest.mark.filterwarnings("ignore:.*changes the base weights of the model:UserWarning")
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_residual_init_and_its_plain_lora_conversion_import(hf, tmp_path, init):
  """PEFT loads a PiSSA/OLoRA adapter onto residual base weights; jlora rebuilds them, and
  imports the plain LoRA adapter PEFT converts it to as well, both to PEFT's weights."""
  import peft
  import torch
  cfg, sd = hf
  pm = peft.get_peft_model(_fresh_model(cfg, sd), peft.LoraConfig(
      r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=init))
  pm.peft_config["default"].init_lora_weights = True  # as PEFT's docs save the initial adapter
  pm.save_pretrained(str(tmp_path / "init"))
  pm.peft_config["default"].init_lora_weights = init
  torch.manual_seed(2)
  with torch.no_grad():  # "training"
    for name, prm in pm.named_parameters():
      if "lora_" in name:
        prm.add_(0.1 * torch.randn_like(prm))
  pm.save_pretrained(str(tmp_path / "trained"))
  pm.save_pretrained(str(tmp_path / "converted"),
                     path_initial_model_for_weight_conversion=str(tmp_path / "init"))
  want = {k: v.detach().numpy() for k, v in pm.merge_and_unload().state_dict().items()}
  params = _hf_to_params(sd)

  for d in ("trained", "converted"):
    got = jlora.merge(llama_hf.import_peft(tmp_path / d, params))
    for m in ("q_proj", "v_proj"):
      for i in range(L):
        np.testing.assert_allclose(np.asarray(got["layers"]["self_attn"][m]["kernel"][i]).T,
                                   want[f"model.layers.{i}.self_attn.{m}.weight"], atol=2e-5)
  # what rebuilding the residual prevents: the trained factors on the untouched base are off
  cfg_path = tmp_path / "trained" / "adapter_config.json"
  c = _json(cfg_path)
  _write(cfg_path, json.dumps({**c, "init_lora_weights": True}).encode())
  naive = jlora.merge(llama_hf.import_peft(tmp_path / "trained", params))
  q = np.asarray(naive["layers"]["self_attn"]["q_proj"]["kernel"][0]).T
  assert np.abs(q - want["model.layers.0.self_attn.q_proj.weight"]).max() > 0.05


def _selects(tmp_path, cfg, module) -> bool:
  """Whether jlora.hf.import_peft reads an adapter for `module` alone under `cfg` (False: it
  refuses the module as one the config does not select, where PEFT would drop its tensors)."""
  d = tmp_path / f"a{len(os.listdir(tmp_path))}"
  _write_adapter(d, {"peft_type": "LORA", "r": 2, "lora_alpha": 4, **cfg}, {
      f"base_model.model.{module}.lora_A.weight": np.ones((2, 4), np.float32),
      f"base_model.model.{module}.lora_B.weight": np.ones((4, 2), np.float32)})
  try:
    jlora.hf.import_peft(d, {"m": jnp.ones((4, 4))},
                         key_map=lambda p: (f"{module}.weight", True) if p == "m" else None)
  except ValueError as e:
    if "a module its config does not select" not in str(e):
      raise
    return False
  return True


@pytest.mark.slow
def test_module_selection_follows_peft(tmp_path):
  """jlora's reading of target_modules / exclude_modules / modules_to_save / layers_to_transform
  is PEFT's check_target_module_exists."""
  import peft
  from peft.tuners.tuners_utils import check_target_module_exists
  modules = [f"model.layers.{i}.{g}.{m}" for i in (0, 1, 12) for g, ms in PROJ.items()
             for m in ms] + ["lm_head", "model.layers.1.mlp.experts.0.up_proj", "q_proj"]
  configs = [
      {"target_modules": ["q_proj", "v_proj"]},
      {"target_modules": ["self_attn.q_proj", "model.layers.1.mlp.up_proj"]},
      {"target_modules": r".*layers\.1\d?\..*_proj"},
      {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [1, 12]},
      {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": 0,
       "layers_pattern": "layers"},
      {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [0, 1],
       "layers_pattern": ["h", "layers"]},
      {"target_modules": ["q_proj", "o_proj", "up_proj"], "exclude_modules": ["o_proj"],
       "modules_to_save": ["up_proj"]},
      {"target_modules": ["q_proj", "k_proj"], "exclude_modules": r".*layers\.0\..*"},
      {"target_modules": ["q_proj", "model.layers.1.self_attn.q_proj"],
       "layers_to_transform": [0]},
  ]
  for c in configs:
    lc = peft.LoraConfig(**c)
    for m in modules:
      assert _selects(tmp_path, c, m) == bool(check_target_module_exists(lc, m)), (c, m)


@pytest.mark.slow
def test_exported_patterns_select_one_module_in_peft(tmp_path):
  """The rank/alpha patterns export_peft writes each select their one module in PEFT."""
  from peft.utils.other import get_pattern_key
  names = ["model.layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj",
           "vision.model.layers.1.self_attn.q_proj", "layers.1.self_attn.q_proj"]
  params = {f"m{i}": jnp.ones((6, 6)) for i in range(len(names))}
  # m0 gets its own rank, the others their own alphas: every module gets a pattern.
  t = jlora.apply(params, rank={"m0$": 5, ".*": 2}, targets=".*",
                  alpha={"m0$": 1.0, "m1$": 7.0, "m2$": 8.0, "m3$": 9.0})
  d = jlora.hf.export_peft(tmp_path / "a", t, key_map=lambda p: (
      f"{names[int(p[1:])]}.weight", True))
  cfg = _json(os.path.join(d, "adapter_config.json"))
  patterns = {**cfg["rank_pattern"], **cfg["alpha_pattern"]}
  assert len(patterns) == len(names)
  selected = {p: [m for m in names if get_pattern_key([p], m) == p] for p in patterns}
  assert sorted(m for ms in selected.values() for m in ms) == sorted(names), selected
