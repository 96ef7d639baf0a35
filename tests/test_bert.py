"""recipes.models.bert: jlora's factored path on the encoder; in the slow lane, the demo model
itself (against a NumPy reference, the loader) and the real MiniLM."""

import doctest
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import jlora
from recipes.models import bert
from tests.helpers import rand, random_params


def _random_params(cfg, seed=0):
  """Every leaf random (numpy, not jax.random: no XLA compilation per leaf shape)."""
  ids = jnp.ones((1, 4), jnp.int32)
  shapes = jax.eval_shape(bert.Bert(cfg).init, jax.random.key(0), ids, ids)["params"]
  return random_params(shapes, seed)


def _to_hf(params):
  """Our tree -> HF names, torch (out, in) layout."""
  out = {}
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = [p.key for p in path]
    hf = bert._hf_name(tuple(names[:-1]))
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(names[-1], "bias")
    out[f"{hf}.{leaf}"] = np.ascontiguousarray(np.asarray(x).T if names[-1] == "kernel" else x)
  return out


def _reference(sd, cfg, ids, mask):
  """An independent NumPy BERT forward on an HF state dict."""
  g = lambda n: sd[n].astype(np.float64)

  def ln(x, p):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + cfg.layer_norm_eps) * g(p + ".weight") + g(p + ".bias")

  lin = lambda x, p: x @ g(p + ".weight").T + g(p + ".bias")
  t = ids.shape[1]
  x = (g("embeddings.word_embeddings.weight")[ids] + g("embeddings.position_embeddings.weight")[:t]
       + g("embeddings.token_type_embeddings.weight")[0])
  x = ln(x, "embeddings.LayerNorm")
  b, d, h = x.shape[0], cfg.hidden_size, cfg.num_heads
  erf = np.vectorize(math.erf)
  for i in range(cfg.num_layers):
    p = f"encoder.layer.{i}."
    split = lambda y: y.reshape(b, t, h, d // h).transpose(0, 2, 1, 3)
    q, k, v = (split(lin(x, p + f"attention.self.{n}")) for n in ("query", "key", "value"))
    s = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // h) + np.where(mask[:, None, None], 0, -1e30)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = (a @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
    x = ln(lin(o, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
    m = lin(x, p + "intermediate.dense")
    m = 0.5 * m * (1 + erf(m / math.sqrt(2)))
    x = ln(lin(m, p + "output.dense") + x, p + "output.LayerNorm")
  return x


@pytest.mark.slow  # the demo model's own behaviour
def test_forward_and_loader_match_numpy_reference(tmp_path):
  cfg = bert.BertConfig.tiny()
  params = _random_params(cfg, seed=2)
  sd = _to_hf(params)
  assert "encoder.layer.1.attention.self.query.weight" in sd
  save_file(sd, str(tmp_path / "model.safetensors"))
  hf_cfg = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                intermediate_size=cfg.intermediate_size,
                max_position_embeddings=cfg.max_position_embeddings, hidden_act="gelu")
  (tmp_path / "config.json").write_text(json.dumps(hf_cfg))
  cfg2, loaded = bert.from_safetensors(tmp_path)
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  ids = np.random.default_rng(3).integers(1, cfg.vocab_size, (2, 7)).astype(np.int32)
  mask = np.array([[1] * 7, [1] * 4 + [0] * 3])
  got = jax.jit(bert.Bert(cfg).apply)({"params": loaded}, ids, mask)
  want = _reference(sd, cfg, ids, mask)
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-4, atol=2e-4)


@pytest.mark.slow  # the demo model's own behaviour
def test_loader_errors_name_the_tensor(tmp_path):
  cfg = bert.BertConfig.tiny()
  sd = _to_hf(_random_params(cfg))
  del sd["encoder.layer.1.attention.self.value.bias"]
  save_file(sd, str(tmp_path / "model.safetensors"))
  with pytest.raises(KeyError, match="encoder.layer.1.attention.self.value.bias"):
    bert.from_safetensors(tmp_path / "model.safetensors", config=cfg)
  with pytest.raises(NotImplementedError, match="hidden_act"):
    bert.BertConfig.from_hf({"hidden_act": "relu"})


def test_lora_factored_equals_merged():
  cfg = bert.BertConfig.tiny()
  params = _random_params(cfg, seed=4)
  tree = jlora.apply(params, rank=2)
  trainable, frozen = jlora.split(tree)
  trainable = jax.tree.map(lambda x: rand(x.shape, seed=x.size, scale=0.3), trainable)
  tree = jlora.combine(trainable, frozen)
  ids = jnp.asarray(np.random.default_rng(5).integers(1, cfg.vocab_size, (2, 6)), jnp.int32)
  mask = jnp.ones((2, 6), jnp.int32)
  model = bert.Bert(cfg)
  merged = jax.jit(model.apply)({"params": jlora.merge(tree)}, ids, mask)
  factored = jax.jit(jlora.lora(model.apply, strict=True))({"params": tree}, ids, mask)
  np.testing.assert_allclose(np.asarray(factored), np.asarray(merged), rtol=1e-4, atol=1e-4)
  assert jlora.count(tree).trainable == 2 * 2 * (32 * 2 + 2 * 32)  # query, value x 2 layers


@pytest.mark.slow  # the demo model's own behaviour
def test_doctests():
  r = doctest.testmod(bert, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  assert r.attempted > 0 and r.failed == 0


@pytest.mark.slow
def test_minilm_sentence_similarity(minilm):
  s = ["A man is eating food.", "A man is eating a piece of bread.",
       "The stock market fell sharply today.", "A man is riding a horse."]
  ids, mask = bert.encode(minilm.tokenizer, s, 16)
  assert ids[0, 0] == minilm.tokenizer.token_to_id("[CLS]")
  h = jax.jit(minilm.model.apply)({"params": minilm.params}, ids, mask)
  e = np.asarray(bert.mean_pool(h, mask, normalize=True))
  sim = e @ e.T
  assert abs(sim[0, 1] - 0.755) < 0.01, sim[0, 1]  # all-MiniLM-L6-v2's known score
  assert sim[0, 1] > sim[0, 3] > sim[0, 2]
  # 22.7M less the unused pooler.
  assert sum(x.size for x in jax.tree.leaves(minilm.params)) == 22_565_376
