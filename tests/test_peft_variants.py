"""LoRA variants against PEFT 0.21 on the real SmolLM2-135M: DoRA, PiSSA, OLoRA, rsLoRA with rank
and alpha patterns. Each way: a PEFT adapter with trained-like (randomized) weights, loaded by
PEFT onto the base model, gives the logits of jlora's import (factored and merged); a jlora
adapter exported and loaded by PEFT gives jlora's logits."""

import copy
import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from recipes.models import llama

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")]

QV_DOWN = ["q_proj", "v_proj", "down_proj"]
# name -> (PEFT LoraConfig kwargs, the same as jlora.apply kwargs)
VARIANTS = {
    "dora": (dict(r=8, lora_alpha=16, target_modules=QV_DOWN, use_dora=True),
             dict(rank=8, alpha=16.0, targets=QV_DOWN, dora=True)),
    "rslora_patterns": (
        dict(r=8, lora_alpha=16, target_modules=QV_DOWN + ["up_proj"], use_rslora=True,
             rank_pattern={"v_proj": 4}, alpha_pattern={"down_proj": 5}),
        dict(rank={"v_proj": 4, ".*": 8}, alpha={"down_proj": 5.0, ".*": 16.0},
             targets=QV_DOWN + ["up_proj"], rslora=True)),
    "pissa": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                   init_lora_weights="pissa"),
              dict(rank=4, alpha=8.0, targets=["q_proj", "v_proj"], init="pissa")),
    "olora": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"],
                   init_lora_weights="olora"),
              dict(rank=4, alpha=8.0, targets=["q_proj", "down_proj"], init="olora")),
    "pissa_dora": (dict(r=4, lora_alpha=4, target_modules=["v_proj"], init_lora_weights="pissa",
                        use_dora=True),
                   dict(rank=4, alpha=4.0, targets=["v_proj"], init="pissa", dora=True)),
}


@pytest.fixture(scope="module")
def base(smollm2):
  """The HF config and state dict of SmolLM2-135M, and tokens to run."""
  import transformers
  c = smollm2.config
  cfg = transformers.LlamaConfig(
      vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
      num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
      num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, rope_theta=c.rope_theta,
      rms_norm_eps=c.rms_norm_eps, tie_word_embeddings=c.tie_word_embeddings,
      max_position_embeddings=2048)
  sd = {k: np.array(v) for k, v in llama.to_hf_state_dict(smollm2.params, c).items()}
  ids = smollm2.tokenizer.encode("The capital of France is Paris, and the capital of").ids
  return _HF(cfg, sd), sd, np.asarray([ids])


class _HF:
  """Makes fresh copies of the base HF model (PEFT edits the model it is given)."""

  def __init__(self, cfg, sd):
    import torch
    import transformers
    self.model = transformers.LlamaForCausalLM(cfg).eval()
    self.model.load_state_dict({k: torch.from_numpy(v) for k, v in sd.items()}, strict=False)

  def fresh(self):
    return copy.deepcopy(self.model)


def _hf_model(cfg, sd):
  return cfg.fresh()


def _torch_logits(model, tokens):
  import torch
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.numpy()


_JITTED = {}


def _jlora_logits(smollm2, tree, tokens):
  """(factored, merged) logits of the jlora tree (one jitted pair per model: trees of one
  structure share their compilation)."""
  if id(smollm2.model) not in _JITTED:
    apply = lambda p, t: smollm2.model.apply({"params": p}, t)
    _JITTED[id(smollm2.model)] = (jax.jit(jlora.lora(apply)), jax.jit(apply))
  fact_fn, merged_fn = _JITTED[id(smollm2.model)]
  fact = fact_fn(tree, jnp.asarray(tokens))
  merged = merged_fn(jlora.merge(tree), jnp.asarray(tokens))
  return np.asarray(fact), np.asarray(merged)


