"""What every GPU benchmark script shares: the model shape, the FLOP model, the timing, the row.

Nothing here imports JAX or PyTorch, so the PEFT baseline does not load JAX and the
JAX scripts do not load PyTorch.

The model is Gemma 2 2B's shape (`GEMMA2_2B`, Hugging Face `Gemma2Config` names):
26 blocks, width 2304, 8 query and 4 key-value heads of 256, GeGLU width 9216,
a 256,000-token embedding tied to the output, final-logit soft-cap 30. `TINY` is
the same structure at CPU size (`gemma2_model.tiny_config`'s sizes), for `--tiny`.

Timing (`time_steps`), the same in every script: the first step (compilation
included) is timed apart, `warmup - 1` more steps run, then `rounds` rounds of
`steps` steps, each round between two device synchronizations; the median round
gives the step time. The data is one fixed random batch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any, Callable

GEMMA2_2B = dict(vocab_size=256_000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                 num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                 final_logit_softcapping=30.0, rope_theta=10_000.0, rms_norm_eps=1e-6)
TINY = dict(GEMMA2_2B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)
BATCH, SEQ = 8, 1024
TINY_BATCH, TINY_SEQ = 2, 32

# The two LoRA configurations of the table: rank and adapted projections (Hugging Face names).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIGS = {"qv4": (4, ("q_proj", "v_proj")), "all16": (16, PROJECTIONS)}

# The H200's bf16 matmul rate (8192^3 through JAX 0.11.2), the denominator of MFU.
PEAK_TFLOPS = float(os.environ.get("PEAK_TFLOPS", "779"))


def shape_of(tiny: bool) -> dict:
  """A copy of `TINY` or `GEMMA2_2B`."""
  return dict(TINY if tiny else GEMMA2_2B)


def batch_seq(args) -> tuple[int, int]:
  """`(batch, seq)`: the arguments' (default 8 x 1024), or 2 x 32 with `--tiny`."""
  return (TINY_BATCH, TINY_SEQ) if args.tiny else (args.batch, args.seq)


def num_params(s: dict) -> int:
  """All parameters (tied embedding once; four RMSNorms per block and the final one)."""
  d, f, hd = s["hidden_size"], s["intermediate_size"], s["head_dim"]
  h, kv = s["num_attention_heads"], s["num_key_value_heads"]
  block = d * (h + 2 * kv) * hd + h * hd * d + 3 * d * f + 4 * d
  return s["vocab_size"] * d + s["num_hidden_layers"] * block + d


def flops_per_token(s: dict, seq: int, full: bool = False) -> float:
  """The FLOP model: 4 x matmul parameters per token for LoRA (forward and activation
  gradients; the tied head counted once; 6 x for a full fine-tune), plus attention
  `3 x 4 x seq x heads x head_dim x layers` (scores and values, forward and backward,
  no causal discount). Gemma 2 2B at 1024 tokens: 11.11 GFLOP/token."""
  d, layers = s["hidden_size"], s["num_hidden_layers"]
  matmul = num_params(s) - (4 * layers + 1) * d
  attn = 4 * seq * s["num_attention_heads"] * s["head_dim"] * layers
  return (6 if full else 4) * matmul + 3 * attn


def mfu(tokens_s: float, s: dict, seq: int, full: bool = False) -> float:
  return round(tokens_s * flops_per_token(s, seq, full) / (PEAK_TFLOPS * 1e12), 3)


def add_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """The arguments every script takes: batch, timing, output, `--tiny`."""
  p.add_argument("--batch", type=int, default=BATCH)
  p.add_argument("--seq", type=int, default=SEQ)
  p.add_argument("--warmup", type=int, default=3, help="steps before timing (the first is "
                                                        "reported as compile_s)")
  p.add_argument("--steps", type=int, default=8, help="steps per timed round")
  p.add_argument("--rounds", type=int, default=3, help="timed rounds; the median is reported")
  p.add_argument("--out", default="", help="also append the JSON row to this file")
  p.add_argument("--tiny", action="store_true",
                 help=f"a CPU-sized model ({TINY['num_hidden_layers']} blocks, width "
                      f"{TINY['hidden_size']}), batch {TINY_BATCH} x {TINY_SEQ}: a dry run")
  return p


