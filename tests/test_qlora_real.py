"""QLoRA on the real SmolLM2-135M (CPU, slow lane): a quantized base against the float one, and a
QLoRA fine-tune on the First Folio against the same LoRA on a bfloat16 base.

The float model is the Q4_1 GGUF dequantized to float32 (`from_gguf`), so quantizing it again
rounds weights that are already 4-bit: NF4's error lands on top of Q4_1's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jlora
from recipes import data
from recipes.models import llama

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hamlet(smollm2):
  """The held-out First Folio Hamlet as one token stream, and the other plays'."""
  split = data.shakespeare_split(("hamlet",))
  train = data.tokenize_texts(list(split.train.values()), smollm2.tokenizer, eos_id=2)
  test = data.tokenize_texts(list(split.test.values()), smollm2.tokenizer, eos_id=2)
  return train, test


def test_quantized_base_predicts_the_float_models_next_tokens(smollm2, hamlet):
  """NF4 keeps the float model's argmax on about two thirds of the positions, int8 on 19 in 20.

  The NF4 bound is low because NF4 itself is: bitsandbytes' own NF4 (Linear4bit, block 64,
  float32 matmul) agrees on 0.635 of these positions; 90 % is not reachable by NF4 on this 135M
  model at any block size down to 16 (benchmarks/qlora_real_cpu.py). The next test runs
  bitsandbytes' model itself against jlora's.
  """
  # Two Folio Hamlet passages of 256 tokens: 510 next-token predictions.
  passage = jnp.asarray(data.eval_windows(hamlet[1], 256, 2))
  model = smollm2.model
  want = np.argmax(np.asarray(jax.jit(model.apply)({"params": smollm2.params}, passage))[:, :-1],
                   -1)
  factored = jax.jit(jlora.lora(model.apply))
  agree = {}
  for kind in ("nf4", "int8"):
    q = jlora.quantize(smollm2.params, kind, stacked=r"^layers/")
    is_q = lambda x: isinstance(x, jlora.Quantized)
    kernels = [x for x in jax.tree.leaves(q, is_leaf=is_q) if is_q(x)]
    assert len(kernels) == 7  # every linear kernel of the stacked blocks; embeddings stay float
    got = np.argmax(np.asarray(factored({"params": q}, passage))[:, :-1], -1)
    agree[kind] = float(np.mean(got == want))
  # Measured: nf4 0.639, int8 0.947 (fp8, not run here: 0.933). NF4 on this 135M model, whose
  # weights are already Q4_1-rounded, flips the argmax on a third of the Folio positions, where
  # the float model is unsure (its median top probability there is 0.20, the median margin to
  # the second token 0.076; 84 % of the positions are below 0.5); 8-bit codes keep it.
  # bitsandbytes 0.50.2's own NF4 (Linear4bit, block 64, float32 matmul) agrees on 0.635 of
  # these positions (int8, LLM.int8 weights with float32 matmul: 0.959), so 90 % is not
  # reachable by NF4 on this 135M model; 0.55 leaves room for a different blocking (0.639 here).
  # benchmarks/qlora_real_cpu.py (results/qlora_real_cpu.json) measures the other blockings on
  # these positions: blocks of 64 / 32 / 16 along the output axis (jlora's) 0.639 / 0.716 /
  # 0.749, along the input axis (bitsandbytes') 0.635 / 0.671 / 0.700; double quantization
  # moves each by at most 0.014. KL from the float model: 0.33 nats/token at 64, 0.18 at 16
  # (int8 0.006). Where the float model's top probability is above 0.7 NF4-64 keeps 0.91.
  assert agree["int8"] >= 0.9, agree
  assert agree["nf4"] >= 0.55, agree
  assert agree["nf4"] < agree["int8"], agree


