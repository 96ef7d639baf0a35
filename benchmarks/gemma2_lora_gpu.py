"""jlora training throughput on a Gemma-2-2B-shaped model, one configuration per process.

Usage (from the repository root):

  python benchmarks/gemma2_lora_gpu.py CONFIG [--remat wide_mid_xa] [--loss-math pallas]
      [--chunk 4096] [--layers unstacked] [--fold auto|bytes|never|always] [--rope-autodiff]
      [--tag TAG]
      [--long-round 20] [--xla-analysis] [--profile --profile-out prof.jsonl --hlo-out hlo.txt.gz]
      [--warmup 3 --steps 8 --rounds 3] [--out results.jsonl] [--tiny]
  python benchmarks/gemma2_lora_gpu.py peak      # the bf16 matmul rate, for MFU

CONFIG is one of:
  qv4          r=4 on q_proj, v_proj (jlora.apply's default targets), factored through jlora.lora
  all16        r=16 on all seven projections ("all-linear"), factored
  qv4_merge    r=4 q,v, the merge path: the loss runs on jlora.merge(tree)
  all16_merge  r=16 all-linear, merge path
  full         full fine-tune (plain optax.adamw on the bf16 weights, no jlora)

The model is benchmarks/gemma2_model.py: random init, bf16, batch 8 x 1024, cuDNN
flash attention without the attention-logit soft-cap, 26 separate blocks
(`--layers scan` stacks them for one `nn.scan`). The defaults are the table's
configuration: remat `wide_mid_xa`, RoPE's gradient as one rotation, and the fused
chunked soft-cap cross-entropy with its terms in one Pallas pass; `--chunk 0` is
the plain loss (full float32 logits, `log_softmax`), `--rope-autodiff` autodiff's
RoPE gradient, `--remat` the other policies (gemma2_model.REMAT_POLICIES).

LoRA configurations go through the public API only: `jlora.apply(params, rank,
targets=...)` (plus `stacked=r"^layers/"` for the stacked layouts), `jlora.lora(loss)`
and `jlora.train_step(loss, optax.adamw(1e-4))`. Timing is bench_common's (the
baselines' too): 3 warm-up steps, 3 rounds of 8 steps between synchronizations, the
median round. Each run prints one JSON row (tokens/s, peak device memory, MFU) and
appends it to `--out`. Peak memory is the device allocator's `peak_bytes_in_use`, so
run each configuration in its own process (benchmarks/run_gpu.sh does).

MFU uses bench_common's FLOP model: 4 x (matmul parameters, tied head counted once)
per token plus attention 3 x 4 x seq x heads x head_dim x layers; the full fine-tune
row also reports `mfu_6n` with 6 x parameters.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import functools
import glob
import gzip
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_common as C  # noqa: E402
import gemma2_model as G  # noqa: E402

import jlora  # noqa: E402

PEAK_FLOPS = C.PEAK_TFLOPS * 1e12
CONFIGS = {
    "qv4": dict(rank=4, targets=None, mode="fact"),
    "all16": dict(rank=16, targets="all-linear", mode="fact"),
    "qv4_merge": dict(rank=4, targets=None, mode="merge"),
    "all16_merge": dict(rank=16, targets="all-linear", mode="merge"),
    "full": dict(rank=0, targets=None, mode="full"),
}


def flops_per_token(cfg: G.Gemma2Config, seq: int, full: bool = False) -> float:
  attn = 4 * seq * cfg.num_heads * cfg.head_dim * cfg.num_layers
  return (6 if full else 4) * cfg.matmul_params + 3 * attn


def build_step(cfg: G.Gemma2Config, spec: dict, params, lr: float = 1e-4, fold: str = "auto",
               dora: bool = False):
  """Returns `(step, state, trainable_count, jitted)`; `step(state, ids) -> (state, loss)`.

  `fold` is `jlora.lora`'s (the factored configurations only).
  """
  model = G.Gemma2(cfg)

  def model_loss(p, ids):
    return model.apply({"params": p}, ids[:, :-1], ids[:, 1:])

  tx = optax.adamw(lr)
  if spec["mode"] == "full":
    opt_state = tx.init(params)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def full_step(p, s, ids):
      loss, g = jax.value_and_grad(model_loss)(p, ids)
      u, s = tx.update(g, s, p)
      return optax.apply_updates(p, u), s, loss

    n = sum(x.size for x in jax.tree_util.tree_leaves(params))

    def step(state, ids):
      p, s = state
      p, s, loss = full_step(p, s, ids)
      return (p, s), loss

    return step, (params, opt_state), n, full_step

  stacked = None if cfg.layers == "unstacked" else r"^layers/"
  tree = jlora.apply(params, rank=spec["rank"], targets=spec["targets"], stacked=stacked,
                     dora=dora)
  if spec["mode"] == "fact":
    loss_fn = jlora.lora(model_loss, fold=fold)
  else:  # the merge path: w + s*a@b formed in the step, the model sees plain weights
    loss_fn = lambda tree, ids: model_loss(jlora.merge(tree), ids)
  train = jlora.train_step(loss_fn, tx)
  opt_state = train.init(tree)

  def step(state, ids):
    t, s = state
    t, s, loss = train(t, s, ids)
    return (t, s), loss

  return step, (tree, opt_state), jlora.count(tree).trainable, train


def measure_peak(n: int = 8192) -> dict:
  """bf16 n^3 matmul rate on random data (median of 5 timings of 10 products)."""
  k1, k2 = jax.random.split(jax.random.key(0))
  a = jax.random.normal(k1, (n, n), jnp.bfloat16)
  b = jax.random.normal(k2, (n, n), jnp.bfloat16)
  mm = jax.jit(lambda a, b: a @ b)
  for _ in range(5):
    mm(a, b).block_until_ready()
  ts = []
  for _ in range(5):  # 10 back-to-back products per timing: no host sync in between
    t0 = time.perf_counter()
    for _ in range(10):
      c = mm(a, b)
    c.block_until_ready()
    ts.append((time.perf_counter() - t0) / 10)
  dt = statistics.median(ts)
  return dict(suite="jlora", name="peak_bf16_matmul", n=n, tflops=round(2 * n ** 3 / dt / 1e12, 1),
              device=jax.devices()[0].device_kind)


def _kernel_category(name: str) -> str:
  n = name.lower()
  if "nvjet" in n or "gemm" in n or "cutlass" in n or "cublas" in n or n.startswith("sm90_xmma"):
    return "gemm"
  if "cudnn" in n or "sdpa" in n or "flash" in n:
    return "attention"
  if "memcpy" in n or "memset" in n or n.startswith("copy") or "_copy" in n:
    return "copy"
  if "reduce" in n or "scatter" in n:
    return "reduce fusion"
  if "fusion" in n or n.startswith("loop_") or n.startswith("input_"):
    return "elementwise fusion"
  return "other"


def summarize_trace(log_dir: str, steps: int = 2, top: int = 80) -> dict:
  """Per-step kernel time by category and the top kernels, from the Perfetto trace.

  Each top entry is `(kernel, hlo_op, ms per step, launches per step)`; `hlo_op`
  names the instruction in the compiled HLO (`--hlo-out`), when the trace gives it.
  """
  files = glob.glob(os.path.join(log_dir, "**", "perfetto_trace.json.gz"), recursive=True)
  if not files:
    return dict(error="no perfetto trace")
  d = json.load(gzip.open(sorted(files)[-1]))
  ev = d["traceEvents"] if isinstance(d, dict) else d
  pname = {e["pid"]: e.get("args", {}).get("name", "") for e in ev
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  device_pids = {p for p, n in pname.items() if "/device:GPU" in n or "GPU" in n}
  kernels = [e for e in ev if e.get("ph") == "X" and "dur" in e and e.get("pid") in device_pids]
  if not kernels:
    return dict(error="no device events", processes=sorted(set(pname.values())))
  by = collections.Counter()
  cnt = collections.Counter()
  cat = collections.Counter()
  sample_args = {}
  for e in kernels:
    args = e.get("args", {}) or {}
    op = args.get("hlo_op", "")
    key = (e.get("name", "?"), op)
    by[key] += float(e["dur"])
    cnt[key] += 1
    cat[_kernel_category(e.get("name", ""))] += float(e["dur"])
    sample_args.setdefault(key, {k: str(v)[:120] for k, v in args.items()})
  t0 = min(float(e["ts"]) for e in kernels)
  t1 = max(float(e["ts"]) + float(e["dur"]) for e in kernels)
  per = lambda us: round(us / steps / 1000, 3)
  return dict(
      span_ms_per_step=per(t1 - t0), kernel_ms_per_step=per(sum(by.values())),
      launches_per_step=len(kernels) / steps,
      category_ms_per_step={k: per(v) for k, v in cat.most_common()},
      top=[(k[0][:90], k[1], per(us), cnt[k] / steps) for k, us in by.most_common(top)],
      sample_args={f"{k[0][:60]}|{k[1]}": sample_args[k] for k, _ in by.most_common(5)})


def _xla_analysis(row: dict, jitted, state, ids, hlo_out: str) -> None:
  """Adds XLA's memory and cost analysis of the compiled step to `row` (and writes its HLO)."""
  try:  # served from the persistent compilation cache, where one is set (run_gpu.sh does)
    compiled = jitted.lower(*state, ids).compile()
    ma = compiled.memory_analysis()
    row["xla_memory_gib"] = {k: round(getattr(ma, k + "_in_bytes") / 2 ** 30, 2)
                             for k in ("argument_size", "output_size", "alias_size", "temp_size")}
    text = compiled.as_text()
    row["hlo_opt_barriers"] = text.count(" opt-barrier(")  # jlora's quantized matmuls keep theirs?
    if hlo_out:
      with gzip.open(hlo_out, "wt") as f:
        f.write(text)
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    row["xla_tflop_per_step"] = round(float(ca.get("flops", 0.0)) / 1e12, 2)
  except Exception as e:  # informational only
    row["xla_analysis_error"] = repr(e)[:200]


