"""recipes.models.llama generation: the KV cache against the full forward, batching, sampling,
stop tokens, jlora trees, compilations; in the slow lane, the real SmolLM2."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jlora
from recipes.models import llama
from tests.helpers import random_params, randomize_b

CFG = llama.LlamaConfig.tiny()
MODEL = llama.Llama(CFG)  # one module object: decode's compilations are shared across tests
N_NEW = 6
PROMPT_LENS = (5, 2, 8)


@pytest.fixture(scope="module")
def params():
  shapes = jax.eval_shape(MODEL.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
  return random_params(shapes["params"], seed=11)


def _prompts(seed, lens=PROMPT_LENS):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, CFG.vocab_size, n).tolist() for n in lens]


def _left_pad(prompts, size, pad_id=0):
  """(tokens, attention_mask) int32 arrays, each prompt right-aligned in `size` slots."""
  toks = np.full((len(prompts), size), pad_id, np.int32)
  mask = np.zeros((len(prompts), size), np.int32)
  for i, p in enumerate(prompts):
    toks[i, size - len(p):], mask[i, size - len(p):] = p, 1
  return jnp.asarray(toks), jnp.asarray(mask)


def _decode(params, prompts, size=8, **kw):
  toks, mask = _left_pad(prompts, size)
  kw.setdefault("max_new_tokens", N_NEW)
  return llama.decode(MODEL, params, toks, mask, **kw)


def _full_logits(params, prompts, gen):
  """Logits of the training forward (no cache, no mask) on each prompt + its generated tokens.

  Rows are right-padded to one length: under the causal mask, padding on the right changes
  nothing before it, so row i's logits at t are those of its unpadded sequence's prefix.
  """
  seqs = [p + np.asarray(g).tolist() for p, g in zip(prompts, gen)]
  width = max(len(s) for s in seqs)
  arr = np.zeros((len(seqs), width), np.int32)
  for i, s in enumerate(seqs):
    arr[i, :len(s)] = s
  return np.asarray(jax.jit(MODEL.apply)({"params": params}, jnp.asarray(arr)))


def test_cached_decode_matches_the_full_forward_at_every_step(params):
  prompts = _prompts(0)
  out = _decode(params, prompts, return_logits=True)
  assert out.tokens.shape == (3, N_NEW) and out.logits.shape == (3, N_NEW, CFG.vocab_size)
  np.testing.assert_array_equal(np.asarray(out.lengths), [N_NEW] * 3)
  full = _full_logits(params, prompts, out.tokens)
  for i, p in enumerate(prompts):
    # Step n's logits are the full forward's at the prefix's last token, prompt + n generated.
    want = full[i, len(p) - 1:len(p) - 1 + N_NEW]
    np.testing.assert_allclose(np.asarray(out.logits[i]), want, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(out.tokens[i]), want.argmax(-1))


def test_each_row_of_a_batch_gets_what_its_prompt_alone_gets(params):
  prompts = _prompts(1)
  keys = jax.random.split(jax.random.key(7), len(prompts))
  batch = _decode(params, prompts, return_logits=True)
  sampled = _decode(params, prompts, key=keys, temperature=1.0, top_p=0.9)
  for i, p in enumerate(prompts):
    alone = _decode(params, [p], return_logits=True)
    np.testing.assert_array_equal(np.asarray(batch.tokens[i]), np.asarray(alone.tokens[0]))
    np.testing.assert_allclose(np.asarray(batch.logits[i]), np.asarray(alone.logits[0]),
                               rtol=1e-4, atol=1e-4)
    # With one key per row, a row's samples depend on its own key only.
    one = _decode(params, [p], key=keys[i:i + 1], temperature=1.0, top_p=0.9)
    np.testing.assert_array_equal(np.asarray(sampled.tokens[i]), np.asarray(one.tokens[0]))


def test_right_padded_prompts_give_the_left_padded_result(params):
  prompts = _prompts(2)
  left = _decode(params, prompts, return_logits=True)
  toks = np.zeros((3, 8), np.int32)
  mask = np.zeros((3, 8), np.int32)
  for i, p in enumerate(prompts):
    toks[i, :len(p)], mask[i, :len(p)] = p, 1
  right = llama.decode(MODEL, params, jnp.asarray(toks), jnp.asarray(mask), max_new_tokens=N_NEW,
                       return_logits=True)
  np.testing.assert_array_equal(np.asarray(right.tokens), np.asarray(left.tokens))
  np.testing.assert_allclose(np.asarray(right.logits), np.asarray(left.logits), rtol=1e-4,
                             atol=1e-4)


def test_the_same_seed_gives_the_same_samples_another_seed_differs(params):
  prompts = _prompts(3)
  kw = dict(temperature=1.0, top_p=0.95)
  a = _decode(params, prompts, key=jax.random.key(1), **kw)
  b = _decode(params, prompts, key=jax.random.key(1), **kw)
  c = _decode(params, prompts, key=jax.random.key(2), **kw)
  greedy = _decode(params, prompts)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
  assert not np.array_equal(np.asarray(a.tokens), np.asarray(c.tokens))
  assert not np.array_equal(np.asarray(a.tokens), np.asarray(greedy.tokens))


def _nucleus(logits, temperature, top_p):
  """NumPy float64: the smallest set of tokens, most probable first, with probability >= top_p."""
  z = logits.astype(np.float64) / temperature
  p = np.exp(z - z.max())
  p /= p.sum()
  order = np.argsort(-p)
  before = np.cumsum(p[order]) - p[order]
  keep = order[before < top_p]
  return set(keep.tolist()), p, np.cumsum(p[order])


def test_top_p_draws_exactly_the_nucleus_with_its_renormalized_probabilities():
  rng = np.random.default_rng(5)
  draws = 20_000
  sample = jax.jit(llama.sample)
  for case in range(6):
    vocab = 12
    logits = rng.normal(size=vocab).astype(np.float32) * 2
    temperature = float(rng.uniform(0.5, 1.5))
    top_p = float(rng.uniform(0.3, 0.95))
    kept, p, cum = _nucleus(logits, temperature, top_p)
    # The case is unambiguous: no cumulative probability within float32 rounding of top_p.
    assert np.abs(cum - top_p).min() > 1e-4
    x = jnp.broadcast_to(jnp.asarray(logits), (draws, vocab))
    got = np.asarray(sample(x, jax.random.key(case), temperature=temperature, top_p=top_p))
    assert set(np.unique(got).tolist()) <= kept, (case, sorted(kept))
    freq = np.bincount(got, minlength=vocab) / draws
    want = np.zeros(vocab)
    idx = sorted(kept)
    want[idx] = p[idx] / p[idx].sum()
    np.testing.assert_allclose(freq, want, atol=4 * np.sqrt(0.25 / draws) + 1e-3)
    assert (freq[idx] > 0).all()  # every token of the nucleus is drawn


def test_temperature_to_zero_is_greedy(params):
  rng = np.random.default_rng(6)
  logits = jnp.asarray(rng.normal(size=(64, 50)).astype(np.float32))
  want = np.asarray(logits).argmax(-1)
  for t in (1e-3, 1e-5):
    got = llama.sample(logits, jax.random.key(3), temperature=t, top_p=0.9)
    np.testing.assert_array_equal(np.asarray(got), want)
  np.testing.assert_array_equal(np.asarray(llama.sample(logits, jax.random.key(3),
                                                        temperature=0.0)), want)
  prompts = _prompts(4)
  greedy = _decode(params, prompts, return_logits=True)
  top2 = np.sort(np.asarray(greedy.logits), -1)[..., -2:]
  assert (top2[..., 1] - top2[..., 0]).min() > 1e-4  # no near-tie that rounding could flip
  cold = _decode(params, prompts, key=jax.random.key(9), temperature=1e-6, top_p=0.9)
  np.testing.assert_array_equal(np.asarray(cold.tokens), np.asarray(greedy.tokens))


def test_stop_tokens_stop_each_row_at_its_first(params):
  prompts = _prompts(8)
  free = np.asarray(_decode(params, prompts).tokens)
  # Stop ids taken from the free run: the second token of row 0, the fourth of row 2.
  stops = [int(free[0, 1]), int(free[2, 3])]
  out = _decode(params, prompts, stop_ids=stops, pad_id=0)
  toks, lens = np.asarray(out.tokens), np.asarray(out.lengths)
  for i in range(len(prompts)):
    hits = [n for n in range(N_NEW) if free[i, n] in stops]
    want = hits[0] + 1 if hits else N_NEW  # up to and including the first stop token
    assert lens[i] == want, (i, lens, free, stops)
    np.testing.assert_array_equal(toks[i, :want], free[i, :want])
    assert (toks[i, want:] == 0).all()
  assert lens.min() < N_NEW  # some row stopped early
  # The list form strips the stop token.
  lists = llama.generate(MODEL, params, prompts, max_new_tokens=N_NEW, eos_id=stops, bucket=8)
  assert lists == [toks[i, :lens[i] - (toks[i, lens[i] - 1] in stops)].tolist()
                   for i in range(len(prompts))]


def test_jlora_tree_factored_and_merged_give_the_same_tokens(params):
  tree = randomize_b(jlora.apply(params, rank=4, targets="all-linear", stacked=r"^layers/"),
                     scale=0.3)
  factored = jlora.lora(MODEL.apply, strict=True)  # nothing materialized in the loop
  forward = lambda t, *args, **kw: factored({"params": t}, *args, **kw)  # noqa: E731

  prompts = _prompts(9)
  kw = dict(key=jax.random.key(4), temperature=0.8, top_p=0.9, return_logits=True)
  f = _decode(tree, prompts, forward=forward, **kw)
  m = _decode(jlora.merge(tree), prompts, **kw)
  np.testing.assert_array_equal(np.asarray(f.tokens), np.asarray(m.tokens))
  np.testing.assert_allclose(np.asarray(f.logits), np.asarray(m.logits), rtol=1e-4, atol=1e-4)
  base = _decode(params, prompts, **kw)
  assert np.abs(np.asarray(base.logits) - np.asarray(m.logits)).max() > 0.1  # adapters matter
  fg = _decode(tree, prompts, forward=forward)
  mg = _decode(jlora.merge(tree), prompts)
  np.testing.assert_array_equal(np.asarray(fg.tokens), np.asarray(mg.tokens))


def test_per_row_data_reaches_the_forward_through_params(params):
  # A per-example argument (e.g. an adapter index) rides in `params`, any tree the forward takes.
  def forward(p, tokens, attention_mask, cache):
    weights, row_bias = p
    logits, cache = MODEL.apply({"params": weights}, tokens, attention_mask, cache=cache)
    return logits + row_bias[:, None, :], cache

  favourite = np.array([17, 200, 3])
  bias = jnp.asarray(np.eye(CFG.vocab_size, dtype=np.float32)[favourite] * 1e4)
  out = _decode((params, bias), _prompts(10), forward=forward)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.repeat(favourite[:, None], N_NEW, 1))


def test_one_compilation_for_batches_of_one_padded_shape(params):
  traces = []

  def forward(p, tokens, attention_mask, cache):
    traces.append(tokens.shape)  # runs when traced, never when the compiled loop runs
    return MODEL.apply({"params": p}, tokens, attention_mask, cache=cache)

  outs = []
  for seed in range(4):
    prompts = _prompts(20 + seed, lens=(3 + seed, 7 - seed))
    outs.append(_decode(params, prompts, forward=forward, key=jax.random.key(seed),
                        temperature=0.5 + seed / 4, top_p=0.8,
                        stop_ids=list(range(100, 100 + 2 * seed))).tokens)  # 0 to 6 ids
  # Traced once: the prefill (2, 8) and the loop body's one-token step (2, 1), for 6 tokens.
  assert traces == [(2, 8), (2, 1)]
  assert len({np.asarray(o).tobytes() for o in outs}) == 4


def test_generate_lists_and_argument_errors(params):
  prompts = _prompts(12)
  out = _decode(params, prompts)
  lists = llama.generate(MODEL, params, prompts, max_new_tokens=N_NEW, eos_id=None, bucket=8)
  assert lists == np.asarray(out.tokens).tolist()
  with pytest.raises(ValueError, match="at least one token"):
    llama.generate(MODEL, params, [[5], []])
  with pytest.raises(ValueError, match="top_p=0.0"):
    llama.generate(MODEL, params, prompts, top_p=0.0)
  with pytest.raises(ValueError, match="temperature=-1"):
    llama.generate(MODEL, params, prompts, temperature=-1.0)
  with pytest.raises(ValueError, match="max_new_tokens=0"):
    llama.generate(MODEL, params, prompts, max_new_tokens=0)
  with pytest.raises(ValueError, match="one key per row"):
    _decode(params, prompts, key=jax.random.split(jax.random.key(0), 2))


@pytest.mark.slow
def test_smollm2_batched_generation(smollm2):
  tok, model, params = smollm2.tokenizer, smollm2.model, smollm2.params
  questions = ["What is the capital of France?", "Name a colour.",
               "Write one short sentence about the sea and the wind at night."]
  prompts = [tok.encode(llama.chatml(q)).ids for q in questions]
  assert len({len(p) for p in prompts}) == 3
  size = 32 * -(-max(len(p) for p in prompts) // 32)
  toks, mask = _left_pad(prompts, size)
  n = 24
  out = llama.decode(model, params, toks, mask, max_new_tokens=n, stop_ids=[2],
                     return_logits=True)
  lens = np.asarray(out.lengths)
  assert "Paris" in tok.decode(np.asarray(out.tokens[0, :lens[0]]).tolist())
  assert lens[1] < n and int(out.tokens[1, lens[1] - 1]) == 2  # a short answer ends at <|im_end|>
  # Every row against the training forward on its own prompt and tokens (float32 tolerance).
  apply = jax.jit(model.apply)
  for i, p in enumerate(prompts):
    seq = p + np.asarray(out.tokens[i, :lens[i]]).tolist()
    full = np.asarray(apply({"params": params}, jnp.asarray([seq]))[0])
    want = full[len(p) - 1:len(p) - 1 + lens[i]]
    np.testing.assert_allclose(np.asarray(out.logits[i, :lens[i]]), want, rtol=1e-3, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(out.tokens[i, :lens[i]]), want.argmax(-1))
  kw = dict(max_new_tokens=n, stop_ids=[2], temperature=0.7, top_p=0.9)
  a = llama.decode(model, params, toks, mask, key=jax.random.key(0), **kw)
  b = llama.decode(model, params, toks, mask, key=jax.random.key(0), **kw)
  np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
