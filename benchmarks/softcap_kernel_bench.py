"""Times the loss's soft-cap pass over one chunk of logits: Pallas tiles and warps, and XLA.

One chunk of the q,v benchmark's loss is a (4096 x 256,000) bf16 logits block.
`gemma2_model.softcap_terms` reads it once and writes `u` (bf16) and partial row
sums: 2 x 2.1 GB moved, so at the device's copy bandwidth (measured here with
`z * 2`, which moves the same bytes) the floor is about 1 ms. Each variant is
checked against the XLA (`"exp"`) form on fresh random logits, then timed: rounds
of `--calls` launches alternating between two input sets (each far larger than
the L2 cache), one synchronization per round, the median round reported.

Usage (GPU): python benchmarks/softcap_kernel_bench.py [--rows 4096] [--out results.jsonl]
Prints a table, fastest first, and one JSON row per variant.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gemma2_model as G  # noqa: E402

CAP = 30.0
VARIANTS = [(bm, bv, w) for bm, bv in [(8, 1024), (16, 1024), (32, 1024), (4, 2048), (8, 2048),
                                        (16, 2048), (32, 2048), (16, 512), (32, 512), (64, 512),
                                        (64, 256)]
            for w in (4, 8)] + [(8, 1024, 2), (4, 1024, 2), (4, 1024, 4), (2, 2048, 4)]


def timed(fn, inputs, calls: int, rounds: int) -> float:
  out = None
  for z in inputs:  # compile and warm up
    out = fn(z)
  jax.block_until_ready(out)
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    for i in range(calls):
      out = fn(inputs[i % len(inputs)])
    jax.block_until_ready(out)
    times.append((time.perf_counter() - t0) / calls)
  return statistics.median(times)


def rel(a, b) -> float:
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--rows", type=int, default=4096)
  p.add_argument("--vocab", type=int, default=256_000)
  p.add_argument("--calls", type=int, default=10)
  p.add_argument("--rounds", type=int, default=7)
  p.add_argument("--out", default="")
  args = p.parse_args(argv)
  m, v = args.rows, args.vocab
  keys = jax.random.split(jax.random.key(0), 3)
  # Logits of the spread a random-init model gives, plus a few far past the cap.
  mk = lambda k: (jax.random.normal(k, (m, v), jnp.float32) * 8.0).astype(jnp.bfloat16)
  inputs = [jax.jit(mk)(k) for k in keys[:2]]
  check = jax.jit(mk)(keys[2]).at[0, :8].set(jnp.array([300, -300, 90, -90, 45, -45, 0.5, 0],
                                                       jnp.bfloat16))
  nbytes = 2 * m * v * 2  # read z (bf16), write u (bf16); the partial sums are negligible

  xla = jax.jit(lambda z: G._softcap_sum_and_u(z, CAP, "exp", jnp.bfloat16, True))
  ref_z, ref_u = xla(check)
  rows = []

  def record(name, fn, **kw):
    try:
      got_z, got_u = fn(check)
      err_u, err_z = rel(got_u, ref_u), rel(got_z, ref_z)
      finite = bool(jnp.isfinite(got_u).all() & jnp.isfinite(got_z).all())
      ok = finite and err_u < 1e-2 and err_z < 1e-4
      s = timed(fn, inputs, args.calls, args.rounds)
    except Exception as e:  # a tile Triton cannot compile: record why, keep going
      rows.append(dict(variant=name, error=f"{type(e).__name__}: {str(e)[:200]}", **kw))
      print(json.dumps(rows[-1]), flush=True)
      return
    rows.append(dict(variant=name, ms=round(s * 1e3, 4), tb_s=round(nbytes / s / 1e12, 3),
                     rel_err_u=err_u, rel_err_z=err_z, ok=ok, **kw))
    print(json.dumps(rows[-1]), flush=True)

  copy = jax.jit(lambda z: z * 2)
  s = timed(copy, inputs, args.calls, args.rounds)
  rows.append(dict(variant="copy z*2 (ceiling)", ms=round(s * 1e3, 4),
                   tb_s=round(nbytes / s / 1e12, 3), ok=True))
  print(json.dumps(rows[-1]), flush=True)
  record("xla exp (two passes)", xla)
  for bm, bv, w in VARIANTS:
    fn = jax.jit(lambda z, bm=bm, bv=bv, w=w: tuple(reversed(
        G.softcap_terms(z, CAP, block=(bm, bv), num_warps=w))))
    record(f"pallas {bm}x{bv} w{w}", fn, block=[bm, bv], num_warps=w)

  if args.out:
    with open(args.out, "a") as f:
      for r in rows:
        f.write(json.dumps(dict(r, suite="softcap_kernel", rows=m, vocab=v,
                                device=jax.devices()[0].device_kind, jax=jax.__version__)) + "\n")
  timed_rows = sorted((r for r in rows if "ms" in r), key=lambda r: r["ms"])
  print(f"\n{'variant':28s} {'ms':>8s} {'TB/s':>6s}  ok")
  for r in timed_rows:
    print(f"{r['variant']:28s} {r['ms']:8.3f} {r['tb_s']:6.2f}  {r['ok']}")


if __name__ == "__main__":
  main()