def test_nf4_base_matches_bitsandbytes_nf4_model(smollm2, hamlet):
  """jlora's NF4 SmolLM2 against bitsandbytes' (0.50.2) on the same 510 Folio positions.

  bitsandbytes quantizes each `nn.Linear` weight `(out, in)`, so its blocks of 64 run along the
  input axis; jlora blocks a kernel's last axis, the output axis of flax's `(in, out)`. For the
  same blocks, jlora quantizes the `(out, in)` transposes and keeps `.mT` of them.
  """
  import bitsandbytes as bnb
  import torch
  import transformers

  passage = data.eval_windows(hamlet[1], 256, 2)
  config, params = smollm2.config, smollm2.params
  want = np.argmax(np.asarray(jax.jit(smollm2.model.apply)({"params": params},
                                                            jnp.asarray(passage)))[:, :-1], -1)
  # bitsandbytes' model: every linear layer of the blocks a Linear4bit (NF4, block 64, no double
  # quantization, float32 compute) in train mode, where its CPU path dequantizes the weight and
  # multiplies in float32 (weight-only quantization, as jlora.lora runs it).
  torch.manual_seed(0)
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=config.vocab_size, hidden_size=config.hidden_size,
      intermediate_size=config.intermediate_size, num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
      head_dim=config.head_dim, rope_theta=config.rope_theta, rms_norm_eps=config.rms_norm_eps,
      tie_word_embeddings=config.tie_word_embeddings))
  sd = {k: torch.from_numpy(np.array(v, np.float32))
        for k, v in llama.to_hf_state_dict(params, config).items()}
  missing, unexpected = hf.load_state_dict(sd, strict=False)
  assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
  hf.tie_weights()
  for layer in hf.model.layers:
    for parent in (layer.self_attn, layer.mlp):
      for name, lin in list(parent.named_children()):
        if isinstance(lin, torch.nn.Linear):
          q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False,
                                compute_dtype=torch.float32, compress_statistics=False,
                                quant_type="nf4")
          q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, blocksize=64,
                                       compress_statistics=False, quant_type="nf4")
          setattr(parent, name, q.to("cpu"))  # Params4bit quantizes on the move to a device
  hf.train()
  with torch.no_grad():
    ref = hf(torch.as_tensor(passage, dtype=torch.long)).logits.float().numpy()

  # jlora's model, blocked as bitsandbytes blocks: quantize the (out, in) transposes, keep `.mT`.
  is_q = lambda x: isinstance(x, jlora.Quantized)
  flip = lambda x: jnp.swapaxes(x, -1, -2)
  transposed = {**params, "layers": jax.tree_util.tree_map_with_path(
      lambda p, x: flip(x) if p[-1].key == "kernel" else x, params["layers"])}
  q = jax.tree.map(lambda x: x.mT if is_q(x) else x,
                   jlora.quantize(transposed, "nf4", stacked=r"^layers/"), is_leaf=is_q)
  n = 0
  for i, layer in enumerate(hf.model.layers):  # the same codes and scales, kernel by kernel
    for group in ("self_attn", "mlp"):
      for name, lin in getattr(layer, group).named_children():
        if isinstance(lin, bnb.nn.Linear4bit):
          k = q["layers"][group][name]["kernel"]
          np.testing.assert_array_equal(np.asarray(k.codes[i]).ravel(), lin.weight.numpy().ravel())
          np.testing.assert_array_equal(np.asarray(k.scales[i]).ravel(),
                                        lin.weight.quant_state.absmax.numpy())
          n += 1
  assert n == 7 * config.num_layers
  got = np.asarray(jax.jit(jlora.lora(smollm2.model.apply))({"params": q}, jnp.asarray(passage)))

  same = float(np.mean(got[:, :-1].argmax(-1) == ref[:, :-1].argmax(-1)))
  agree = {"jlora": float(np.mean(got[:, :-1].argmax(-1) == want)),
           "bitsandbytes": float(np.mean(ref[:, :-1].argmax(-1) == want))}
  # Measured: the same argmax on all 510 positions, logits within 1.2e-4 (median 8.6e-6; the
  # logits reach 37.6), both models agree with the float one on 0.635 of the positions. The
  # weights are identical, so the logits differ only by float32 summation order: torch's float
  # model and jlora's float model differ by as much (1.4e-4). The bound 1e-3 is eight times that
  # and far below NF4's own effect (up to 18 from the float logits, median 1.5); jlora's default
  # blocking (along the output axis) misses it by up to 22 and shares 0.598 of the argmaxes.
  assert same >= 0.98, (same, agree)
  np.testing.assert_allclose(got, ref, rtol=0, atol=1e-3)
  assert abs(agree["jlora"] - agree["bitsandbytes"]) <= 0.02, agree

def test_qlora_fine_tune_tracks_the_bf16_base_lora(smollm2, hamlet):
  train, test = hamlet
  batches = data.Batches(train, 2, 64, seed=0)
  evals = jnp.asarray(data.eval_windows(test, 64, 8))
  forward = jlora.lora(smollm2.model.apply)

  def loss_fn(tree, tokens):
    return llama.lm_loss(forward({"params": tree}, tokens), tokens)

  nll = jax.jit(loss_fn)
  out = {}
  for name in ("bf16", "nf4"):
    # A fresh bfloat16 copy each time (the train step donates the tree's buffers).
    base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), smollm2.params)
    if name == "nf4":
      base = jlora.quantize(base, "nf4", stacked=r"^layers/")
    # The same seed, data and hyper-parameters for both: rank 8 on q_proj and v_proj.
    tree = jlora.apply(base, rank=8, stacked=r"^layers/", key=jax.random.key(0))
    before = float(nll(tree, evals))
    step = jlora.train_step(loss_fn, optax.adam(6e-3))
    opt_state = step.init(tree)
    for k in range(8):
      tree, opt_state, _ = step(tree, opt_state, jnp.asarray(batches[k]))
    out[name] = (before, float(nll(tree, evals)))
    if name == "nf4":
      assert isinstance(tree["layers"]["mlp"]["up_proj"]["kernel"], jlora.Quantized)
  (bf_before, bf_after), (q_before, q_after) = out["bf16"], out["nf4"]
  # Measured: bf16 5.195 -> 4.703, nf4 5.406 -> 4.867 (gap 0.21 before, 0.16 after). Longer runs
  # (benchmarks/qlora_real_cpu.py, results/qlora_real_cpu.json; both bases the same steps):
  # - this recipe, gap after 16 / 24 / 32 / 48 steps: 0.12 / 0.20 / 0.17 / 0.09; at 64 the NF4
  #   run jumps to 5.14 (gap 0.68): batches of 2 x 64 tokens move the held-out NLL by 0.1.
  # - lr 1.2e-2 for both: 0.07 / 0.08 / 0.06 after 8 / 16 / 24 steps, but only because the
  #   bf16 run trains worse (4.82 at 24 steps against 4.53); 0.24 at 32, then both diverge.
  # - rank 8 on every linear kernel, lr 3e-3: 0.14 / 0.12 / 0.12 / 0.10 / 0.06 / 0.10 / 0.07 /
  #   0.06 after 8 / 16 / 24 / 32 / 48 / 64 / 80 / 96 steps (4.268 against 4.332 at 96).
  # No step count the slow lane affords (a step takes 2.4-3.4 s on 2 CPU cores, so 8 steps on
  # each base, compilation included, take 90 s here) brings the gap to 0.05: NF4 starts 0.21 behind
  # and the adapters close that slowly. The bound 0.25 stays.
  assert bf_before - bf_after >= 0.3 and q_before - q_after >= 0.3, out
  assert q_after < bf_before, out  # the QLoRA fine-tune more than makes up the quantization cost
  assert q_after - bf_after <= 0.25, out
