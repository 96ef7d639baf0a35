"""recipes.models.llama: jlora's factored path on the decoder; in the slow lane, the demo model
itself (against a NumPy reference, the loaders, generation) and the real SmolLM2."""

import dataclasses
import doctest
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import save_file

import jlora
from recipes.models import llama
from tests.helpers import rand, random_params

PLAIN_ENGLISH = (
    "Photosynthesis is the process by which green plants use sunlight to make their own food. "
    "During photosynthesis, plants take in carbon dioxide from the air and water from the soil. "
    "Using the energy from sunlight, they turn these into glucose, a type of sugar, and release "
    "oxygen into the air. This process is very important because it provides the oxygen that "
    "humans and animals need to breathe.")


def _random_params(cfg, seed=0):
  """A tiny model's parameters, every leaf random (norm scales around 1; numpy, not jax.random:
  no XLA compilation per leaf shape)."""
  shapes = jax.eval_shape(llama.Llama(cfg).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  return random_params(shapes["params"], seed)


def _tokens(seed, shape, vocab):
  """Random token ids (numpy: no XLA compilation per shape)."""
  return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def _reference_logits(sd, cfg, tokens):
  """An independent NumPy Llama forward on an HF state dict (torch layout, unstacked)."""
  x = sd["model.embed_tokens.weight"][tokens].astype(np.float64)
  t = tokens.shape[1]
  hd, hq, hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
  inv = 1.0 / cfg.rope_theta ** (np.arange(0, hd, 2) / hd)
  ang = np.arange(t)[:, None] * inv[None]
  cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

  def rms(v, w):
    return v / np.sqrt((v * v).mean(-1, keepdims=True) + cfg.rms_norm_eps) * w

  def rope(v):  # (B, H, T, hd)
    v1, v2 = v[..., :hd // 2], v[..., hd // 2:]
    return v * cos + np.concatenate([-v2, v1], -1) * sin

  for i in range(cfg.num_layers):
    g = lambda n: sd[f"model.layers.{i}.{n}.weight"].astype(np.float64)
    h = rms(x, g("input_layernorm"))
    b = h.shape[0]
    q = (h @ g("self_attn.q_proj").T).reshape(b, t, hq, hd).transpose(0, 2, 1, 3)
    k = (h @ g("self_attn.k_proj").T).reshape(b, t, hkv, hd).transpose(0, 2, 1, 3)
    v = (h @ g("self_attn.v_proj").T).reshape(b, t, hkv, hd).transpose(0, 2, 1, 3)
    q, k = rope(q), rope(k)
    k = np.repeat(k, hq // hkv, axis=1)  # HF repeat_kv
    v = np.repeat(v, hq // hkv, axis=1)
    s = q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd)
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = (p @ v).transpose(0, 2, 1, 3).reshape(b, t, hq * hd)
    x = x + o @ g("self_attn.o_proj").T
    h = rms(x, g("post_attention_layernorm"))
    gate, up = h @ g("mlp.gate_proj").T, h @ g("mlp.up_proj").T
    x = x + (gate / (1 + np.exp(-gate)) * up) @ g("mlp.down_proj").T
  x = rms(x, sd["model.norm.weight"])
  head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
  return x @ head.T


@pytest.mark.slow  # the demo model's own behaviour
@pytest.mark.parametrize("tied", [True, False])
def test_forward_matches_numpy_reference(tied):
  cfg = llama.LlamaConfig.tiny(tie_word_embeddings=tied)
  params = _random_params(cfg, seed=int(tied))
  tokens = _tokens(5, (2, 11), cfg.vocab_size)
  got = jax.jit(llama.Llama(cfg).apply)({"params": params}, jnp.asarray(tokens))
  want = _reference_logits(llama.to_hf_state_dict(params, cfg), cfg, tokens)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)


@pytest.mark.slow  # the demo model's own behaviour
def test_remat_and_left_padding_give_the_same_logits():
  cfg = llama.LlamaConfig.tiny()
  params = _random_params(cfg, seed=3)
  tokens = jnp.asarray(_tokens(6, (1, 9), cfg.vocab_size))
  base = jax.jit(llama.Llama(cfg).apply)({"params": params}, tokens)
  remat_model = llama.Llama(dataclasses.replace(cfg, remat=True))
  remat = jax.jit(remat_model.apply)({"params": params}, tokens)
  np.testing.assert_allclose(np.asarray(remat), np.asarray(base), rtol=1e-5, atol=1e-5)
  padded = jnp.concatenate([jnp.full((1, 3), 17, jnp.int32), tokens], axis=1)
  mask = jnp.concatenate([jnp.zeros((1, 3), jnp.int32), jnp.ones((1, 9), jnp.int32)], axis=1)
  out = jax.jit(llama.Llama(cfg).apply)({"params": params}, padded, mask)
  np.testing.assert_allclose(np.asarray(out[:, 3:]), np.asarray(base), rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # the demo model's own behaviour
def test_generate_is_the_argmax_continuation():
  cfg = llama.LlamaConfig.tiny()
  params = _random_params(cfg, seed=4)
  model = llama.Llama(cfg)
  apply = jax.jit(model.apply)
  prompts = [[5, 9, 200, 31], [7, 8]]
  got = llama.generate(model, params, prompts, max_new_tokens=6, eos_id=None, bucket=8)
  for prompt, out in zip(prompts, got):
    assert len(out) == 6
    seq = prompt + out
    # Greedy: every generated token is the argmax after the tokens before it.
    logits = apply({"params": params}, jnp.asarray([seq]))[0]
    np.testing.assert_array_equal(np.argmax(logits[len(prompt) - 1:-1], -1), out)
  with pytest.raises(ValueError, match="at least one token"):
    llama.generate(model, params, [[]])


def test_lora_factored_equals_merged_without_materializing():
  cfg = llama.LlamaConfig.tiny()
  params = _random_params(cfg, seed=5)
  tree = jlora.apply(params, rank=4, targets="all-linear", stacked=r"^layers/")
  # Random b so the adapters are non-zero.
  trainable, frozen = jlora.split(tree)
  trainable = jax.tree.map(lambda x: rand(x.shape, seed=x.size, scale=0.1), trainable)
  tree = jlora.combine(trainable, frozen)
  model = llama.Llama(dataclasses.replace(cfg, remat=True))
  tokens = jnp.asarray(_tokens(8, (2, 7), cfg.vocab_size))
  merged = jax.jit(model.apply)({"params": jlora.merge(tree)}, tokens)
  factored = jax.jit(jlora.lora(model.apply, strict=True))({"params": tree}, tokens)
  assert float(jnp.abs(merged - jax.jit(model.apply)({"params": params}, tokens)).max()) > 1e-3
  np.testing.assert_allclose(np.asarray(factored), np.asarray(merged), rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # the demo model's own behaviour
def test_unpermute_inverts_llama_cpp_permutation():
  rng = np.random.default_rng(0)
  n_heads, hd, d_in = 3, 8, 5
  w = rng.normal(size=(n_heads * hd, d_in))
  # llama.cpp's convert script: rows of each head reordered for interleaved RoPE.
  permuted = w.reshape(n_heads, 2, hd // 2, d_in).swapaxes(1, 2).reshape(n_heads * hd, d_in)
  assert not np.array_equal(permuted, w)
  np.testing.assert_array_equal(llama._unpermute_qk(permuted, n_heads), w)


def _hf_config(cfg):
  return dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
              intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
              num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
              head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
              tie_word_embeddings=cfg.tie_word_embeddings)


@pytest.mark.slow  # the demo model's own behaviour
@pytest.mark.parametrize("tied", [True, False])
def test_safetensors_round_trip_and_key_map(tmp_path, tied):
  cfg = llama.LlamaConfig.tiny(tie_word_embeddings=tied)
  params = _random_params(cfg, seed=11)
  sd = llama.to_hf_state_dict(params, cfg)
  # The documented key map, checked directly.
  q = params["layers"]["self_attn"]["q_proj"]["kernel"]
  np.testing.assert_array_equal(sd["model.layers.1.self_attn.q_proj.weight"], np.asarray(q[1]).T)
  assert ("lm_head.weight" in sd) == (not tied)
  names = sorted(sd)
  save_file({k: sd[k] for k in names[:9]}, str(tmp_path / "model-00001-of-00002.safetensors"))
  save_file({k: sd[k] for k in names[9:]}, str(tmp_path / "model-00002-of-00002.safetensors"))
  (tmp_path / "config.json").write_text(json.dumps(_hf_config(cfg)))
  cfg2, back = llama.from_safetensors(tmp_path)
  assert dataclasses.replace(cfg2) == cfg
  jax.tree.map(np.testing.assert_array_equal, back, params)


@pytest.mark.slow  # the demo model's own behaviour
def test_safetensors_errors_name_the_problem(tmp_path):
  cfg = llama.LlamaConfig.tiny()
  sd = llama.to_hf_state_dict(_random_params(cfg), cfg)
  sd["model.layers.0.self_attn.q_proj.bias"] = np.ones(64, np.float32)
  save_file(sd, str(tmp_path / "model.safetensors"))
  with pytest.raises(FileNotFoundError, match="config.json"):
    llama.from_safetensors(tmp_path / "model.safetensors")
  (tmp_path / "config.json").write_text(json.dumps(_hf_config(cfg)))
  with pytest.raises(ValueError, match="q_proj.bias"):
    llama.from_safetensors(tmp_path)
  with pytest.raises(NotImplementedError, match="rope_scaling"):
    llama.LlamaConfig.from_hf({**_hf_config(cfg), "rope_scaling": {"rope_type": "llama3"}})


@pytest.mark.slow  # the demo model's own behaviour
def test_doctests():
  r = doctest.testmod(llama, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert r.attempted > 0 and r.failed == 0


# ----------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_smollm2_config_and_tree(smollm2):
  c = smollm2.config
  shape = (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim)
  assert shape == (30, 576, 9, 3, 64)
  assert c.tie_word_embeddings and "lm_head" not in smollm2.params
  assert sum(x.size for x in jax.tree.leaves(smollm2.params)) == 134_515_008
  assert smollm2.params["layers"]["self_attn"]["k_proj"]["kernel"].shape == (30, 576, 192)
  lp = jlora.apply(smollm2.params, rank=8, stacked=r"^layers/")
  assert jlora.count(lp).trainable == 460_800


@pytest.mark.slow
def test_smollm2_nll_on_plain_english(smollm2):
  ids = jnp.asarray([smollm2.tokenizer.encode(PLAIN_ENGLISH).ids])
  logits = jax.jit(smollm2.model.apply)({"params": smollm2.params}, ids)
  nll = float(llama.lm_loss(logits, ids))
  assert nll < 2.0, nll


@pytest.mark.slow
def test_smollm2_says_paris(smollm2):
  tok = smollm2.tokenizer
  prompt = tok.encode(llama.chatml("What is the capital of France?")).ids
  assert prompt[0] == 1 and tok.token_to_id("<|im_end|>") == 2  # ChatML specials are single ids
  out = llama.generate(smollm2.model, smollm2.params, [prompt], max_new_tokens=16)
  reply = tok.decode(out[0])
  assert "Paris" in reply, reply


@pytest.mark.slow
def test_tokenizer_round_trips(smollm2):
  tok = smollm2.tokenizer
  text = "  Ham. To be, or not to be, that is the Question:\nWhether 'tis Nobler 1603"
  enc = tok.encode(text)
  assert tok.decode(enc.ids) == text
  assert "1" in enc.tokens and "6" in enc.tokens  # digits split one by one


@pytest.mark.slow
def test_q4_1_blocks_are_the_gguf_packages_own_numbers():
  import gguf
  reader = gguf.GGUFReader(llama.smollm2_path())
  t = next(t for t in reader.tensors if t.name == "blk.3.ffn_down.weight")
  assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1
  codes, d, m = llama._q4_1_blocks(t)
  q = np.stack([codes >> 4, codes & 15], axis=-1).reshape(codes.shape[0], -1)
  ours = q.reshape(q.shape[0], -1, 32) * d[..., None].astype(np.float32) + m[..., None]
  want = gguf.quants.dequantize(t.data, t.tensor_type).reshape(q.shape)
  np.testing.assert_array_equal(ours.reshape(q.shape).astype(np.float32), want)
  assert len(np.unique(q)) == 16


@pytest.mark.slow
def test_gguf_q4_1_kernels_load_quantized(smollm2):
  import gguf
  config, qp = llama.from_gguf(quantized=True)
  assert config == smollm2.config
  is_q = lambda x: isinstance(x, jlora.Quantized)
  flat = {jax.tree_util.keystr(p): x
          for p, x in jax.tree_util.tree_flatten_with_path(qp, is_leaf=is_q)[0]}
  kernels = {k: x for k, x in flat.items() if is_q(x)}
  assert len(kernels) == 7 and all(x.kind == "q4_1" and x.transposed for x in kernels.values())
  assert not is_q(qp["embed_tokens"]["embedding"])  # Q8_0 in the file: dequantized
  # Bytes: the file's own Q4_1 blocks (20 bytes per 32 weights), nothing more.
  reader = gguf.GGUFReader(llama.smollm2_path())
  q4 = [t for t in reader.tensors if t.tensor_type == gguf.GGMLQuantizationType.Q4_1]
  assert sum(x.nbytes for x in kernels.values()) == sum(int(t.data.nbytes) for t in q4)
  float_flat = {jax.tree_util.keystr(p): x
                for p, x in jax.tree_util.tree_flatten_with_path(smollm2.params)[0]}
  for k, x in kernels.items():
    np.testing.assert_allclose(np.asarray(x.dequantize()), np.asarray(float_flat[k]),
                               rtol=1e-6, atol=1e-7, err_msg=k)
  ids = jnp.asarray([smollm2.tokenizer.encode(PLAIN_ENGLISH).ids[:48]])
  want = jax.jit(smollm2.model.apply)({"params": smollm2.params}, ids)
  got = jax.jit(jlora.lora(smollm2.model.apply, strict=True))({"params": qp}, ids)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
  # A LoRA step on the quantized base: the adapters move, the codes do not.
  tree = jlora.apply(qp, rank=4, targets="all-linear", stacked=r"^layers/")
  codes = np.array(tree["layers"]["mlp"]["up_proj"]["kernel"].w.codes, copy=True)
  fwd = jlora.lora(smollm2.model.apply)
  loss_fn = lambda t, toks: llama.lm_loss(fwd({"params": t}, toks), toks)
  step = jlora.train_step(loss_fn, optax.adam(1e-3))
  before = float(jax.jit(loss_fn)(tree, ids))
  tree, _, loss = step(tree, step.init(tree), ids)
  after = float(jax.jit(loss_fn)(tree, ids))
  assert abs(float(loss) - before) < 1e-4 and after < before - 0.01, (before, after)
  np.testing.assert_array_equal(np.asarray(tree["layers"]["mlp"]["up_proj"]["kernel"].w.codes),
                                codes)
