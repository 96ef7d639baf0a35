"""Sharded LoRA train step of the Llama decoder on every visible device (2 GPUs: fsdp=2).

Runs the same steps sharded (frozen base FSDP x tensor, adapters derived from
their weights, batch over data x fsdp) and on one device, and writes a JSON
report: device kinds, mesh, losses of both runs, the largest adapter
difference, step times, shardings kept, merge shardings and the HLO's
full-weight collectives.

  python benchmarks/sharded_2gpu.py --out benchmarks/results/sharded_2gpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import jlora
from jlora import sharding as S
from recipes.models import llama

RULES = [
    (r"layers/.*(q_proj|k_proj|v_proj|gate_proj|up_proj)/kernel", P(None, "fsdp", "tensor")),
    (r"layers/.*(o_proj|down_proj)/kernel", P(None, "tensor", "fsdp")),
    (r"embed_tokens/embedding", P("tensor", "fsdp")),
]


def _mesh_shape(n: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor): 2 -> (1, 2, 1), 8 -> (2, 2, 2)."""
  if n >= 8 and n % 8 == 0:
    return (n // 4, 2, 2)
  return (1, n, 1)


def _timed(fn, n):
  out = fn()
  jax.block_until_ready(out)
  t = time.perf_counter()
  for _ in range(n):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / n, out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="benchmarks/results/sharded_2gpu.json")
  ap.add_argument("--steps", type=int, default=5)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq", type=int, default=256)
  ap.add_argument("--tiny", action="store_true", help="the 2-layer test config (CPU check)")
  args = ap.parse_args()

  n = jax.device_count()
  shape = _mesh_shape(n)
  mesh = jax.make_mesh(shape, ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  # SmolLM2-135M's shapes, 8 layers, bf16 compute with float32 parameters.
  cfg = llama.LlamaConfig(num_layers=8, dtype=jnp.bfloat16)
  if args.tiny:
    cfg = llama.LlamaConfig.tiny(dtype=jnp.bfloat16)
  model = llama.Llama(cfg)
  key = jax.random.split(jax.random.key(0), 3)
  tokens = jax.random.randint(key[0], (args.batch, args.seq), 0, cfg.vocab_size)
  params = jax.jit(model.init)(key[1], tokens[:1, :8])["params"]
  specs = S.path_specs(params, RULES)
  sparams = jax.device_put(params, jax.tree.map(lambda s: NamedSharding(mesh, s), specs))
  kw = dict(rank=16, targets="all-linear", stacked=r"^layers/", key=key[2])
  lp_s = jlora.apply(sparams, **kw)
  lp_1 = jax.device_put(jlora.apply(params, **kw), jax.devices()[0])

  def loss_fn(t, tok):
    return llama.lm_loss(jlora.lora(model.apply)({"params": t}, tok), tok)

  step = jlora.train_step(loss_fn, optax.adam(1e-3), mesh=mesh)
  state = step.init(lp_s)
  t0 = time.perf_counter()
  hlo = step.lower(lp_s, state, tokens).compile().as_text()
  compile_s = time.perf_counter() - t0
  collectives = {op: len(re.findall(rf"\b{op}(-start)?\(", hlo))
                 for op in ("all-gather", "all-reduce", "reduce-scatter", "all-to-all")}
  sh_before = jax.tree.map(lambda x: str(x.sharding.spec), lp_s)

  ref = jlora.train_step(loss_fn, optax.adam(1e-3))
  state_1 = ref.init(lp_1)
  ls, l1 = [], []
  for _ in range(args.steps):
    lp_s, state, a = step(lp_s, state, tokens)
    lp_1, state_1, b = ref(lp_1, state_1, tokens)
    ls.append(float(a)), l1.append(float(b))
  diff = max(float(np.abs(np.asarray(x) - np.asarray(y)).max())
             for x, y in zip(jax.tree.leaves(jlora.split(lp_s).trainable),
                             jax.tree.leaves(jlora.split(lp_1).trainable)))
  kept = jax.tree.map(lambda x: str(x.sharding.spec), lp_s) == sh_before

  holder = {"t": lp_s, "s": state}

  def run_sharded():
    holder["t"], holder["s"], l = step(holder["t"], holder["s"], tokens)
    return l

  holder1 = {"t": lp_1, "s": state_1}

  def run_single():
    holder1["t"], holder1["s"], l = ref(holder1["t"], holder1["s"], tokens)
    return l

  t_sharded, _ = _timed(run_sharded, args.steps)
  t_single, _ = _timed(run_single, args.steps)
  merged = jlora.merge(holder["t"])
  merge_ok = all(
      m.sharding.is_equivalent_to((x.w if isinstance(x, jlora.LoRA) else x).sharding, m.ndim)
      for x, m in zip(jax.tree_util.tree_leaves(holder["t"], is_leaf=jlora.is_lora),
                      jax.tree.leaves(merged)))
  q = holder["t"]["layers"]["self_attn"]["q_proj"]["kernel"]
  report = {
      "jax": jax.__version__,
      "python": platform.python_version(),
      "devices": [d.device_kind for d in jax.devices()],
      "mesh": dict(zip(("data", "fsdp", "tensor"), shape)),
      "model": {"layers": cfg.num_layers, "hidden": cfg.hidden_size,
                "intermediate": cfg.intermediate_size, "vocab": cfg.vocab_size,
                "compute_dtype": "bfloat16"},
      "lora": {"rank": 16, "targets": "all-linear", "count": jlora.count(lp_1)._asdict()},
      "batch": [args.batch, args.seq],
      "loss_sharded": ls,
      "loss_single_device": l1,
      "max_abs_adapter_diff": diff,
      "shardings_kept_after_steps": bool(kept),
      "merge_shardings_equal_w": bool(merge_ok),
      "q_proj_specs": {"w": str(q.w.sharding.spec), "a": str(q.a.sharding.spec),
                       "b": str(q.b.sharding.spec)},
      "compile_s": round(compile_s, 2),
      "step_ms_sharded": round(1e3 * t_sharded, 2),
      "step_ms_single_device": round(1e3 * t_single, 2),
      "tokens_per_s_sharded": round(args.batch * args.seq / t_sharded),
      "collectives_in_step_hlo": collectives,
  }
  text = json.dumps(report, indent=2)
  print(text)
  with open(args.out, "w") as f:
    f.write(text + "\n")


if __name__ == "__main__":
  main()