def add_attention_arg(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
  """`--attention cudnn|xla`: `jax.nn.dot_product_attention`'s implementation (the JAX scripts)."""
  p.add_argument("--attention", default=None, choices=("cudnn", "xla"),
                 help="jax.nn.dot_product_attention's implementation (default: cudnn on GPUs)")
  return p


def attention_of(args, backend: str) -> str:
  """The attention implementation: the argument's, else cuDNN on GPUs and XLA elsewhere."""
  return args.attention or ("cudnn" if backend == "gpu" else "xla")


def time_steps(step: Callable[[], Any], sync: Callable[[Any], Any], *, warmup: int, steps: int,
               rounds: int) -> dict:
  """Runs `step()` (which returns something `sync` waits on) as described in the module.

  Returns:
    `compile_s` (the first step), `step_s` (median seconds per step), `step_s_rounds`,
    and `first` and `last` (what the first and the last step returned: the loss, which
    shows that the steps train).
  """
  t0 = time.perf_counter()
  out = first = step()
  sync(out)
  compile_s = time.perf_counter() - t0
  for _ in range(max(warmup - 1, 0)):
    out = step()
  sync(out)
  per_round = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    for _ in range(steps):
      out = step()
    sync(out)
    per_round.append((time.perf_counter() - t0) / steps)
  return dict(compile_s=round(compile_s, 1), step_s=round(statistics.median(per_round), 4),
              step_s_rounds=[round(t, 4) for t in per_round], first=first, last=out)


def row(suite: str, name: str, timing: dict, *, batch: int, seq: int, shape: dict,
        full: bool = False, **fields) -> dict:
  """One result row: tokens/s and MFU from the median step time, the first and last
  step's loss, plus `fields` (peak memory, versions, ...)."""
  tok_s = batch * seq / timing["step_s"]
  return dict(suite=suite, name=name, **fields, batch=batch, seq=seq, step_s=timing["step_s"],
              step_s_rounds=timing["step_s_rounds"], tokens_s=round(tok_s),
              mfu=mfu(tok_s, shape, seq, full), compile_s=timing["compile_s"],
              loss_first=round(float(timing["first"]), 4), loss=round(float(timing["last"]), 4),
              tiny=shape["num_hidden_layers"] != GEMMA2_2B["num_hidden_layers"],
              python=platform.python_version())


def emit(r: dict, out: str = "") -> dict:
  """Prints the row as one JSON line (run_gpu.sh collects those) and appends it to `out`."""
  line = json.dumps(r)
  print(line, flush=True)
  if out:
    with open(out, "a") as f:
      f.write(line + "\n")
  return r


# --------------------------------------------------------------------------- a capped allocator


def fit_and_time(row: dict, step: Callable[[], Any], *, batch: int, seq: int, steps: int,
                 rounds: int) -> dict:
  """Fills `row` for one batch size under a capped allocator: `step()` runs one training step
  and returns its loss; the first call compiles, then `rounds` rounds of `steps`. An
  out-of-memory error is recorded (`fits: False`), any other error raised. Adds the peak bytes
  in use."""
  import jax
  try:
    t0 = time.perf_counter()
    row["first_loss"] = float(step())
    row["compile_and_first_step_s"] = round(time.perf_counter() - t0, 1)
    times = []
    for _ in range(rounds):
      t0 = time.perf_counter()
      for _ in range(steps):
        loss = step()
      loss.block_until_ready()
      times.append((time.perf_counter() - t0) / steps)
    row["last_loss"] = float(loss)
    row["step_s_rounds"] = [round(t, 4) for t in times]
    row["step_s_median"] = round(statistics.median(times), 4)
    row["tokens_per_s"] = round(batch * seq / statistics.median(times))
    row["fits"] = True
  except Exception as e:  # XlaRuntimeError RESOURCE_EXHAUSTED: does not fit
    msg = str(e)
    if "RESOURCE_EXHAUSTED" not in msg and "out of memory" not in msg.lower():
      raise
    row["fits"] = False
    row["error"] = msg.splitlines()[0][:300]
  stats = jax.devices()[0].memory_stats() or {}
  row["peak_bytes"] = stats.get("peak_bytes_in_use")
  row["peak_gib"] = round(row["peak_bytes"] / 2**30, 2) if row["peak_bytes"] else None
  return row


def capped_env(cap_bytes: float) -> dict:
  """The environment for a child process whose JAX allocator holds `cap_bytes` of the GPU
  (preallocated, so nothing beyond the cap can be used)."""
  import subprocess
  total = int(subprocess.run(["nvidia-smi", "--query-gpu=memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True,
                             check=True).stdout.split()[0]) * 2**20
  return {**os.environ, "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{cap_bytes / total:.4f}",
          "XLA_PYTHON_CLIENT_PREALLOCATE": "true", "PYTHONUNBUFFERED": "1"}


def each_size(script: str, sizes, args: list, env: dict) -> list:
  """Runs `script --one BATCH SEQ *args` per size, each in its own process (so each peak is its
  own), until one does not fit; returns the JSON rows they print (printing each)."""
  import subprocess
  import sys
  rows = []
  for batch, seq in sizes:
    p = subprocess.run([sys.executable, script, "--one", str(batch), str(seq), *args], env=env,
                       capture_output=True, text=True)
    lines = [line for line in p.stdout.splitlines() if line.startswith("{")]
    row = json.loads(lines[-1]) if lines else dict(batch=batch, seq=seq, fits=False,
                                                   error=p.stderr[-800:])
    print(json.dumps(row), flush=True)
    rows.append(row)
    if not row.get("fits"):
      break
  return rows
