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
  # the float model is unsure (its median top probability there is 0.20); 8-bit codes keep it.
  assert agree["int8"] >= 0.9, agree
  assert agree["nf4"] >= 0.55, agree
  assert agree["nf4"] < agree["int8"], agree


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
  # Measured: bf16 5.195 -> 4.703, nf4 5.406 -> 4.867 (gap 0.21 before, 0.16 after; 16 steps on
  # every linear kernel at lr 3e-3: 4.537 against 4.661, gap 0.12).
  assert bf_before - bf_after >= 0.3 and q_before - q_after >= 0.3, out
  assert q_after < bf_before, out  # the QLoRA fine-tune more than makes up the quantization cost
  assert q_after - bf_after <= 0.25, out
