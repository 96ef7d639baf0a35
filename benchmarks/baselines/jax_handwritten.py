"""Baseline: a LoRA train step written by hand in plain JAX, no library, on the Gemma-2-2B shape;
and the same model trained through jlora, for the same-model rows (`--impl jlora`).

What a careful user writes without jlora: bf16 base weights, the adapters inline
(`y = x @ w + (x @ a) @ b`, float32 adapters cast to bf16 in the matmuls, scale
alpha/rank = 1), cuDNN flash attention (causal; like PEFT's sdpa path and jlora's
benchmark model, without Gemma 2's attention-logit soft-cap), the full float32 logits
with the final soft-cap 30 and `log_softmax`, and `optax.adamw(1e-4)` on the adapters
only, the adapters and the optimizer state donated to the jitted step.

The same model, three switches:
- `--layout scan` (default): the 26 blocks' weights stacked on a leading axis and run
  with `lax.scan`; `loop`: one weight dict per block, a Python loop (26 blocks
  unrolled in the program).
- `--remat`: each block under `jax.checkpoint` with XLA's
  `dots_with_no_batch_dims_saveable` (`dots`, default), `nothing_saveable`
  (`nothing`), no checkpoint (`none`), or a named-save policy (`names`: the model
  names each projection's output `"proj"` and the attention output `"attn"`, the
  adapters' `x @ a` is `"jlora_xa"`, and the policy keeps those three names).
- `--impl inline` (default): the adapters written into the model as above. `jlora`:
  the model's forward has plain `x @ w` and no adapters; the tree comes from
  `jlora.apply(weights, rank, targets=..., stacked="^blocks/")` (scan) or without
  `stacked` (loop), the loss is `jlora.lora(loss)`, the step
  `jlora.train_step(loss, optax.adamw(1e-4))`: what a user of this model writes with
  jlora. jlora's `x @ a` carries the name `"jlora_xa"` itself; `--fold` is
  `jlora.lora`'s.

Usage (one configuration per process, so the peak memory is its own):

  python benchmarks/baselines/jax_handwritten.py qv4|all16 [--impl inline|jlora]
      [--layout scan|loop] [--remat dots|nothing|none|names] [--fold auto|never|always] [--tiny]

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
from jax.ad_checkpoint import checkpoint_name

_BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _BENCH)
sys.path.insert(1, os.path.dirname(_BENCH))  # the checkout's jlora, for --impl jlora
import bench_common as C  # noqa: E402

# The names the model gives its activations (`--remat names` keeps them), and jlora's name
# for each adapter's `x @ a`, which the inline adapters carry too.
PROJ, ATTN, XA = "proj", "attn", "jlora_xa"
REMAT = {
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing": jax.checkpoint_policies.nothing_saveable,
    "names": jax.checkpoint_policies.save_only_these_names(PROJ, ATTN, XA),
    "none": None,
}
LAYOUTS = ("scan", "loop")


def weight_shapes(s: dict) -> dict:
  """`(in, out)` of each projection of one block."""
  d, f, hd = s["hidden_size"], s["intermediate_size"], s["head_dim"]
  q, kv = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd
  return dict(q_proj=(d, q), k_proj=(d, kv), v_proj=(d, kv), o_proj=(q, d),
              gate_proj=(d, f), up_proj=(d, f), down_proj=(f, d))


def init_weights(s: dict, key, layout: str = "scan") -> dict:
  """N(0, 1/fan_in) kernels, N(0, 1/width) embedding, zero norm scales; the blocks stacked
  on a leading axis (`scan`) or a list of one dict per block (`loop`, the same values).

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
  embed = normal((s["vocab_size"], d), d)
  return dict(embed=embed, blocks=per_layout(blocks, layout),
              final_norm=jnp.zeros((d,), jnp.bfloat16))


