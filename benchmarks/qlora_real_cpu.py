"""QLoRA on the real SmolLM2-135M, CPU: what the two targets of tests/test_qlora_real.py reach.

The model is SmolLM2-135M-Instruct's Q4_1 GGUF dequantized to float32 (`llama.from_gguf`),
so its linear kernels already sit on a 4-bit grid (ggml Q4_1: blocks of 32 along the input
axis, an affine code). Two studies, on the same data and recipe as the slow-lane test:

A. Agreement. The next-token argmax of the model with a quantized base (all seven linear
   kernels of every block, `jlora.quantize(..., stacked="^layers/")`, run through
   `jlora.lora`) against the float model's, on the test's 510 positions (two held-out Folio
   Hamlet windows of 256 tokens). NF4 (the QLoRA code book, absmax per block) at block sizes
   64, 32 and 16, with and without double quantization, blocked along the output axis
   (jlora's layout: the last axis of flax's `(in, out)` kernel) and along the input axis (as
   bitsandbytes blocks `nn.Linear`'s `(out, in)` weight: quantize the transposes, keep `.mT`,
   as tests/test_qlora_real.py's bitsandbytes comparison does); int8 and fp8 at 64 and a
   bfloat16 cast for reference. Also the float model's top-1 probability on those positions,
   and the agreement split by it.

B. Fine-tune gap. The test's recipe (a bfloat16 copy of the weights, NF4 block 64 on every
   linear kernel for the QLoRA run, `jlora.apply(rank=8)` on q_proj and v_proj with
   `key=jax.random.key(0)`, `optax.adam(lr)`, `data.Batches(train, 2, 64, seed=0)`, held-out
   NLL on `data.eval_windows(test, 64, 8)`), both runs with the same steps and learning
   rate; the held-out NLL of both after each of `--checkpoints` steps (the learning rate is
   constant, so the run to 48 steps passes through the run to 8), for each of `--lrs`.

XLA runs with the test suite's settings (tests/conftest.py: no LLVM optimization passes, loop
emitters), so the figures are the ones the test sees.

Each invocation merges into `--out`: a part it skips (`--skip-agreement`, `--skip-fine-tune`)
and the fine-tune runs of another learning rate or target set stay as an earlier run left them,
and `invocations` lists every run's settings, versions and seconds. On 2 shared CPU cores part A
takes about 6 minutes and each 64-step fine-tune run (two bases) about 15.

Usage: python benchmarks/qlora_real_cpu.py [--out benchmarks/results/qlora_real_cpu.json]
         [--skip-agreement] [--skip-fine-tune] [--lrs 6e-3,1.2e-2] [--checkpoints 8,24,48]
         [--targets q_proj,v_proj|all-linear]
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests import cpu_settings  # noqa: E402

cpu_settings.set_xla_flags()  # the test suite's XLA settings, so the figures are the tests'

import argparse  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jlora  # noqa: E402
from recipes import data  # noqa: E402
from recipes.models import llama  # noqa: E402

cpu_settings.configure_jax()

STACKED = r"^layers/"
is_q = lambda x: isinstance(x, jlora.Quantized)


def load():
  """SmolLM2 (as tests/conftest.py's `smollm2`) and the Hamlet split (as the test's `hamlet`)."""
  config, params = llama.from_gguf()
  tok = llama.tokenizer_from_gguf()
  split = data.shakespeare_split(("hamlet",))
  train = data.tokenize_texts(list(split.train.values()), tok, eos_id=2)
  test = data.tokenize_texts(list(split.test.values()), tok, eos_id=2)
  return config, params, llama.Llama(config), train, test


def quantized(params, kind, block_size, axis, double_quant):
  """`params` with every block kernel quantized; `axis="in"` blocks along the input axis."""
  if axis == "out":
    return jlora.quantize(params, kind, block_size=block_size, stacked=STACKED,
                          double_quant=double_quant)
  flip = lambda x: jnp.swapaxes(x, -1, -2)
  transposed = {**params, "layers": jax.tree_util.tree_map_with_path(
      lambda p, x: flip(x) if p[-1].key == "kernel" else x, params["layers"])}
  q = jlora.quantize(transposed, kind, block_size=block_size, stacked=STACKED,
                     double_quant=double_quant)
  return jax.tree.map(lambda x: x.mT if is_q(x) else x, q, is_leaf=is_q)


def log_softmax(logits: np.ndarray) -> np.ndarray:
  z = logits - logits.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def study_agreement(params, model, test, block_sizes):
  """Part A: argmax agreement with the float model for each quantization setting."""
  passage = jnp.asarray(data.eval_windows(test, 256, 2))
  logits = np.asarray(jax.jit(model.apply)({"params": params}, passage), np.float64)[:, :-1]
  want = logits.argmax(-1).ravel()
  logp = log_softmax(logits)
  p = np.exp(logp)
  top = np.sort(p, -1)
  p1, p2 = top[..., -1].ravel(), top[..., -2].ravel()
  targets = np.asarray(passage)[:, 1:, None]

  def compare(got):
    """Agreement with the float argmax, held-out NLL and KL(float || quantized), per token."""
    logq = log_softmax(got)
    same = got.argmax(-1).ravel() == want
    return same, dict(agreement=round(float(same.mean()), 4),
                      nll=round(float(-np.mean(np.take_along_axis(logq, targets, -1))), 4),
                      kl_from_float=round(float(np.mean(np.sum(p * (logp - logq), -1))), 4))

  nll = float(-np.mean(np.take_along_axis(logp, targets, -1)))
  bins = [(0.0, 0.2), (0.2, 0.4), (0.4, 0.7), (0.7, 1.01)]
  float_model = dict(
      positions=int(want.size), nll=round(nll, 4),
      top1_prob=dict(median=round(float(np.median(p1)), 4),
                     quartiles=[round(float(q), 4) for q in np.quantile(p1, [0.25, 0.75])],
                     below_0_5=round(float(np.mean(p1 < 0.5)), 4)),
      top1_minus_top2_median=round(float(np.median(p1 - p2)), 4),
      argmax_is_next_token=round(float(np.mean(want == np.asarray(passage)[:, 1:].ravel())), 4))
  print("float model:", float_model, flush=True)

  factored = jax.jit(jlora.lora(model.apply))
  settings = [("nf4", b, axis, dq) for axis in ("out", "in") for b in block_sizes
              for dq in (False, True)]
  settings += [("int8", 64, "out", False), ("fp8", 64, "out", False)]
  rows = []
  for kind, b, axis, dq in settings:
    t0 = time.perf_counter()
    q = quantized(params, kind, b, axis, dq)
    assert sum(map(is_q, jax.tree.leaves(q, is_leaf=is_q))) == 7
    same, scores = compare(np.asarray(factored({"params": q}, passage), np.float64)[:, :-1])
    rows.append(dict(
        kind=kind, block_size=b, axis=axis, double_quant=dq, **scores,
        agreement_by_top1_prob={f"{lo:.1f}-{min(hi, 1.0):.1f}": [
            round(float(same[(p1 >= lo) & (p1 < hi)].mean()), 4),
            int(((p1 >= lo) & (p1 < hi)).sum())] for lo, hi in bins},
        bits_per_weight=round(8 * sum(x.nbytes for x in jax.tree.leaves(q, is_leaf=is_q)
                                      if is_q(x)) / sum(x.size for x in jax.tree.leaves(
                                          q, is_leaf=is_q) if is_q(x)), 3),
        seconds=round(time.perf_counter() - t0, 1)))
    print(rows[-1], flush=True)
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16).astype(jnp.float32), params)
  _, scores = compare(np.asarray(jax.jit(model.apply)({"params": bf16}, passage),
                                 np.float64)[:, :-1])
  rows.append(dict(kind="bfloat16 cast (all weights)", **scores))
  print(rows[-1], flush=True)
  return dict(float_model=float_model, settings=rows)


def study_fine_tune(params, model, train, test, checkpoints, lrs, targets_name):
  """Part B: held-out NLL of the bf16-base and the NF4-base LoRA after each checkpoint."""
  batches = data.Batches(train, 2, 64, seed=0)
  evals = jnp.asarray(data.eval_windows(test, 64, 8))
  forward = jlora.lora(model.apply)
  targets = None if targets_name == "q_proj,v_proj" else "all-linear"

  def loss_fn(tree, tokens):
    return llama.lm_loss(forward({"params": tree}, tokens), tokens)

  nll = jax.jit(loss_fn)
  runs = []
  for lr in lrs:
    curves, timing = {}, {}
    for name in ("bf16", "nf4"):
      t0 = time.perf_counter()
      base = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
      if name == "nf4":
        base = jlora.quantize(base, "nf4", stacked=STACKED)
      tree = jlora.apply(base, rank=8, targets=targets, stacked=STACKED, key=jax.random.key(0))
      curve = {0: float(nll(tree, evals))}
      step = jlora.train_step(loss_fn, optax.adam(lr))
      opt_state = step.init(tree)
      wall = cpu = 0.0
      for k in range(max(checkpoints)):
        t1, c1 = time.perf_counter(), time.process_time()
        tree, opt_state, loss = step(tree, opt_state, jnp.asarray(batches[k]))
        loss.block_until_ready()
        if k == 0:
          first = time.perf_counter() - t1
        else:  # the steps after the first (which compiles)
          wall, cpu = wall + time.perf_counter() - t1, cpu + time.process_time() - c1
        if k + 1 in checkpoints:
          curve[k + 1] = float(nll(tree, evals))
      curves[name] = curve
      n = max(max(checkpoints) - 1, 1)
      timing[name] = dict(total_s=round(time.perf_counter() - t0, 1), first_step_s=round(first, 1),
                          step_wall_s=round(wall / n, 2), step_cpu_s=round(cpu / n, 2))
      print(f"lr {lr} {targets_name} {name}: {curve} {timing[name]}", flush=True)
    runs.append(dict(lr=lr, targets=targets_name, rank=8, timing=timing, points=[
        dict(steps=k, bf16=round(curves["bf16"][k], 4), nf4=round(curves["nf4"][k], 4),
             gap=round(curves["nf4"][k] - curves["bf16"][k], 4))
        for k in sorted(curves["bf16"])]))
  return runs


def versions():
  names = ("jax", "jaxlib", "flax", "optax", "numpy", "gguf", "tokenizers")
  return dict(python=platform.python_version(), jlora=jlora.__version__,
              **{n: importlib.metadata.version(n) for n in names},
              cpu=platform.machine(), cores=os.cpu_count())


def merged(path: str, new: dict, invocation: dict) -> dict:
  """`new` with what an earlier run left in `path`: a part this run skipped, the fine-tune runs
  of other (lr, targets), and the earlier invocations (settings, versions, seconds)."""
  old = {}
  if path and os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
  invocations = old.get("invocations") or (
      [{k: old[k] for k in ("settings", "versions", "seconds")}] if "settings" in old else [])
  out = {**{k: v for k, v in old.items() if k in ("agreement", "fine_tune")}, **new}
  if "fine_tune" in new and "fine_tune" in old:
    key = lambda r: (r["lr"], r["targets"])
    done = {key(r) for r in new["fine_tune"]}
    out["fine_tune"] = sorted([r for r in old["fine_tune"] if key(r) not in done]
                              + new["fine_tune"], key=lambda r: (r["targets"], r["lr"]))
  return {**out, "invocations": invocations + [invocation]}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--out", default="benchmarks/results/qlora_real_cpu.json")
  p.add_argument("--block-sizes", default="64,32,16")
  p.add_argument("--checkpoints", default="8,16,24,32,48,64")
  p.add_argument("--lrs", default="6e-3,1.2e-2")
  p.add_argument("--targets", default="q_proj,v_proj", choices=("q_proj,v_proj", "all-linear"))
  p.add_argument("--skip-agreement", action="store_true")
  p.add_argument("--skip-fine-tune", action="store_true")
  args = p.parse_args()
  t0 = time.perf_counter()
  config, params, model, train, test = load()
  out = dict(model="SmolLM2-135M-Instruct Q4_1 GGUF, dequantized to float32")
  if not args.skip_agreement:
    out["agreement"] = study_agreement(params, model, test,
                                       [int(b) for b in args.block_sizes.split(",")])
  if not args.skip_fine_tune:
    out["fine_tune"] = study_fine_tune(params, model, train, test,
                                       sorted(int(k) for k in args.checkpoints.split(",")),
                                       [float(x) for x in args.lrs.split(",")], args.targets)
  this = dict(settings=vars(args), versions=versions(), seconds=round(time.perf_counter() - t0))
  out = merged(args.out, out, this)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)
      f.write("\n")
  print(json.dumps(out, indent=1))


if __name__ == "__main__":
  main()
