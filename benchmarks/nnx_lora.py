"""Same-model benchmark: a Flax NNX model, trained with Flax's own LoRA layers or with jlora.

The model is Gemma 2 2B's shape (`bench_common.GEMMA2_2B`) written as an NNX user writes
it: `nnx.Module` blocks in a Python list, `nnx.Linear` projections without bias named
q_proj ... down_proj (bf16 parameters and compute), an `nnx.Embed` tied as the output
head (`attend`), RMSNorm with `(1 + scale)`, rotate-half RoPE, `jax.nn.dot_product_attention`
(cuDNN on GPUs, causal, without the attention-logit soft-cap), the final soft-cap 30 and
the full float32 logits with `log_softmax`: the math of `baselines/jax_handwritten.py`,
block by block (tests/test_bench_nnx.py checks the loss against it). Each block's call
runs under `jax.checkpoint` with the remat policy (`--remat`, default `dots`: XLA's
`dots_with_no_batch_dims_saveable`) as a function of the block's state (`remat_call`),
the same for both implementations.

Two implementations of one LoRA configuration (`bench_common.CONFIGS`: `qv4` is rank 4 on
q_proj, v_proj; `all16` rank 16 on all seven projections; alpha = rank, so scale 1):

- `builtin`: Flax's own LoRA. Each targeted `nnx.Linear` is wrapped in `nnx.LoRA(...,
  base_module=linear)` (float32 `lora_a` he-uniform and `lora_b` zeros, computed in bf16:
  `dtype=bfloat16` casts them in the matmul; the layer computes `x·a·b + linear(x)`, the
  math of `nnx.LoRALinear`). The step is the functional NNX form:
  `nnx.split(model, nnx.LoRAParam, ...)`, `jax.value_and_grad` of the loss of
  `nnx.merge(graphdef, adapters, frozen)` with respect to the adapters only,
  `optax.adamw(1e-4)`, one `jax.jit` donating the adapters and the optimizer state.
  (`nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)` with `nnx.value_and_grad` under `nnx.jit`
  took 10.7 ms a step against this form's 3.2 ms on the tiny model on two CPU cores, the
  median of 5 rounds of 30 steps; the extra time is the host's: `nnx.jit` flattens the
  module graph and writes the results back into it at every call.)
- `jlora`: the same model without LoRA layers: `graphdef, state = nnx.split(model)`,
  `tree = jlora.apply(state, rank=r, targets=[...])`, the loss
  `jlora.lora(lambda t, ids: loss(nnx.merge(graphdef, t), ids))` and
  `jlora.train_step(loss, optax.adamw(1e-4))` (which donates the adapters and the
  optimizer state).

Both train the same parameters (`trainable` in the row) from the same base weights: N(0,
1/fan_in) bf16 kernels and embedding (the embedding's fan-in is its width), zero norm
scales, each drawn eagerly by its own call as the modules are built, as jax_handwritten
draws them. Each library draws its own `a` from the same he-uniform distribution (the
tests give both the same values and check the losses agree). Timing and the row are
`baselines/jax_handwritten.py`'s (`bench_common.time_steps`, the median of 3 rounds of 8
steps, the allocator's `peak_bytes_in_use`).

Usage (one configuration per process, so the peak memory is its own):

  python benchmarks/nnx_lora.py qv4|all16 --impl builtin|jlora [--remat dots|nothing|none]
      [--attention cudnn|xla] [--warmup 3 --steps 8 --rounds 3] [--out results.jsonl] [--tiny]

Prints one JSON row (suite `nnx`, name `nnx-IMPL-CONFIG-REMAT`): tokens/s, peak device
memory, MFU (bench_common's FLOP model), the first and last loss, the trainable count.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys

import flax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as C  # noqa: E402

import jlora  # noqa: E402

REMAT = {
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "nothing": jax.checkpoint_policies.nothing_saveable,
    "none": None,
}
IMPLS = ("builtin", "jlora")


def fan_in_normal(fan_in_axis: int):
  """An initializer: N(0, 1/fan_in) drawn in float32, then cast (jax_handwritten's draw)."""

  def init(key, shape, dtype=jnp.bfloat16):
    x = jax.random.normal(key, shape, jnp.float32) * shape[fan_in_axis] ** -0.5
    return x.astype(dtype)

  return init


class RMSNorm(nnx.Module):
  """Gemma's RMSNorm: float32 statistics, `(1 + scale)` with the scale initialised to zero."""

  def __init__(self, dim: int, eps: float):
    self.scale = nnx.Param(jnp.zeros((dim,), jnp.bfloat16))
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
    return (x32 * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)


def rope(x, theta: float):
  """Rotary embedding (rotate-half form) on `(batch, seq, heads, head_dim)`."""
  t, hd = x.shape[1], x.shape[-1]
  inv = theta ** (-jnp.arange(0, hd // 2, dtype=jnp.float32) / (hd // 2))
  ang = jnp.arange(t, dtype=jnp.float32)[:, None] * inv[None, :]
  cos, sin = jnp.cos(ang)[:, None, :], jnp.sin(ang)[:, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).astype(x.dtype)


class Block(nnx.Module):
  """One Gemma 2 decoder block: attention and GeGLU, each between a pre- and a post-norm."""

  def __init__(self, s: dict, attention: str | None, rngs: nnx.Rngs):
    d, f, hd = s["hidden_size"], s["intermediate_size"], s["head_dim"]
    h, kv, eps = s["num_attention_heads"], s["num_key_value_heads"], s["rms_norm_eps"]
    linear = functools.partial(nnx.Linear, use_bias=False, dtype=jnp.bfloat16,
                               param_dtype=jnp.bfloat16, kernel_init=fan_in_normal(0), rngs=rngs)
    self.q_proj, self.k_proj = linear(d, h * hd), linear(d, kv * hd)
    self.v_proj, self.o_proj = linear(d, kv * hd), linear(h * hd, d)
    self.gate_proj, self.up_proj, self.down_proj = linear(d, f), linear(d, f), linear(f, d)
    self.pre_attn_norm, self.post_attn_norm = RMSNorm(d, eps), RMSNorm(d, eps)
    self.pre_ffw_norm, self.post_ffw_norm = RMSNorm(d, eps), RMSNorm(d, eps)
    self.heads, self.kv_heads, self.head_dim = h, kv, hd
    self.theta, self.attention = s["rope_theta"], attention

  def __call__(self, x):
    b, t, _ = x.shape
    h, kv, hd = self.heads, self.kv_heads, self.head_dim
    z = self.pre_attn_norm(x)
    q = rope(self.q_proj(z).reshape(b, t, h, hd), self.theta)
    k = rope(self.k_proj(z).reshape(b, t, kv, hd), self.theta)
    v = self.v_proj(z).reshape(b, t, kv, hd)
    o = jax.nn.dot_product_attention(q, k, v, scale=hd ** -0.5, is_causal=True,
                                     implementation=self.attention)
    x = x + self.post_attn_norm(self.o_proj(o.reshape(b, t, h * hd)))
    z = self.pre_ffw_norm(x)
    m = jax.nn.gelu(self.gate_proj(z), approximate=True) * self.up_proj(z)
    return x + self.post_ffw_norm(self.down_proj(m))


def remat_call(block: Block, x, policy):
  """`block(x)` under `jax.checkpoint(policy=policy)`, as a function of the block's state.

  The functional form (`nnx.split`, then `nnx.merge` inside the checkpoint) takes the
  weights in and gives `x` alone out. `nnx.remat` in its default graph mode (flax 0.12.8)
  also returns the block's state from the checkpoint, a pass-through output of every
  weight: jlora then materializes each targeted kernel there (a full-size weight
  gradient), and Flax's LoRA step raises `TraceContextError` under `jax.value_and_grad`.
  `nnx.remat(..., graph=False)` compiles to the same program as this function (the optimized
  HLO of both gradients is the same text on the CPU with flax 0.12.8).
  """
  graphdef, state = nnx.split(block)
  return jax.checkpoint(lambda state, x: nnx.merge(graphdef, state)(x), policy=policy)(state, x)


class Gemma2(nnx.Module):
  """The model: tied embedding, `num_hidden_layers` blocks (each under `jax.checkpoint` with
  the policy named by `remat`, `remat_call`), the final norm; returns the soft-capped float32
  logits."""

  def __init__(self, s: dict, *, attention: str | None, remat: str, rngs: nnx.Rngs):
    if remat not in REMAT:
      raise ValueError(f"remat={remat!r} is not one of {sorted(REMAT)}.")
    d = s["hidden_size"]
    self.embed = nnx.Embed(s["vocab_size"], d, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                           embedding_init=fan_in_normal(1), rngs=rngs)
    self.blocks = nnx.List([Block(s, attention, rngs) for _ in range(s["num_hidden_layers"])])
    self.final_norm = RMSNorm(d, s["rms_norm_eps"])
    self.cap, self.remat = s["final_logit_softcapping"], remat

  def __call__(self, inputs):
    emb = self.embed
    x = emb(inputs) * jnp.asarray(math.sqrt(emb.features), jnp.bfloat16)
    for block in self.blocks:
      x = block(x) if self.remat == "none" else remat_call(block, x, REMAT[self.remat])
    logits = emb.attend(self.final_norm(x)).astype(jnp.float32)
    return self.cap * jnp.tanh(logits / self.cap)


def loss_fn(model: Gemma2, ids):
  """Mean next-token cross-entropy of `ids` (batch, seq + 1): full logits, `log_softmax`."""
  inputs, labels = ids[:, :-1], ids[:, 1:]
  logp = jax.nn.log_softmax(model(inputs), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))


def add_lora(model: Gemma2, rank: int, targets, rngs: nnx.Rngs) -> Gemma2:
  """Flax's own LoRA, in place: each targeted projection becomes `nnx.LoRA` around it
  (float32 adapters computed in bf16, `lora_b` zeros; scale 1, i.e. alpha = rank)."""
  for block in model.blocks:
    for name in targets:
      linear = getattr(block, name)
      setattr(block, name, nnx.LoRA(linear.in_features, rank, linear.out_features,
                                    base_module=linear, dtype=jnp.bfloat16,
                                    param_dtype=jnp.float32, rngs=rngs))
  return model


def build(impl: str, config: str, s: dict, *, remat: str = "dots", attention: str | None = None,
          key=None, lr: float = 1e-4):
  """The model and its train step for one implementation.

  Returns `(step, state, trainable, parts)`: `step(state, ids) -> (state, loss)`, the
  initial state (adapters or jlora tree, optimizer state), the number of trained
  parameters, and `parts` (what the tests inspect: `graphdef`, the `loss` of the
  trained half, the `train` function).
  """
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r} is not one of {IMPLS}.")
  rank, targets = C.CONFIGS[config]
  key_w, key_a = jax.random.split(jax.random.key(0) if key is None else key)
  model = Gemma2(s, attention=attention, remat=remat, rngs=nnx.Rngs(params=key_w))
  tx = optax.adamw(lr)

  if impl == "builtin":
    add_lora(model, rank, targets, nnx.Rngs(params=key_a))
    graphdef, adapters, frozen = nnx.split(model, nnx.LoRAParam, ...)

    def adapter_loss(adapters, frozen, ids):
      return loss_fn(nnx.merge(graphdef, adapters, frozen), ids)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train(adapters, opt_state, frozen, ids):
      value, grads = jax.value_and_grad(adapter_loss)(adapters, frozen, ids)
      updates, opt_state = tx.update(grads, opt_state, adapters)
      return optax.apply_updates(adapters, updates), opt_state, value

    def step(state, ids):
      adapters, opt_state, value = train(state[0], state[1], frozen, ids)
      return (adapters, opt_state), value

    trainable = sum(x.size for x in jax.tree.leaves(adapters))
    parts = dict(graphdef=graphdef, frozen=frozen, loss=adapter_loss, train=train)
    return step, (adapters, tx.init(adapters)), int(trainable), parts

  graphdef, params = nnx.split(model)
  tree = jlora.apply(params, rank=rank, targets=list(targets), key=key_a)
  loss = jlora.lora(lambda t, ids: loss_fn(nnx.merge(graphdef, t), ids))
  train = jlora.train_step(loss, tx)

  def step(state, ids):
    tree, opt_state, value = train(state[0], state[1], ids)
    return (tree, opt_state), value

  parts = dict(graphdef=graphdef, loss=loss, train=train)
  return step, (tree, train.init(tree)), int(jlora.count(tree).trainable), parts


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("config", choices=sorted(C.CONFIGS))
  p.add_argument("--impl", required=True, choices=IMPLS)
  p.add_argument("--remat", default="dots", choices=sorted(REMAT))
  C.add_attention_arg(p)
  C.add_args(p)
  args = p.parse_args(argv)
  s = C.shape_of(args.tiny)
  batch, seq = C.batch_seq(args)
  attention = C.attention_of(args, jax.default_backend())
  rank, targets = C.CONFIGS[args.config]
  print("jax", jax.__version__, "flax", flax.__version__, jax.devices(), flush=True)

  key_m, key_d = jax.random.split(jax.random.key(0))
  step_fn, state0, trainable, _ = build(args.impl, args.config, s, remat=args.remat,
                                        attention=attention if attention != "xla" else None,
                                        key=key_m)
  ids = jax.random.randint(key_d, (batch, seq + 1), 0, s["vocab_size"])
  state = [state0]
  del state0

  def step():
    state[0], value = step_fn(state[0], ids)
    return value

  timing = C.time_steps(step, lambda v: v.block_until_ready(), warmup=args.warmup, steps=args.steps,
                        rounds=args.rounds)
  stats = jax.devices()[0].memory_stats() or {}
  r = C.row("nnx", f"nnx-{args.impl}-{args.config}-{args.remat}", timing, batch=batch, seq=seq,
            shape=s, impl=args.impl, config=args.config, rank=rank, targets=list(targets),
            remat=args.remat, attention=attention, trainable=trainable,
            peak_gib=round(stats.get("peak_bytes_in_use", 0) / 2 ** 30, 2),
            jax=jax.__version__, flax=flax.__version__,
            device=jax.devices()[0].device_kind)
  return C.emit(r, args.out)


if __name__ == "__main__":
  main()
