"""CPU micro-benchmark: factored (`jlora.lora`) vs merge path, all-linear LoRA r=16.

A small pre-norm transformer block stack (Flax Linen, layers in `nn.scan`), every
linear layer adapted (q, k, v, o, gate, up, down) with rank 16, AdamW through
`jlora.train_step`. Two ways to run the model inside the loss:

* factored: `jlora.lora(model.apply)` — x·W + s·((x·A)·B);
* merge:    `model.apply(jlora.merge(tree))` — W + s·A·B formed every step, so the
  backward forms the full weight gradient x^T·dy of every adapted matrix.

Reported per path: step time (median of --repeats timed runs of --steps steps,
after a warm-up), and the compiled step's temporary memory from XLA's memory
analysis (deterministic; the peak working set beyond arguments and outputs).

Usage: python benchmarks/lora_cpu.py [--out benchmarks/results/lora_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jlora


class Block(nn.Module):
  width: int
  heads: int
  ffn: int

  @nn.compact
  def __call__(self, x, _):
    hd = self.width // self.heads
    h = nn.RMSNorm(name="attn_norm")(x)
    q = nn.Dense(self.width, use_bias=False, name="q_proj")(h)
    k = nn.Dense(self.width, use_bias=False, name="k_proj")(h)
    v = nn.Dense(self.width, use_bias=False, name="v_proj")(h)
    sh = lambda t: t.reshape(t.shape[:-1] + (self.heads, hd))
    att = jax.nn.dot_product_attention(sh(q), sh(k), sh(v), is_causal=True)
    x = x + nn.Dense(self.width, use_bias=False, name="o_proj")(att.reshape(x.shape))
    h = nn.RMSNorm(name="mlp_norm")(x)
    g = nn.Dense(self.ffn, use_bias=False, name="gate_proj")(h)
    u = nn.Dense(self.ffn, use_bias=False, name="up_proj")(h)
    x = x + nn.Dense(self.width, use_bias=False, name="down_proj")(nn.silu(g) * u)
    return x, None


class Stack(nn.Module):
  vocab: int = 2048
  width: int = 256
  heads: int = 4
  ffn: int = 1024
  layers: int = 4

  @nn.compact
  def __call__(self, ids):
    emb = nn.Embed(self.vocab, self.width, name="embed_tokens")
    x = emb(ids)
    blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=self.layers)
    x, _ = blocks(self.width, self.heads, self.ffn, name="layers")(x, None)
    return emb.attend(nn.RMSNorm(name="norm")(x))


def make_step(model, path):
  def loss_fn(tree, ids):
    if path == "factored":
      run = jlora.lora(model.apply, strict=True)
    else:
      run = lambda v, i: model.apply({"params": jlora.merge(v["params"])}, i)
    logits = run({"params": tree}, ids[:, :-1])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], -1))

  return jlora.train_step(loss_fn, optax.adamw(1e-3))


def bench(path, args):
  model = Stack(layers=args.layers, width=args.width, ffn=4 * args.width)
  ids = jax.random.randint(jax.random.key(1), (args.batch, args.seq + 1), 0, model.vocab)
  params = model.init(jax.random.key(0), ids[:, :-1])["params"]
  tree = jlora.apply(params, rank=args.rank, targets="all-linear", stacked=r"^layers/")
  step = make_step(model, path)
  state = step.init(tree)
  compiled = step.lower(tree, state, ids).compile()
  mem = compiled.memory_analysis()
  temp = int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else None
  for _ in range(2):  # warm-up
    tree, state, loss = step(tree, state, ids)
  loss.block_until_ready()
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    for _ in range(args.steps):
      tree, state, loss = step(tree, state, ids)
    loss.block_until_ready()
    times.append((time.perf_counter() - t0) / args.steps)
  c = jlora.count(tree)
  return dict(path=path, step_s_median=statistics.median(times), step_s_all=times,
              temp_bytes=temp, final_loss=float(loss), trainable=c.trainable, total=c.total)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--width", type=int, default=256)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--out", default=None)
  args = ap.parse_args()
  rows = []
  for rnd in range(2):  # interleave the two paths twice to even out machine noise
    for path in ("factored", "merge"):
      r = bench(path, args)
      r["round"] = rnd
      rows.append(r)
      print(f"round {rnd} {path:9s} step {r['step_s_median'] * 1e3:8.1f} ms  "
            f"temp {r['temp_bytes'] / 2**20:8.1f} MiB  loss {r['final_loss']:.4f}", flush=True)
  med = {p: statistics.median(x["step_s_median"] for x in rows if x["path"] == p)
         for p in ("factored", "merge")}
  mem = {p: max(x["temp_bytes"] for x in rows if x["path"] == p) for p in ("factored", "merge")}
  summary = dict(
      config=vars(args), jax=jax.__version__, cpu=platform.processor() or platform.machine(),
      cores=os.cpu_count(), trainable=rows[0]["trainable"], total=rows[0]["total"],
      step_ms_median={p: 1e3 * v for p, v in med.items()},
      speedup_factored_over_merge=med["merge"] / med["factored"],
      temp_mib={p: v / 2**20 for p, v in mem.items()},
      memory_ratio_factored_over_merge=mem["factored"] / mem["merge"], runs=rows)
  print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=1))
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(summary, f, indent=1)


if __name__ == "__main__":
  main()
