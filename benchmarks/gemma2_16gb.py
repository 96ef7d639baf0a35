"""Does the Gemma notebook's real training step fit one 16 GB TPU v5e? Measured on a GPU, capped.

The free Colab TPU runtime is one v5e chip with 16 GB of HBM. This runs the notebook's exact
training step — keras-hub's `GemmaBackbone` with the `gemma2_2b_en` architecture in bfloat16
(random weights: no download), built inside `gemma.remat_scope` (each decoder block
rematerialized), `jlora.apply(rank=4, layout="keras")` on query and value, `jlora.train_step`
with AdamW and `gemma.lm_loss` (the tied head and the final soft cap in 512-token chunks) —
with JAX's allocator capped at 16 GB (`XLA_PYTHON_CLIENT_MEM_FRACTION` = 16e9 / the card's
memory; preallocated, so nothing beyond the cap can be used), for growing batch × sequence
sizes, each in its own process. Records per size: fits or out of memory, the peak bytes in
use, the step time (median of rounds) and tokens/s, as JSON lines on stdout and in --out.

  python benchmarks/gemma2_16gb.py --out benchmarks/results/gemma2_16gb.json

A GPU is not a TPU: XLA's TPU backend lays out and fuses differently, so treat the margin, not
the last byte, as the claim.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common as C  # noqa: E402

CAP_BYTES = 16e9
SIZES = [(8, 512), (8, 1024), (16, 1024), (32, 1024)]


def one(batch: int, seq: int, rank: int, steps: int, rounds: int) -> dict:
  """One configuration, in this process (the allocator cap must be set before jax starts)."""
  os.environ.setdefault("KERAS_BACKEND", "jax")
  import jax
  import jax.numpy as jnp
  import keras
  import keras_hub
  import numpy as np
  import optax

  import jlora
  import jlora.keras as jk
  from recipes.models import gemma

  row = dict(batch=batch, seq=seq, rank=rank, jax=jax.__version__, keras=keras.__version__,
             keras_hub=keras_hub.__version__, device=str(jax.devices()[0].device_kind),
             cap_bytes=CAP_BYTES,
             limit_bytes=(jax.devices()[0].memory_stats() or {}).get("bytes_limit"))
  cfg = gemma.config("gemma2_2b_en")
  t0 = time.perf_counter()
  keras.utils.set_random_seed(0)
  with gemma.remat_scope(cfg):
    backbone = keras_hub.models.GemmaBackbone(**cfg.backbone_kwargs(dtype="bfloat16"))
  row["build_s"] = round(time.perf_counter() - t0, 1)
  params = jk.params(backbone, copy=False)
  forward = jk.apply_fn(backbone)
  tree = jlora.apply(params, rank=rank, layout="keras", key=jax.random.key(0))
  row["trainable"] = jlora.count(tree).trainable
  row["weight_bytes"] = sum(x.nbytes for x in jax.tree.leaves(params))

  def loss_fn(tree, x, y, w):
    hidden = forward(tree, x)
    return gemma.lm_loss(hidden, tree["token_embedding/embeddings"], y, w,
                         soft_cap=cfg.final_logit_soft_cap)

  step = jlora.train_step(loss_fn, optax.adamw(2e-4, weight_decay=0.01))
  opt_state = step.init(tree)
  rng = np.random.default_rng(0)
  ids = rng.integers(3, cfg.vocabulary_size, (batch, seq + 1)).astype(np.int32)
  x = {"token_ids": jnp.asarray(ids[:, :-1]), "padding_mask": jnp.ones((batch, seq), jnp.int32)}
  y, w = jnp.asarray(ids[:, 1:]), jnp.ones((batch, seq), jnp.float32)
  state = [tree, opt_state]

  def one_step():
    state[0], state[1], loss = step(state[0], state[1], x, y, w)
    return loss

  return C.fit_and_time(row, one_step, batch=batch, seq=seq, steps=steps, rounds=rounds)


def main(argv=None) -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", default="benchmarks/results/gemma2_16gb.json")
  ap.add_argument("--rank", type=int, default=4)
  ap.add_argument("--steps", type=int, default=4)
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--one", nargs=2, type=int, metavar=("BATCH", "SEQ"), help=argparse.SUPPRESS)
  a = ap.parse_args(argv)
  if a.one:
    print(json.dumps(one(*a.one, a.rank, a.steps, a.rounds)), flush=True)
    return
  env = C.capped_env(CAP_BYTES)
  rows = C.each_size(__file__, SIZES, ["--rank", str(a.rank), "--steps", str(a.steps),
                                       "--rounds", str(a.rounds)], env)
  for row in rows:
    row["mem_fraction"] = float(env["XLA_PYTHON_CLIENT_MEM_FRACTION"])
  fit = [r for r in rows if r.get("fits")]
  result = dict(
      what="the Gemma notebook's real training step (gemma2_2b_en shape, bf16, LoRA r=4 on q,v, "
           "per-block remat, chunked tied-head loss, AdamW) under a 16 GB allocator cap",
      python=platform.python_version(), rows=rows,
      largest_fit=max(fit, key=lambda r: r["batch"] * r["seq"]) if fit else None)
  os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
  with open(a.out, "w") as f:
    json.dump(result, f, indent=1)
    f.write("\n")


if __name__ == "__main__":
  main()
