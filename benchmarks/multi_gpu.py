"""Many adapters in one batch (jlora.stack / select): throughput against one adapter, same call.

  python benchmarks/multi_gpu.py train qv       # Gemma-2-2B shape, 16 rank-8 adapters on q,v
  python benchmarks/multi_gpu.py train all      # ... on every block kernel (all-linear)
  python benchmarks/multi_gpu.py decode         # Llama-3.2-1B shape, KV-cache decode

`train`: the benchmark model (benchmarks/gemma2_model.py, blocks under lax.scan, the table's
remat policy), batch 8 x 1024. Three rows: one adapter (a plain `jlora.apply` tree), and 16 adapters
stacked with each example routed to its own (ids drawn at random from 16, fresh per call): the
forward pass alone (`jax.jit(jlora.lora(loss))`) and the train step (`jlora.train_step`, AdamW, all
16 adapters trained on the mixed batch). The single adapter runs the same two. Adapters have
random non-zero `b`.
`decode`: recipes.models.llama at Llama-3.2-1B's shapes (16 layers, width 2048, 32/8 heads of 64,
MLP 8192, vocabulary 128,256, tied head; random bf16 weights), 16 prompts of 128 tokens, 128 new
tokens greedy (`llama.decode`, one jitted while loop), adapters r=8 on q,v factored through
`jlora.lora`: one adapter for all rows against 16 adapters (row i uses adapter i).
Prints one JSON row per configuration (tokens/s from the median of rounds; the spread).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_common as C  # noqa: E402
import gemma2_model as G  # noqa: E402

import jlora  # noqa: E402

N_ADAPTERS = 16


def adapters(params, n, rank, targets, stacked=None):
  out = []
  for i in range(n):
    t = jlora.apply(params, rank=rank, targets=targets, stacked=stacked, key=jax.random.key(i))
    trained = lambda x, i=i: dataclasses.replace(  # a random, non-zero b
        x, b=jax.random.normal(jax.random.key(100 + i), x.b.shape, x.b.dtype) * 0.01)
    out.append(jax.tree_util.tree_map(lambda x: trained(x) if jlora.is_lora(x) else x, t,
                                      is_leaf=jlora.is_lora))
  return out


def timed(fn, rounds, steps):
  t = C.time_steps(fn, lambda y: jax.block_until_ready(y), warmup=2, steps=steps, rounds=rounds)
  return t


def routes_for(batch: int, n: int, count: int, seed: int = 0) -> list:
  """`count` routings of `batch` examples over `n` adapters: random draws when the batch is
  smaller than `n`, else every adapter on batch/n examples, in a random order."""
  rng = np.random.default_rng(seed)
  if batch < n:
    return [rng.integers(0, n, (batch,)) for _ in range(count)]
  return [rng.permutation(np.tile(np.arange(n), -(-batch // n))[:batch]) for _ in range(count)]


def train(kind: str, tiny: bool, rounds: int, steps: int, batch_seq=None):
  cfg = G.tiny_config(layers="scan", remat="wide_mid_xa") if tiny else G.Gemma2Config(
      layers="scan", remat="wide_mid_xa", loss_math="pallas")
  batch, seq = batch_seq or ((4, 32) if tiny else (8, 1024))
  targets = None if kind == "qv" else "all-linear"
  params = G.init_params(cfg, jax.random.key(0))
  model = G.Gemma2(cfg)
  ids = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, cfg.vocab_size)
  loss = lambda p, ids: model.apply({"params": p}, ids[:, :-1], ids[:, 1:])
  trees = adapters(params, N_ADAPTERS, 8, targets, stacked=r"^layers/")
  single = trees[0]
  multi = jlora.stack(trees)
  del params
  routes = [jnp.asarray(r, jnp.int32) for r in routes_for(batch, N_ADAPTERS, 64)]
  rows = []
  f_single = jax.jit(jlora.lora(loss))
  f_multi = jax.jit(lambda t, r, ids: jlora.lora(loss)(jlora.select(t, r), ids))
  k = [0]

  def route():
    k[0] += 1
    return routes[k[0] % len(routes)]

  for name, fn in (("forward_single", lambda: f_single(single, ids)),
                   ("forward_16", lambda: f_multi(multi, route(), ids))):
    t = timed(fn, rounds, steps)
    rows.append(dict(name=f"{kind}_{name}", step_s=t["step_s"], step_s_rounds=t["step_s_rounds"],
                     tokens_s=round(batch * seq / t["step_s"]), batch=batch, seq=seq))
  s1 = jlora.train_step(jlora.lora(loss), optax.adamw(1e-4))
  sm = jlora.train_step(lambda t, r, ids: jlora.lora(loss)(jlora.select(t, r), ids),
                        optax.adamw(1e-4))
  for name, step, tree in (("train_single", s1, single), ("train_16", sm, multi)):
    box = [tree, step.init(tree)]
    multi_step = name.endswith("16")

    def one():
      args = (route(), ids) if multi_step else (ids,)
      box[0], box[1], value = step(box[0], box[1], *args)
      return value

    t = timed(one, rounds, steps)
    rows.append(dict(name=f"{kind}_{name}", step_s=t["step_s"], step_s_rounds=t["step_s_rounds"],
                     tokens_s=round(batch * seq / t["step_s"])))
  return rows


def decode(tiny: bool, rounds: int):
  from recipes.models import llama
  cfg = llama.LlamaConfig.tiny() if tiny else llama.LlamaConfig(
      vocab_size=128_256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
      num_kv_heads=8, head_dim=64, tie_word_embeddings=True, dtype=jnp.bfloat16,
      param_dtype=jnp.bfloat16)
  n, plen, new = (4, 8, 8) if tiny else (16, 128, 128)
  model = llama.Llama(cfg)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]
  leaves, treedef = jax.tree_util.tree_flatten(shapes)
  params = jax.tree_util.tree_unflatten(treedef, [
      (jax.random.normal(jax.random.key(i), s.shape, jnp.float32) * 0.02).astype(s.dtype)
      for i, s in enumerate(leaves)])
  trees = adapters(params, n, 8, None, stacked=r"^layers/")
  multi = jlora.select(jlora.stack(trees), jnp.arange(n, dtype=jnp.int32))
  prompts = jax.random.randint(jax.random.key(3), (n, plen), 1, cfg.vocab_size)
  mask = jnp.ones((n, plen), jnp.int32)
  f = jlora.lora(model.apply)
  fwd = lambda t, *a, **kw: f({"params": t}, *a, **kw)
  rows = []
  for name, tree in (("decode_single", trees[0]), ("decode_16", multi)):
    run = lambda: llama.decode(model, tree, prompts, mask, max_new_tokens=new, forward=fwd).tokens
    t = C.time_steps(run, jax.block_until_ready, warmup=1, steps=1, rounds=rounds)
    rows.append(dict(name=name, s=t["step_s"], s_rounds=t["step_s_rounds"],
                     new_tokens_s=round(n * new / t["step_s"]), prompts=n, prompt_len=plen,
                     new=new))
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("what", choices=("train", "decode"))
  p.add_argument("kind", nargs="?", default="qv", choices=("qv", "all"))
  p.add_argument("--tiny", action="store_true")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=8)
  p.add_argument("--batch", type=int, default=0, help="train: examples (default 8; 4 tiny)")
  p.add_argument("--seq", type=int, default=0, help="train: tokens per example (default 1024)")
  a = p.parse_args(argv)
  bs = (a.batch, a.seq) if a.batch else None
  rows = train(a.kind, a.tiny, a.rounds, a.steps, bs) if a.what == "train" else decode(a.tiny,
                                                                                          a.rounds)
  for r in rows:
    r.update(suite="jlora_multi", adapters=N_ADAPTERS, jax=jax.__version__,
             device=jax.devices()[0].device_kind, tiny=a.tiny)
    print(json.dumps(r), flush=True)


if __name__ == "__main__":
  main()
