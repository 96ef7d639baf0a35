"""Many adapters in one batch on the real SmolLM2-135M (CPU, slow lane): two adapters trained on
two First Folio plays, stacked, and a mixed batch (adapter 0, adapter 1, none) against each
adapter alone, in the forward, the gradients, greedy generation, checkpoints and PEFT export."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from safetensors.numpy import load_file

import jlora
from recipes import data
from recipes.models import llama

pytestmark = pytest.mark.slow

PLAYS = ("hamlet", "twelfth_night")
RANKS = (4, 8)  # stacked, adapter 0 is zero-padded to rank 8


def _sum_nll(logits, tokens):
  """Summed next-token NLL: a mixed batch's loss is the sum of its examples' losses."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
  return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).sum()


def test_mixed_batch_of_two_trained_adapters_matches_each_alone(smollm2, tmp_path):
  model, params = smollm2.model, smollm2.params
  plays = data.load_plays()
  streams = [data.tokenize_texts([t for s, t in plays.items() if data.play_key(s) == name],
                                 smollm2.tokenizer, eos_id=2) for name in PLAYS]
  factored = jlora.lora(model.apply)

  def loss_fn(tree, tokens):
    return llama.lm_loss(factored({"params": tree}, tokens), tokens)

  # Two adapters on q_proj and v_proj of the stacked blocks, each trained on its own play (4 Adam
  # steps of 2 windows of 64 tokens). The train step donates the adapters only: the base is shared.
  trees = []
  for k, (stream, rank) in enumerate(zip(streams, RANKS)):
    tree = jlora.apply(params, rank=rank, alpha=2.0 * rank, stacked=r"^layers/",
                       key=jax.random.key(k))
    step = jlora.train_step(loss_fn, optax.adam(6e-3))
    opt = step.init(tree)
    batches = data.Batches(stream, 2, 64, seed=k)
    for n in range(4):
      tree, opt, _ = step(tree, opt, jnp.asarray(batches[n]))
    trees.append(tree)
  s = jlora.stack(trees)
  assert s["layers"]["self_attn"]["q_proj"]["kernel"].a.shape[:2] == (30, 2)

  # (1) The forward: each example of a mixed batch gets its own adapter's logits (or the base's).
  ids = np.array([0, 1, -1, 1, 0, -1])
  windows = [data.eval_windows(st, 32, 3) for st in streams]
  tokens = jnp.asarray(np.concatenate([windows[0][:1], windows[1][:2], windows[0][1:2],
                                       windows[0][2:], windows[1][2:]]))
  got = np.asarray(jax.jit(factored)({"params": jlora.select(s, ids)}, tokens))
  alone = jax.jit(factored)
  wants = {i: np.asarray(alone({"params": trees[i]}, tokens[ids == i])) for i in (0, 1)}
  wants[-1] = np.asarray(jax.jit(model.apply)({"params": params}, tokens[ids == -1]))
  scale = max(float(np.abs(w).max()) for w in wants.values())
  for i, want in wants.items():
    np.testing.assert_allclose(got[ids == i], want, rtol=0, atol=1e-4 * scale)
    np.testing.assert_array_equal(got[ids == i].argmax(-1), want.argmax(-1))
  # Measured: the mixed batch's logits equal each adapter's alone bit for bit (the logits reach
  # 35.8). The routing is what is tested: each adapter moves its windows' logits far (by 25 and
  # 34) from the base's, and adapter 1 on adapter 0's windows is far from adapter 0.
  base = np.asarray(jax.jit(model.apply)({"params": params}, tokens))
  moved = [float(np.abs(got[ids == i] - base[ids == i]).max()) for i in (0, 1)]
  swapped = np.asarray(alone({"params": trees[1]}, tokens[ids == 0]))
  moved.append(float(np.abs(swapped - wants[0]).max()))
  assert min(moved) > 100 * 1e-4 * scale, (moved, scale)

  # (2) Gradients of the mixed batch's summed loss: per adapter, those of that adapter alone on
  # its own examples; the padded ranks of adapter 0 get none. Measured: within 3.8e-6 of gradients
  # up to 10.8 (float32 summation order); the bound, 1e-4 of each leaf's largest, is over 200
  # times the error of every leaf.
  tr, fr = jlora.split(s)
  g = jax.jit(jax.grad(lambda tr, fr: _sum_nll(
      factored({"params": jlora.select(jlora.combine(tr, fr), ids)}, tokens), tokens)))(tr, fr)
  for i, t in enumerate(trees):
    tt, tf = jlora.split(t)
    gi = jax.jit(jax.grad(lambda tt, tf, x: _sum_nll(
        factored({"params": jlora.combine(tt, tf)}, x), x)))(tt, tf, tokens[ids == i])
    r = RANKS[i]
    for name in ("q_proj", "v_proj"):
      mixed = g["layers"]["self_attn"][name]["kernel"]
      one = gi["layers"]["self_attn"][name]["kernel"]
      for ab, mix, want in (("a", mixed.a[:, i, ..., :r], one.a), ("b", mixed.b[:, i, :r], one.b)):
        gscale = float(jnp.abs(want).max())
        assert gscale > 0, (name, ab)
        np.testing.assert_allclose(mix, want, rtol=0, atol=1e-4 * gscale, err_msg=f"{name}.{ab}")
      assert float(jnp.abs(mixed.a[:, i, ..., r:]).max(initial=0)) == 0
      assert float(jnp.abs(mixed.b[:, i, r:]).max(initial=0)) == 0

  # (3) Greedy decoding, one adapter per row (0, 1, none), against each prompt alone with its own
  # adapter merged into the base (or the base itself). Measured: the same 8 tokens on every row,
  # step logits within 7.2e-5 (factored against merged; the bound is 3.6e-3); the base's own
  # continuations of rows 0 and 1 differ from the adapters' from the first or third token on.
  def mixed_forward(p, tokens, attention_mask, cache):
    tree, row_ids = p
    return factored({"params": jlora.select(tree, row_ids)}, tokens, attention_mask, cache=cache)

  prompts = [windows[0][0][:12].tolist(), windows[1][0][:7].tolist(), windows[0][1][:16].tolist()]
  row_ids = jnp.asarray([0, 1, -1])
  size, n_new = 16, 8

  def left_pad(ps):
    toks = np.zeros((len(ps), size), np.int32)
    mask = np.zeros((len(ps), size), np.int32)
    for k, p in enumerate(ps):
      toks[k, size - len(p):], mask[k, size - len(p):] = p, 1
    return jnp.asarray(toks), jnp.asarray(mask)

  out = llama.decode(model, (s, row_ids), *left_pad(prompts), max_new_tokens=n_new,
                     forward=mixed_forward, return_logits=True)
  singles = [jlora.merge(trees[0]), jlora.merge(trees[1]), params]
  for k, (p, w) in enumerate(zip(prompts, singles)):
    one = llama.decode(model, w, *left_pad([p]), max_new_tokens=n_new, return_logits=True)
    np.testing.assert_array_equal(np.asarray(out.tokens[k]), np.asarray(one.tokens[0]))
    np.testing.assert_allclose(np.asarray(out.logits[k]), np.asarray(one.logits[0]), rtol=0,
                               atol=1e-4 * scale)
  # the rows' adapters change what is generated: each row differs from the base's continuation
  base_out = llama.decode(model, params, *left_pad(prompts), max_new_tokens=n_new,
                          return_logits=True)
  assert float(np.abs(np.asarray(base_out.logits[:2]) - np.asarray(out.logits[:2])).max()) > 1.0

  # (4) Adapter 1 taken back out of the stack saves, restores and exports as the original does.
  one = jlora.unstack(s, 1)
  jlora.save(tmp_path / "ckpt", one)
  target = jlora.apply(params, rank=8, alpha=16.0, stacked=r"^layers/", key=jax.random.key(9))
  back = jlora.restore(tmp_path / "ckpt", target).tree
  for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(trees[1])):
    np.testing.assert_array_equal(x, y)
  assert back["layers"]["self_attn"]["v_proj"]["kernel"].alpha == 16.0
  for name, t in (("unstacked", one), ("original", trees[1])):
    jlora.hf.export_peft(tmp_path / name, t, key_map=llama.peft_key_map)
  a, b = (load_file(str(tmp_path / n / "adapter_model.safetensors"))
          for n in ("unstacked", "original"))
  assert sorted(a) == sorted(b) and len(a) == 2 * 2 * 30  # lora_A and lora_B, q and v, 30 blocks
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  configs = [json.loads((tmp_path / n / "adapter_config.json").read_text())
             for n in ("unstacked", "original")]
  assert configs[0] == configs[1] and configs[0]["r"] == 8 and configs[0]["lora_alpha"] == 16