def per_layout(stacked: dict, layout: str):
  """The stacked dict itself (`scan`) or one dict per block (`loop`); the stacked arrays
  are deleted as they are sliced, so the weights are held once."""
  if layout == "scan":
    return stacked
  n = len(next(iter(stacked.values())))
  out = [dict() for _ in range(n)]
  for name in list(stacked):
    x = stacked.pop(name)
    for i in range(n):
      out[i][name] = x[i]
    del x
  return out


def init_adapters(s: dict, rank: int, targets, key, layout: str = "scan") -> dict:
  """`a` he-uniform (in, r), `b` zeros (r, out), float32, stacked over blocks (`scan`) or
  one dict per block (`loop`)."""
  n, shapes = s["num_hidden_layers"], weight_shapes(s)
  out = {}
  for i, name in enumerate(targets):
    fan_in, fan_out = shapes[name]
    bound = math.sqrt(6.0 / fan_in)
    a = jax.random.uniform(jax.random.fold_in(key, i), (n, fan_in, rank), jnp.float32, -bound,
                           bound)
    out[name] = dict(a=a, b=jnp.zeros((n, rank, fan_out), jnp.float32))
  if layout == "scan":
    return out
  return [{name: dict(a=ad["a"][i], b=ad["b"][i]) for name, ad in out.items()} for i in range(n)]


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


def make_loss(s: dict, attention: str | None, remat: str, layout: str = "scan"):
  """`loss(adapters, weights, ids)`: mean next-token cross-entropy of the soft-capped logits.

  `adapters` in the layout of the blocks (`init_adapters`); `{}` (scan) or `None`: plain
  `x @ w` everywhere, which is what `jlora.lora` runs with LoRA leaves in `weights`.
  """
  h, kv, hd, eps = (s["num_attention_heads"], s["num_key_value_heads"], s["head_dim"],
                    s["rms_norm_eps"])
  cap = s["final_logit_softcapping"]

  def block(x, layer):
    w, ad = layer
    ad = ad or {}
    b, t, _ = x.shape

    def proj(name, inp):
      y = inp @ w[name]
      if name in ad:
        a, bb = ad[name]["a"].astype(inp.dtype), ad[name]["b"].astype(inp.dtype)
        y = y + checkpoint_name(inp @ a, XA) @ bb
      return checkpoint_name(y, PROJ)

    z = rms_norm(x, w["pre_attn"], eps)
    q = rope(proj("q_proj", z).reshape(b, t, h, hd), s["rope_theta"])
    k = rope(proj("k_proj", z).reshape(b, t, kv, hd), s["rope_theta"])
    v = proj("v_proj", z).reshape(b, t, kv, hd)
    o = jax.nn.dot_product_attention(q, k, v, scale=hd ** -0.5, is_causal=True,
                                     implementation=attention)
    o = checkpoint_name(o, ATTN)
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
    if layout == "scan":
      x, _ = jax.lax.scan(block, x, (weights["blocks"], adapters or {}))
    else:
      for i, w in enumerate(weights["blocks"]):
        x, _ = block(x, (w, adapters[i] if adapters else {}))
    x = rms_norm(x, weights["final_norm"], eps)
    logits = (x @ emb.T).astype(jnp.float32)
    logits = cap * jnp.tanh(logits / cap)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))

  return loss


def inline_step(s, args, rank, targets, attention, weights, key_a):
  """The hand-written step: `(step(ids) -> loss, trainable count, lower(ids))`."""
  adapters = init_adapters(s, rank, targets, key_a, args.layout)
  tx = optax.adamw(1e-4)
  loss = make_loss(s, attention, args.remat, args.layout)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(adapters, opt_state, weights, ids):
    value, grads = jax.value_and_grad(loss)(adapters, weights, ids)
    updates, opt_state = tx.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state, value

  state = [adapters, tx.init(adapters)]

  def step(ids):
    state[0], state[1], value = train_step(state[0], state[1], weights, ids)
    return value

  lower = lambda ids: train_step.lower(state[0], state[1], weights, ids)
  return step, sum(x.size for x in jax.tree.leaves(state[0])), lower