def _perturb(tree, seed):
  """`tree` "trained": noise added to `a` and `b` (the frozen `w`, a residual or not, kept) and
  DoRA's `m` scaled by 1 + 0.1·noise."""
  def f(path, x):
    if not jlora.is_lora(x):
      return x
    rng = np.random.default_rng([seed, zlib.crc32(jax.tree_util.keystr(path).encode())])
    noise = lambda v, s: v + jnp.asarray(s * rng.standard_normal(v.shape, np.float32))
    new = dict(a=noise(x.a, 0.02), b=noise(x.b, 0.05))
    if x.m is not None:
      new["m"] = x.m * (1 + noise(jnp.zeros_like(x.m), 0.1))
    return dataclasses.replace(x, **new)

  return jax.tree_util.tree_map_with_path(f, tree, is_leaf=jlora.is_lora)


def _close(got, want, what):
  scale = float(np.abs(want).max())
  err = float(np.abs(got - want).max())
  assert err <= 2e-4 * scale, f"{what}: max |diff| {err} > 2e-4 x {scale}"
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1), err_msg=what)
  return err / scale


@pytest.mark.parametrize("name", list(VARIANTS))
def test_peft_adapter_imports_to_peft_logits(smollm2, base, tmp_path, name):
  import peft
  import torch
  cfg, sd, tokens = base
  pcfg, _ = VARIANTS[name]
  pm = peft.get_peft_model(_hf_model(cfg, sd), peft.LoraConfig(**pcfg))
  torch.manual_seed(zlib.crc32(name.encode()))
  with torch.no_grad():  # "training": every factor (and magnitude) moves away from its init
    for n, prm in pm.named_parameters():
      if "lora_magnitude_vector" in n:
        prm.mul_(1 + 0.1 * torch.randn_like(prm))
      elif "lora_" in n:
        prm.add_(0.02 * torch.randn_like(prm))
  pm.save_pretrained(str(tmp_path / "adapter"))
  # what PEFT gives when it loads the adapter onto the base model (rebuilding a residual)
  want = _torch_logits(peft.PeftModel.from_pretrained(_hf_model(cfg, sd),
                                                      str(tmp_path / "adapter")), tokens)
  base_logits = _torch_logits(_hf_model(cfg, sd), tokens)
  assert np.abs(want - base_logits).max() > 1e-2 * np.abs(want).max()  # the adapter matters

  tree = jlora.hf.import_peft(tmp_path / "adapter", smollm2.params, key_map=llama.peft_key_map)
  leaves = [x for x in jax.tree.leaves(tree, is_leaf=jlora.is_lora) if jlora.is_lora(x)]
  assert leaves and all(x.dora == bool(pcfg.get("use_dora")) for x in leaves)
  assert all(x.residual == pcfg.get("init_lora_weights") for x in leaves)
  fact, merged = _jlora_logits(smollm2, tree, tokens)
  print(f"{name} PEFT -> jlora: max |diff| / max |logit|: factored "
        f"{_close(fact, want, 'factored'):.1e}, merged {_close(merged, want, 'merged'):.1e}")


@pytest.mark.parametrize("name", list(VARIANTS))
def test_jlora_adapter_loads_in_peft_to_jlora_logits(smollm2, base, tmp_path, name):
  import peft
  cfg, sd, tokens = base
  pcfg, jcfg = VARIANTS[name]
  tree = jlora.apply(smollm2.params, stacked="^layers/", key=jax.random.key(7), **jcfg)
  tree = _perturb(tree, seed=3)
  d = jlora.hf.export_peft(tmp_path / "adapter", tree, key_map=llama.peft_key_map)
  pm = peft.PeftModel.from_pretrained(_hf_model(cfg, sd), d)
  assert pm.peft_config["default"].use_dora == bool(jcfg.get("dora"))
  got = _torch_logits(pm, tokens)
  fact, merged = _jlora_logits(smollm2, tree, tokens)
  base_logits = _torch_logits(_hf_model(cfg, sd), tokens)
  assert np.abs(got - base_logits).max() > 1e-2 * np.abs(got).max()
  print(f"{name} jlora -> PEFT: max |diff| / max |logit|: PEFT vs factored "
        f"{_close(got, fact, 'PEFT vs jlora factored'):.1e}, merged vs factored "
        f"{_close(merged, fact, 'merged vs factored'):.1e}")
