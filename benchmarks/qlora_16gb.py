"""QLoRA on 16 GB: an 8B-shaped model with an NF4 base, trained with the allocator capped at 16 GB.

The model is the benchmark's Gemma-2 block structure (benchmarks/gemma2_model.py) at
Llama-3.1-8B's shapes: 32 layers, width 4096, 32 query and 8 key/value heads of 128, MLP 14,336,
vocabulary 128,256, no logit soft-caps; random weights. Its head is tied to the embedding, so it
has 7.50 B parameters where Llama-3.1-8B (untied) has 8.03 B. Every block's seven kernels are NF4
with double quantization (`jlora.quantize`, drawn and quantized one layer at a time, so no float
copy of the stack exists), LoRA r=16 (alpha 16) on all of them (`jlora.apply(...,
"all-linear", stacked=...)`), `jlora.lora` + `jlora.train_step` with AdamW, the layers under
`lax.scan` with each block rematerialized (nothing saved), the chunked fused loss. Each batch x
sequence runs in its own process with `XLA_PYTHON_CLIENT_MEM_FRACTION` = 16e9 / the card's memory
(preallocated: nothing beyond the cap can be used). Records per size: fits or out of memory, the
peak bytes in use, the step time (median of rounds) and tokens/s, as JSON lines and in --out.

  python benchmarks/qlora_16gb.py --out benchmarks/results/qlora_16gb.json

A GPU is not a TPU: treat the margin, not the last byte, as the claim.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_common as C  # noqa: E402

CAP_BYTES = 16e9
SIZES = [(1, 2048), (2, 2048), (4, 2048), (8, 2048), (16, 2048)]


def config(tiny: bool):
  import gemma2_model as G
  if tiny:
    return G.tiny_config(layers="scan", remat="nothing", final_logit_cap=None,
                         attn_logit_cap=None)
  return G.Gemma2Config(vocab_size=128_256, width=4096, num_layers=32, num_heads=32,
                        num_kv_heads=8, head_dim=128, ffw_width=14_336, final_logit_cap=None,
                        attn_logit_cap=None, layers="scan", remat="nothing", loss_chunk=2048,
                        attention="cudnn", loss_math="exp")


def init_quantized(cfg, key, block_size: int):
  """Random parameters, every stacked kernel drawn and NF4-quantized one layer at a time."""
  import gemma2_model as G
  import jax
  import jax.numpy as jnp

  import jlora
  quant = jax.jit(lambda k, shape, std: jlora.quantize(
      {"k": (jax.random.normal(k, shape, jnp.float32) * std).astype(cfg.dtype)}, "nf4",
      targets="k", block_size=block_size, double_quant=True)["k"], static_argnums=(1, 2))

  def kernel_fn(name, k, s, std):  # a (layers, ...) kernel: a layer at a time, codes stacked
    per = [quant(jax.random.fold_in(k, j), s.shape[1:], std) for j in range(s.shape[0])]
    q = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per)
    return jax.block_until_ready(dataclasses.replace(q, stack=1))

  return G.init_params(cfg, key, kernel_fn)


def one(batch: int, seq: int, rank: int, steps: int, rounds: int, tiny: bool) -> dict:
  import gemma2_model as G
  import jax
  import numpy as np
  import optax

  import jlora
  cfg = config(tiny)
  row = dict(batch=batch, seq=seq, rank=rank, jax=jax.__version__,
             device=str(jax.devices()[0].device_kind), cap_bytes=CAP_BYTES,
             limit_bytes=(jax.devices()[0].memory_stats() or {}).get("bytes_limit"),
             params=cfg.num_params)
  t0 = time.perf_counter()
  params = init_quantized(cfg, jax.random.key(0), 16 if tiny else 64)
  tree = jlora.apply(params, rank=rank, targets="all-linear", stacked=r"^layers/")
  row["init_s"] = round(time.perf_counter() - t0, 1)
  row["trainable"] = jlora.count(tree).trainable
  leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, jlora.Quantized))
  row["base_bytes"] = sum(x.nbytes for x in leaves)
  model = G.Gemma2(cfg)
  loss_fn = jlora.lora(lambda p, ids: model.apply({"params": p}, ids[:, :-1], ids[:, 1:]))
  step = jlora.train_step(loss_fn, optax.adamw(1e-4))
  opt_state = step.init(tree)
  ids = jax.numpy.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, seq + 1)))
  state = [tree, opt_state]

  def one_step():
    state[0], state[1], loss = step(state[0], state[1], ids)
    return loss

  return C.fit_and_time(row, one_step, batch=batch, seq=seq, steps=steps, rounds=rounds)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="benchmarks/results/qlora_16gb.json")
  ap.add_argument("--rank", type=int, default=16)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--sizes", default=",".join(f"{b}x{s}" for b, s in SIZES))
  ap.add_argument("--tiny", action="store_true", help="a CPU-sized dry run, uncapped")
  ap.add_argument("--one", nargs=2, type=int, metavar=("BATCH", "SEQ"), help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  if a.one:
    print(json.dumps(one(*a.one, a.rank, a.steps, a.rounds, a.tiny)), flush=True)
    return
  env = {**os.environ, "PYTHONUNBUFFERED": "1"} if a.tiny else C.capped_env(CAP_BYTES)
  sizes = [tuple(map(int, size.split("x"))) for size in a.sizes.split(",")]
  rows = C.each_size(__file__, sizes, ["--rank", str(a.rank), "--steps", str(a.steps),
                                       "--rounds", str(a.rounds)] + (["--tiny"] if a.tiny else []),
                     env)
  fit = [r for r in rows if r.get("fits")]
  result = dict(
      what="QLoRA under a 16 GB allocator cap: Gemma-2 blocks at Llama-3.1-8B's shapes (tied "
           "head: 7.50 B parameters), NF4 base with double quantization on every block's seven "
           "kernels, LoRA r=16 on all of them, scanned layers rematerialized, AdamW",
      python=platform.python_version(), rows=rows,
      largest_fit=max(fit, key=lambda r: r["batch"] * r["seq"]) if fit else None)
  os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(result, f, indent=1)
    f.write("\n")


if __name__ == "__main__":
  main()