def jlora_step(s, args, rank, targets, attention, weights, key_a):
  """The same model through jlora's public API: `(step(ids) -> loss, trainable count,
  lower(ids))`."""
  import jlora
  stacked = r"^blocks/" if args.layout == "scan" else None
  tree = jlora.apply(weights, rank=rank, targets=list(targets), stacked=stacked, key=key_a)
  plain = make_loss(s, attention, args.remat, args.layout)
  train = jlora.train_step(jlora.lora(lambda t, ids: plain(None, t, ids), fold=args.fold),
                           optax.adamw(1e-4))
  state = [tree, train.init(tree)]

  def step(ids):
    state[0], state[1], value = train(state[0], state[1], ids)
    return value

  return step, jlora.count(tree).trainable, lambda ids: train.lower(state[0], state[1], ids)


def hlo_stats(compiled) -> dict:
  """A compiled program's shape: how many of each instruction kind (GEMM custom calls apart),
  XLA's temporary bytes and its FLOP and byte counts. Two programs that differ only in the
  order of their parameters give the same statistics."""
  import collections
  import re
  kinds = collections.Counter()
  for line in compiled.as_text().splitlines():
    m = re.search(r"= \S+ ([a-z][\w-]*)\(", line)
    if m:
      kind = m.group(1)
      if kind == "custom-call":
        t = re.search(r'custom_call_target="([^"]+)"', line)
        kind = f"custom-call:{t.group(1) if t else '?'}"
      kinds[kind] += 1
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost or {}
  mem = compiled.memory_analysis()
  return dict(instructions=dict(sorted(kinds.items())),
              temp_bytes=getattr(mem, "temp_size_in_bytes", None),
              flops=cost.get("flops"), bytes_accessed=cost.get("bytes accessed"))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("config", choices=sorted(C.CONFIGS))
  p.add_argument("--impl", default="inline", choices=("inline", "jlora"))
  p.add_argument("--layout", default="scan", choices=LAYOUTS)
  p.add_argument("--remat", default="dots", choices=sorted(REMAT))
  p.add_argument("--fold", default="auto", choices=("auto", "never", "always"),
                 help="jlora.lora's fold (--impl jlora only)")
  p.add_argument("--hlo-stats", action="store_true",
                 help="add the compiled step's statistics (hlo_stats): what two rows compare to "
                      "see whether they run the same program")
  C.add_attention_arg(p)
  C.add_args(p)
  args = p.parse_args(argv)
  s = C.shape_of(args.tiny)
  batch, seq = C.batch_seq(args)
  attention = C.attention_of(args, jax.default_backend())
  rank, targets = C.CONFIGS[args.config]
  print("jax", jax.__version__, jax.devices(), flush=True)

  key_w, key_a, key_d = jax.random.split(jax.random.key(0), 3)
  weights = init_weights(s, key_w, args.layout)
  ids = jax.random.randint(key_d, (batch, seq + 1), 0, s["vocab_size"])
  make = inline_step if args.impl == "inline" else jlora_step
  step, trainable, lower = make(s, args, rank, targets, attention if attention != "xla" else None,
                         weights, key_a)
  timing = C.time_steps(lambda: step(ids), lambda v: v.block_until_ready(), warmup=args.warmup,
                        steps=args.steps, rounds=args.rounds)
  stats = jax.devices()[0].memory_stats() or {}
  fields = dict(impl=args.impl, layout=args.layout, remat=args.remat)
  if args.impl == "jlora":
    fields["fold"] = args.fold
  if args.hlo_stats:
    fields["hlo_stats"] = hlo_stats(lower(ids).compile())
  r = C.row("handwritten", args.config, timing, batch=batch, seq=seq, shape=s, config=args.config,
            rank=rank, targets=list(targets), **fields, attention=attention,
            trainable=int(trainable),
            peak_gib=round(stats.get("peak_bytes_in_use", 0) / 2 ** 30, 2),
            jax=jax.__version__,
            device=jax.devices()[0].device_kind)
  return C.emit(r, args.out)


if __name__ == "__main__":
  main()