def run(args) -> dict:
  spec = CONFIGS[args.config]
  batch, seq = C.batch_seq(args)
  if args.tiny:
    cfg = G.tiny_config(remat=args.remat, loss_chunk=min(args.chunk, 16),
                        attention=args.attention or "xla")
  else:
    cfg = G.Gemma2Config(remat=args.remat, loss_chunk=args.chunk,
                         attention=args.attention or "cudnn")
  cfg = dataclasses.replace(cfg, layers=args.layers, scan_unroll=args.scan_unroll,
                            loss_math=args.loss_math, rope_vjp=not args.rope_autodiff)
  if args.logits_f32:
    cfg = dataclasses.replace(cfg, logits_dtype=jnp.float32)
  key = jax.random.key(0)
  t0 = time.perf_counter()
  # Eagerly: one small program per array shape. One jitted program for all ~290 arrays
  # took 70-100 s to compile on the H200 (runs 9-16), in the first process of each call.
  kernel_fn = None
  if args.quantize != "none":  # each kernel quantized as it is drawn: no bf16 copy of them all
    stacked = None if cfg.layers == "unstacked" else r"^layers/"

    def kernel_fn(name, k, s, std):
      w = (jax.random.normal(k, s.shape, jnp.float32) * std).astype(s.dtype)
      q = jlora.quantize({name: w}, args.quantize, stacked=stacked, block_size=16 if args.tiny
                         else 64, double_quant=args.double_quant)[name]
      return jax.block_until_ready(q)
  params = G.init_params(cfg, key, kernel_fn)
  leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, jlora.Quantized))
  weight_bytes = sum(x.nbytes for x in leaves)
  ids = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0, cfg.vocab_size)
  step, state, ntrain, jitted = build_step(cfg, spec, params, fold=args.fold, dora=args.dora)
  del params
  jax.block_until_ready(state)
  init_s = time.perf_counter() - t0

  box = [state]

  def one_step():
    box[0], loss = step(box[0], ids)
    return loss

  timing = C.time_steps(one_step, lambda l: l.block_until_ready(), warmup=args.warmup,
                        steps=args.steps, rounds=args.rounds)
  state, loss = box[0], timing["last"]
  dt = timing["step_s"]
  tok_s = batch * seq / dt
  long_round = None
  if args.long_round:
    t0 = time.perf_counter()
    for _ in range(args.long_round):
      state, loss = step(state, ids)
    loss.block_until_ready()
    long_round = (time.perf_counter() - t0) / args.long_round
  stats = jax.devices()[0].memory_stats() or {}
  full = spec["mode"] == "full"
  row = dict(
      suite="jlora", name=args.config + (f"_{args.tag}" if args.tag else ""), config=args.config,
      mode=spec["mode"], rank=spec["rank"], remat=cfg.remat, attention=cfg.attention,
      quantize=args.quantize, double_quant=bool(args.double_quant), weight_bytes=weight_bytes,
      dora=bool(args.dora),
      layers=cfg.layers, scan_unroll=cfg.scan_unroll,
      loss_chunk=cfg.loss_chunk, logits_dtype=jnp.dtype(cfg.logits_dtype).name,
      loss_math=cfg.loss_math, fold=args.fold, rope_vjp=cfg.rope_vjp,
      loss_kind=f"fused ({cfg.loss_math})" if cfg.loss_chunk else "plain (full float32 logits)",
      batch=batch, seq=seq, trainable=int(ntrain), step_s=dt,
      step_s_rounds=timing["step_s_rounds"], tokens_s=round(tok_s),
      peak_gib=round(stats.get("peak_bytes_in_use", 0) / 2 ** 30, 2),
      mfu=round(tok_s * flops_per_token(cfg, seq) / PEAK_FLOPS, 3),
      compile_s=timing["compile_s"], init_s=round(init_s, 1),
      loss_first=round(float(timing["first"]), 4), loss=round(float(loss), 4),
      tiny=bool(args.tiny), jax=jax.__version__, device=jax.devices()[0].device_kind,
      xla_flags=os.environ.get("XLA_FLAGS", ""))
  if long_round:
    row["long_round"] = dict(steps=args.long_round, step_s=round(long_round, 4),
                             tokens_s=round(batch * seq / long_round))
  if full:
    row["mfu_6n"] = round(tok_s * flops_per_token(cfg, seq, full=True) / PEAK_FLOPS, 3)
  if args.xla_analysis or args.hlo_out:
    _xla_analysis(row, jitted, state, ids, args.hlo_out)
  if args.profile:
    try:
      log_dir = f"/tmp/jlora_trace_{args.config}_{os.getpid()}"
      jax.profiler.start_trace(log_dir, create_perfetto_trace=True)
      for _ in range(2):
        state, loss = step(state, ids)
      loss.block_until_ready()
      jax.profiler.stop_trace()
      prof = summarize_trace(log_dir, steps=2)
    except Exception as e:  # the measurement above stands without it
      prof = dict(error=repr(e)[:300])
    if args.profile_out:
      with open(args.profile_out, "a") as f:
        f.write(json.dumps(dict(name=row["name"], step_s=row["step_s"], lines=prof)) + "\n")
  return row


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("config", choices=sorted(CONFIGS) + ["peak"])
  p.add_argument("--remat", default="wide_mid_xa", choices=G.REMAT_POLICIES)
  p.add_argument("--chunk", type=int, default=4096,
                 help="loss tokens per chunk of the fused loss; 0: the plain loss (full logits)")
  p.add_argument("--loss-math", default="pallas", choices=G.LOSS_MATH,
                 help="the fused loss's soft-cap terms in one Pallas pass (default), through "
                      "exp/rsqrt in two XLA passes, or through tanh/divisions")
  p.add_argument("--rope-autodiff", action="store_true",
                 help="RoPE's gradient by autodiff instead of one inverse rotation (A/B)")
  p.add_argument("--attention", default=None, choices=G.ATTENTIONS)
  p.add_argument("--layers", default="unstacked", choices=G.LAYERS,
                 help="separate per-layer blocks (default), stacked blocks in one lax.scan, or a "
                      "Python loop over the stacked weights")
  p.add_argument("--scan-unroll", type=int, default=1, help="nn.scan's unroll (--layers scan)")
  p.add_argument("--logits-f32", action="store_true", help="write the head matmul in float32")
  p.add_argument("--fold", default="auto", choices=("auto", "bytes", "never", "always"),
                 help="jlora.lora's fold of x·W + t·B into one matmul [x, t]·[W; B]: by its "
                      "rule (auto: GPU, N >= 2K), by the byte count alone (4MN > 2MK + 2KN), "
                      "never, or wherever the layout allows")
  p.add_argument("--long-round", type=int, default=0,
                 help="also time one round of this many steps (steady state), reported apart")
  p.add_argument("--xla-analysis", action="store_true",
                 help="add XLA's memory and FLOP analysis of the compiled step to the row")
  p.add_argument("--hlo-out", default="", help="write the compiled step's HLO text here (.gz)")
  p.add_argument("--profile", action="store_true", help="trace 2 more steps, summarize kernels")
  p.add_argument("--profile-out", default="", help="append the kernel summary (JSON) here")
  p.add_argument("--tag", default="", help="appended to the row's name")
  p.add_argument("--quantize", default="none", choices=("none", "nf4", "int8", "fp8"),
                 help="the frozen base's kernels quantized with jlora.quantize (QLoRA)")
  p.add_argument("--dora", action="store_true", help="DoRA (jlora.apply(..., dora=True))")
  p.add_argument("--double-quant", action="store_true", help="with --quantize: QLoRA's double "
                 "quantization of the scales")
  C.add_args(p)
  args = p.parse_args(argv)
  print("jax", jax.__version__, jax.devices(), flush=True)
  row = measure_peak(256 if args.tiny else 8192) if args.config == "peak" else run(args)
  return C.emit(row, args.out)


if __name__ == "__main__":
  main()
