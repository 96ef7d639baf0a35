"""Baseline: a LoRA train step written by hand in plain JAX, no library, on the Gemma-2-2B shape.

What a careful user writes without jlora: the weights of the 26 blocks stacked on a
leading axis and run with `lax.scan`, each block under `jax.checkpoint` with a
remat policy (`--remat`, default `dots`: XLA's `dots_with_no_batch_dims_saveable`,
the fastest of the three in earlier runs), the adapters inline
(`y = x @ w + (x @ a) @ b`, float32 adapters cast to bf16 in the matmuls, scale
alpha/rank = 1), bf16 base weights, cuDNN flash attention (causal; like PEFT's sdpa
path and jlora's benchmark model, without Gemma 2's attention-logit soft-cap), the
full float32 logits with the final soft-cap 30 and `log_softmax`, and
`optax.adamw(1e-4)` on the adapters only, the adapters and the optimizer state
donated to the jitted step.

Usage (one configuration per process, so the peak memory is its own):

  python benchmarks/baselines/jax_handwritten.py qv4|all16 [--remat dots|nothing|none] [--tiny]

Prints one JSON row: tokens/s, peak device memory (the allocator's
`peak_bytes_in_use`), MFU (bench_common's FLOP model).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_common as C  # noqa: E402

REMAT = {
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing": jax.checkpoint_policies.nothing_saveable,
    "none": None,
}


def weight_shapes(s: dict) -> dict:
  """`(in, out)` of each projection of one block."""
  d, f, hd = s["hidden_size"], s["intermediate_size"], s["head_dim"]
  q, kv = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd
  return dict(q_proj=(d, q), k_proj=(d, kv), v_proj=(d, kv), o_proj=(q, d),
              gate_proj=(d, f), up_proj=(d, f), down_proj=(f, d))


def init_weights(s: dict, key) -> dict:
  """N(0, 1/fan_in) kernels stacked over blocks, N(0, 1/width) embedding, zero norm scales.

  Each array is drawn by its own (eager) call: one small program per shape, where one
  jitted program for all arrays takes minutes to compile on a GPU.
  """
  n, d = s["num_hidden_layers"], s["hidden_size"]
  keys = iter(jax.random.split(key, 16))

  def normal(shape, fan_in):
    x = jax.random.normal(next(keys), shape, jnp.float32) * fan_in ** -0.5
    return x.astype(jnp.bfloat16)

  blocks = {name: normal((n, i, o), i) for name, (i, o) in weight_shapes(s).items()}
  for norm in ("pre_attn", "post_attn", "pre_ffw", "post_ffw"):
    blocks[norm] = jnp.zeros((n, d), jnp.bfloat16)
  return dict(embed=normal((s["vocab_size"], d), d), blocks=blocks,
              final_norm=jnp.zeros((d,), jnp.bfloat16))


def init_adapters(s: dict, rank: int, targets, key) -> dict:
  """`a` he-uniform (in, r), `b` zeros (r, out), float32, stacked over blocks."""
  n, shapes = s["num_hidden_layers"], weight_shapes(s)
  out = {}
  for i, name in enumerate(targets):
    fan_in, fan_out = shapes[name]
    bound = math.sqrt(6.0 / fan_in)
    a = jax.random.uniform(jax.random.fold_in(key, i), (n, fan_in, rank), jnp.float32, -bound,
                           bound)
    out[name] = dict(a=a, b=jnp.zeros((n, rank, fan_out), jnp.float32))
  return out


def rms_norm(x, scale, eps):
  x32 = x.astype(jnp.float32)
  x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
  return (x32 * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


def rope(x, theta):
  """Rotary embedding (rotate-half form) on `(batch, seq, heads, head_dim)`."""
  t, hd = x.shape[1], x.shape[-1]
  inv = theta ** (-jnp.arange(0, hd // 2, dtype=jnp.float32) / (hd // 2))
  ang = jnp.arange(t, dtype=jnp.float32)[:, None] * inv[None, :]
  cos, sin = jnp.cos(ang)[:, None, :], jnp.sin(ang)[:, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


def make_loss(s: dict, attention: str, remat: str):
  """`loss(adapters, weights, ids)`: mean next-token cross-entropy of the soft-capped logits."""
  h, kv, hd, eps = (s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"],
                    s["rms_norm_eps"])
  cap = s["final_logit_softcapping"]

  def block(x, layer):
    w, ad = layer
    b, t, _ = x.shape

    def proj(name, inp):
      y = inp @ w[name]
      if name in ad:
        a, bb = ad[name]["a"].astype(inp.dtype), ad[name]["b"].astype(inp.dtype)
        y = y + (inp @ a) @ bb
      return y

    z = rms_norm(x, w["pre_attn"], eps)
    q = rope(proj("q_proj", z).reshape(b, t, h, hd), s["rope_theta"])
    k = rope(proj("k_proj", z).reshape(b, t, kv, hd), s["rope_theta"])
    v = proj("v_proj", z).reshape(b, t, kv, hd)
    o = jax.nn.dot_product_attention(q, k, v, scale=hd ** -0.5, is_causal=True,
                                     implementation=attention)
    x = x + rms_norm(proj("o_proj", o.reshape(b, t, h * hd)), w["post_attn"], eps)
    z = rms_norm(x, w["pre_ffw"], eps)
    m = jax.nn.gelu(proj("gate_proj", z), approximate=True) * proj("up_proj", z)
    x = x + rms_norm(proj("down_proj", m), w["post_ffw"], eps)
    return x, None

  if REMAT[remat] is not None:
    block = jax.checkpoint(block, policy=REMAT[remat])

  def loss(adapters, weights, ids):
    inputs, labels = ids[:, :-1], ids[:, 1:]
    emb = weights["embed"]
    x = emb[inputs] * jnp.asarray(math.sqrt(emb.shape[1]), emb.dtype)
    x, _ = jax.lax.scan(block, x, (weights["blocks"], adapters))
    x = rms_norm(x, weights["final_norm"], eps)
    logits = (x @ emb.T).astype(jnp.float32)
    logits = cap * jnp.tanh(logits / cap)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))

  return loss


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("config", choices=sorted(C.CONFIGS))
  p.add_argument("--remat", default="dots", choices=sorted(REMAT))
  p.add_argument("--attention", default=None, choices=("cudnn", "xla"),
                 help="jax.nn.dot_product_attention's implementation (default: cudnn on GPUs)")
  C.add_args(p)
  args = p.parse_args(argv)
  s = C.shape_of(args.tiny)
  batch, seq = C.batch_seq(args)
  attention = args.attention or ("cudnn" if jax.default_backend() == "gpu" else "xla")
  rank, targets = C.CONFIGS[args.config]
  print("jax", jax.__version__, jax.devices(), flush=True)

  key_w, key_a, key_d = jax.random.split(jax.random.key(0), 3)
  weights = init_weights(s, key_w)
  adapters = init_adapters(s, rank, targets, key_a)
  ids = jax.random.randint(key_d, (batch, seq + 1), 0, s["vocab_size"])
  tx = optax.adamw(1e-4)
  loss = make_loss(s, attention if attention != "xla" else None, args.remat)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(adapters, opt_state, weights, ids):
    value, grads = jax.value_and_grad(loss)(adapters, weights, ids)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, value

  state = [adapters, tx.init(adapters)]

  def step():
    state[0], state[1], value = train_step(state[0], state[1], weights, ids)
    return value

  timing = C.time_steps(step, lambda v: v.block_until_ready(), warmup=args.warmup, steps=args.steps,
                        rounds=args.rounds)
  stats = jax.devices()[0].memory_stats() or {}
  trainable = sum(x.size for x in jax.tree.leaves(state[0]))
  r = C.row("handwritten", args.config, timing, batch=batch, seq=seq, shape=s, config=args.config,
            rank=rank, targets=list(targets), remat=args.remat, attention=attention,
            trainable=int(trainable),
            peak_gib=round(stats.get("peak_bytes_in_use", 0) / 2 ** 30, 2),
            jax=jax.__version__,
            device=jax.devices()[0].device_kind)
  return C.emit(r, args.out)


if __name__ == "__main__":
  main()
