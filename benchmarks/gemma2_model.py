"""A Gemma-2-2B-shaped Flax Linen model for jlora's GPU benchmark.

The architecture is Gemma 2's: token embedding scaled by sqrt(width) and tied to
the output; per block four RMSNorms with `(1 + scale)` (pre/post attention,
pre/post feed-forward), grouped-query attention with rotary position
embeddings, a GeGLU feed-forward (tanh-approximated GELU), and a final-logit
soft-cap `cap * tanh(z / cap)`. The default `Gemma2Config` is Gemma 2 2B: 26
blocks, width 2304, 8 query / 4 key-value heads of 256, GeGLU width 9216,
vocabulary 256,000 (2,614,341,888 parameters).

By default the layers are stacked for `lax.scan` (`nn.scan` over one `Block`),
so every kernel under `layers/` has a leading axis of length `num_layers`, and
`jlora.apply(params, rank, stacked=r"^layers/")` adapts them;
`Gemma2Config(layers="unstacked")` gives 26 separate blocks `layers_0/...`
instead (plain `jlora.apply(params, rank)`). The projections are plain
`nn.Dense` kernels named as in Hugging Face (`q_proj`, ..., `down_proj`), so
jlora adapts `q_proj`/`v_proj` by default and all seven projections with
`targets="all-linear"`.

Attention (`Gemma2Config.attention`):
  * `"cudnn"`: `jax.nn.dot_product_attention(..., implementation="cudnn")`, the
    fused flash-attention kernel, causal. Like PEFT's sdpa path it drops Gemma
    2's attention-logit soft-cap (50); everything else is unchanged.
  * `"xla"`: the same function through XLA (no soft-cap), for CPUs.
  * `"softcap"`: explicit einsums with the attention-logit soft-cap, the exact
    Gemma 2 math (slow and memory-hungry at long sequences).
  At the benchmark's 1024 tokens Gemma 2's 4096-token sliding window on every
  other layer masks nothing, so it is omitted.

The loss (`Gemma2.__call__(ids, labels)`) is the mean next-token cross-entropy
of the soft-capped logits. With `loss_chunk > 0` it runs through
`softcap_cross_entropy`, which never materializes the (tokens x 256,000)
logits: see there.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax
from jax.ad_checkpoint import checkpoint_name

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
REMAT_POLICIES = ("none", "names", "wide", "wide_mid", "names_xa", "wide_xa", "wide_mid_xa", "dots",
                  "nothing")
# What "wide" keeps beyond "names": the normed block inputs, q and k after RoPE, the GeGLU product.
WIDE_NAMES = ("attn_in", "q_rope", "k_rope", "ffw_in", "mlp_act")
# What "wide_mid" keeps beyond "wide": the residual stream between attention and feed-forward,
# and each RMSNorm's per-token mean square (one float32 per token).
MID_NAMES = ("res_mid", "norm_ms")
ATTENTIONS = ("cudnn", "xla", "softcap")
LAYERS = ("scan", "loop", "unstacked")
LOSS_MATH = ("exp", "tanh", "pallas")


@dataclasses.dataclass(frozen=True)
class Gemma2Config:
  """Sizes and execution options of the benchmark model (defaults: Gemma 2 2B).

  Attributes:
    vocab_size: token vocabulary; the embedding is tied to the output.
    width: model width (`hidden_size`).
    num_layers: decoder blocks.
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention).
    head_dim: width of one head.
    ffw_width: width of each of the two GeGLU projections.
    final_logit_cap: the final-logit soft-cap (None: no cap).
    attn_logit_cap: the attention-logit soft-cap, used by `attention="softcap"` only.
    rope_base: rotary embedding base.
    dtype: parameter and activation dtype.
    attention: `"cudnn"`, `"xla"` or `"softcap"` (see the module docstring).
    remat: what the backward pass keeps of each block. `"names"`: the outputs
      of the seven projections (after any LoRA branch is added) and the fused
      attention kernel's outputs, everything else recomputed; `"dots"`: every
      matmul output without batch dimensions (XLA's
      `dots_with_no_batch_dims_saveable`, so base and LoRA-branch outputs are
      kept apart) plus the attention kernel's outputs; `"nothing"`: only the
      block inputs; `"none"`: no rematerialization. `"wide"` also keeps the
      normed block inputs, RoPE'd q and k and the GeGLU product; `"wide_mid"`
      also the residual stream between attention and feed-forward and the
      RMSNorms' per-token mean squares, so the backward pass recomputes no norm
      statistic. A `"_xa"` suffix (`"names_xa"`, `"wide_xa"`, `"wide_mid_xa"`)
      also keeps the adapters' `x·a`.
    loss_chunk: tokens per chunk of the fused cross-entropy; 0 computes the
      full logits (the plain reference path).
    layers: how the blocks run. `"scan"`: `nn.scan` over one `Block`, weights
      stacked on a leading axis (`layers/q_proj/kernel` is `(26, 2304, 2048)`);
      `"loop"`: a Python loop over the same stacked weights, sliced per layer;
      `"unstacked"`: a Python loop over 26 separate blocks `layers_0` ...
      `layers_25` with their own (unstacked) weights, as most Flax and Hugging
      Face checkpoints lay them out. The last two are unrolled in the compiled
      program.
    scan_unroll: `nn.scan`'s `unroll` (blocks per loop iteration) for `"scan"`.
    logits_dtype: the dtype the head matmul writes (`bfloat16` by default,
      as the baselines' `x @ E.T` in bf16 followed by a cast); the soft-cap,
      log-sum-exp and gradient are computed in float32 either way.
    loss_math: `softcap_cross_entropy`'s `math` (`"exp"`, `"pallas"` or `"tanh"`).
    rope_vjp: RoPE's gradient as one inverse rotation (`apply_rope`); False
      leaves it to autodiff (for A/B rows).
  """

  vocab_size: int = 256_000
  width: int = 2304
  num_layers: int = 26
  num_heads: int = 8
  num_kv_heads: int = 4
  head_dim: int = 256
  ffw_width: int = 9216
  final_logit_cap: float | None = 30.0
  attn_logit_cap: float | None = 50.0
  rope_base: float = 10_000.0
  dtype: Any = jnp.bfloat16
  attention: str = "cudnn"
  remat: str = "names"
  loss_chunk: int = 4096
  logits_dtype: Any = jnp.bfloat16
  layers: str = "scan"
  scan_unroll: int = 1
  loss_math: str = "exp"
  rope_vjp: bool = True

  def __post_init__(self):
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"Gemma2Config: remat={self.remat!r} is not one of {REMAT_POLICIES}.")
    if self.attention not in ATTENTIONS:
      raise ValueError(f"Gemma2Config: attention={self.attention!r} is not one of {ATTENTIONS}.")
    if self.loss_math not in LOSS_MATH:
      raise ValueError(f"Gemma2Config: loss_math={self.loss_math!r} is not one of {LOSS_MATH}.")
    if self.layers not in LAYERS:
      raise ValueError(f"Gemma2Config: layers={self.layers!r} is not one of {LAYERS}.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"Gemma2Config: num_heads={self.num_heads} must be a multiple of "
                       f"num_kv_heads={self.num_kv_heads}.")

  @property
  def num_params(self) -> int:
    """All parameters (the tied embedding counted once)."""
    d, h, k, hd, f = self.width, self.num_heads, self.num_kv_heads, self.head_dim, self.ffw_width
    block = d * (h + 2 * k) * hd + h * hd * d + 3 * d * f + 4 * d
    return self.vocab_size * d + self.num_layers * block + d

  @property
  def matmul_params(self) -> int:
    """Parameters that take part in matmuls (norm scales excluded; the tied head counted once)."""
    return self.num_params - (4 * self.num_layers + 1) * self.width


def tiny_config(**kw) -> Gemma2Config:
  """A CPU-sized configuration with the same structure (for tests)."""
  base = dict(vocab_size=512, width=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
              ffw_width=128, attention="xla", loss_chunk=16)
  base.update(kw)
  return Gemma2Config(**base)


# --------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
  """Gemma's RMSNorm: `x / rms(x) * (1 + scale)`, computed in float32."""

  dtype: Any = jnp.bfloat16

  @nn.compact
  def __call__(self, x):
    scale = self.param("scale", nn.initializers.zeros_init(), (x.shape[-1],), self.dtype)
    x32 = x.astype(jnp.float32)
    # The mean square is named (not 1/rms): rsqrt's derivative needs its input, so a
    # policy keeping this small per-token value spares the backward pass the reduction.
    ms = checkpoint_name(jnp.mean(x32 * x32, axis=-1, keepdims=True) + 1e-6, "norm_ms")
    return (x32 * lax.rsqrt(ms) * (1.0 + scale.astype(jnp.float32))).astype(x.dtype)


def rope_tables(seq_len: int, head_dim: int, base: float):
  """`(sin, cos)` of shape `(seq_len, head_dim // 2)`, float32."""
  half = head_dim // 2
  freq = 1.0 / (base ** (jnp.arange(half, dtype=jnp.float32) / half))
  ang = jnp.arange(seq_len, dtype=jnp.float32)[:, None] * freq[None, :]
  return jnp.sin(ang), jnp.cos(ang)


def _rotate(x, sin, cos):
  """`[x1·c − x2·s, x2·c + x1·s]` over the halves of `x`'s last axis (float32 math)."""
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  s, c = sin[None, :, None, :], cos[None, :, None, :]
  return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


@jax.custom_vjp
def apply_rope(x, sin, cos):
  """Rotates the two halves of the last axis of `x` (batch, seq, heads, head_dim).

  The gradient is the inverse rotation (`sin -> -sin`), written as one more
  rotation: autodiff's transpose of the halves' slices and concatenation is two
  padded halves added, a slower pass on GPUs. `sin` and `cos` (tables, see
  `rope_tables`) get no gradient.
  """
  return _rotate(x, sin, cos)


def _apply_rope_fwd(x, sin, cos):
  return _rotate(x, sin, cos), (sin, cos)


def _apply_rope_bwd(res, g):
  sin, cos = res
  return _rotate(g, -sin, cos), jnp.zeros_like(sin), jnp.zeros_like(cos)


apply_rope.defvjp(_apply_rope_fwd, _apply_rope_bwd)


def _kernel_init(stddev_of_fan_in: Callable[[int], float] = lambda n: n ** -0.5):
  def init(key, shape, dtype=jnp.float32):
    return (jax.random.normal(key, shape, jnp.float32) * stddev_of_fan_in(shape[-2])).astype(dtype)
  return init


def _softcap_attention(q, k, v, cap, scale):
  """Causal grouped-query attention with Gemma 2's attention-logit soft-cap."""
  b, t, h, d = q.shape
  kv = k.shape[2]
  q = q.reshape(b, t, kv, h // kv, d)
  logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
  if cap is not None:
    logits = cap * jnp.tanh(logits / cap)
  mask = jnp.tril(jnp.ones((t, t), bool))
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  p = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bkgts,bskd->btkgd", p, v).reshape(b, t, h, d)


class Block(nn.Module):
  """One Gemma 2 decoder block; `(x, rope) -> (x, None)` for `nn.scan`."""

  cfg: Gemma2Config

  def _dense(self, features, name):
    return nn.Dense(features, use_bias=False, dtype=self.cfg.dtype, param_dtype=self.cfg.dtype,
                    kernel_init=_kernel_init(), name=name)

  @nn.compact
  def __call__(self, x, rope):
    c = self.cfg
    b, t, _ = x.shape
    sin, cos = rope
    norm = lambda name: RMSNorm(c.dtype, name=name)

    h = checkpoint_name(norm("pre_attn_norm")(x), "attn_in")
    q = checkpoint_name(self._dense(c.num_heads * c.head_dim, "q_proj")(h), "q_proj")
    k = checkpoint_name(self._dense(c.num_kv_heads * c.head_dim, "k_proj")(h), "k_proj")
    v = checkpoint_name(self._dense(c.num_kv_heads * c.head_dim, "v_proj")(h), "v_proj")
    rope = apply_rope if c.rope_vjp else _rotate
    q = checkpoint_name(rope(q.reshape(b, t, c.num_heads, c.head_dim), sin, cos), "q_rope")
    k = checkpoint_name(rope(k.reshape(b, t, c.num_kv_heads, c.head_dim), sin, cos), "k_rope")
    v = v.reshape(b, t, c.num_kv_heads, c.head_dim)
    scale = c.head_dim ** -0.5  # Gemma 2 2B: query_pre_attn_scalar = head_dim
    if c.attention == "softcap":
      a = _softcap_attention(q, k, v, c.attn_logit_cap, scale)
    else:
      a = jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                       implementation="cudnn" if c.attention == "cudnn" else None)
    a = checkpoint_name(a.reshape(b, t, c.num_heads * c.head_dim), "attention")
    o = checkpoint_name(self._dense(c.width, "o_proj")(a), "o_proj")
    x = checkpoint_name(x + norm("post_attn_norm")(o), "res_mid")

    h = checkpoint_name(norm("pre_ffw_norm")(x), "ffw_in")
    gate = checkpoint_name(self._dense(c.ffw_width, "gate_proj")(h), "gate_proj")
    up = checkpoint_name(self._dense(c.ffw_width, "up_proj")(h), "up_proj")
    m = checkpoint_name(jax.nn.gelu(gate, approximate=True) * up, "mlp_act")
    down = checkpoint_name(self._dense(c.width, "down_proj")(m), "down_proj")
    x = x + norm("post_ffw_norm")(down)
    return x, None


def _is_fused_attention(prim) -> bool:
  return prim.name.startswith("dot_product_attention_fwd")


def remat_policy(name: str):
  """The `jax.checkpoint` policy for `Gemma2Config.remat` (None for `"none"`).

  `"names_xa"` and `"wide_xa"` also keep every LoRA adapter activation `x·a`,
  which `jlora.lora` names `"jlora_xa"` (r values per token), instead of
  recomputing it and its input in the backward pass.
  """
  if name == "none":
    return None
  if name == "nothing":
    return jax.checkpoint_policies.nothing_saveable
  xa = ("jlora_xa", "jlora_dora") if name.endswith("_xa") else ()  # jlora's names
  name = name.removesuffix("_xa")
  if name == "dots":
    keep = jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  elif name in ("wide", "wide_mid"):
    mid = MID_NAMES if name == "wide_mid" else ()
    keep = jax.checkpoint_policies.save_only_these_names(*PROJECTIONS, "attention", *WIDE_NAMES,
                                                         *mid, *xa)
  else:
    keep = jax.checkpoint_policies.save_only_these_names(*PROJECTIONS, "attention", *xa)

  def policy(prim, *args, **params):
    # The fused attention kernel's outputs (attention output and softmax
    # statistics) are kept too, so its forward is not run again in the backward.
    return _is_fused_attention(prim) or keep(prim, *args, **params)

  return policy


# --------------------------------------------------------------------------- the loss


def _softcap_terms_kernel(z_ref, u_ref, s_ref, *, cap):
  z = z_ref[...].astype(jnp.float32)
  r = 1.0 / (1.0 + jnp.exp(z * (2.0 / cap)))  # cap*tanh(z/cap) - cap = -2 cap r
  e = jnp.exp(-2.0 * cap * r)
  u_ref[...] = (e * (4.0 * r * (1.0 - r))).astype(u_ref.dtype)  # 1 - tanh^2 = 4 r (1 - r)
  s_ref[...] = jnp.sum(e, axis=1, keepdims=True)


def _pow2_divisor(n: int, most: int) -> int:
  b = 1
  while b * 2 <= most and n % (b * 2) == 0:
    b *= 2
  return b


def softcap_terms(z, cap: float, dtype=jnp.bfloat16, block=(2, 2048), num_warps=4):
  """`(u, Z)` of soft-capped logits `z` (tokens x vocabulary) in one pass over `z`.

  With `e = exp(cap * tanh(z / cap) - cap)`: `u = e * (1 - tanh(z / cap)^2)` in
  `dtype` and the row sums `Z = sum(e, -1)` in float32. A Pallas kernel (Triton on
  GPUs; Pallas's interpreter on CPUs, for tests) reads each `block` of `z` once,
  writes its `u` and a partial row sum; XLA adds the partial sums
  (tokens x vocab/block[1]). `block` is capped at the largest powers of two that
  divide `z`'s dimensions; `num_warps` is Triton's, per block (tuned with
  `benchmarks/softcap_kernel_bench.py`). Other backends raise: use `math="exp"` there.
  """
  from jax.experimental import pallas as pl
  m, v = z.shape
  bm, bv = _pow2_divisor(m, block[0]), _pow2_divisor(v, block[1])
  backend = jax.default_backend()
  if backend not in ("gpu", "cpu"):
    raise ValueError(f"softcap_terms: the Pallas kernel is written for GPUs (Triton), not "
                     f"{backend!r}; use softcap_cross_entropy(..., math='exp') there.")
  on_gpu = backend == "gpu"
  params = {}
  if on_gpu:
    from jax.experimental.pallas import triton as plt
    params = dict(compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1))
  u, part = pl.pallas_call(
      functools.partial(_softcap_terms_kernel, cap=float(cap)),
      out_shape=(jax.ShapeDtypeStruct((m, v), dtype),
                 jax.ShapeDtypeStruct((m, v // bv), jnp.float32)),
      grid=(m // bm, v // bv),
      in_specs=[pl.BlockSpec((bm, bv), lambda i, j: (i, j))],
      out_specs=(pl.BlockSpec((bm, bv), lambda i, j: (i, j)),
                 pl.BlockSpec((bm, 1), lambda i, j: (i, j))),
      interpret=not on_gpu, name="softcap_terms", **params)(z)
  return u, jnp.sum(part, axis=1)


def _softcap_sum_and_u(z, cap, math, dtype, want_u):
  """`(Z, u)` of a chunk of logits (see `_xent_chunks`; `u` is None unless `want_u`).

  `"exp"`: with `r = 1 / (1 + exp(2z/cap))`, `cap*tanh(z/cap) - cap = -2 cap r` and
  `1 - tanh^2 = 4 r (1 - r)`, so `e = exp(-2 cap r)` and `u = e * 4 r (1 - r)`; `1/d` is
  `rsqrt(d)^2` (d >= 1): exponentials and reciprocal square roots only, the GPU's fast
  special functions. The sum and `u` are written with different (equal) expressions, so
  the compiler fuses each straight from `z` rather than storing a shared float32
  intermediate of the whole chunk. `"pallas"`: the same math in one pass
  (`softcap_terms`). `"tanh"`: the same quantities through tanh and divisions.
  """
  if math == "pallas" and want_u:
    u, big_z = softcap_terms(z, cap, dtype=dtype)
    return big_z, u
  if math == "tanh":
    x = z.astype(jnp.float32) / cap
    big_z = jnp.sum(jnp.exp(cap * jnp.tanh(x) - cap), axis=-1)
    if not want_u:
      return big_z, None
    q = jnp.exp(-2.0 * jnp.abs(x))
    th = jnp.sign(x) * (1.0 - q) / (1.0 + q)
    return big_z, (jnp.exp(cap * th - cap) * (4.0 * q / jnp.square(1.0 + q))).astype(dtype)
  x2 = z.astype(jnp.float32) * (2.0 / cap)
  r = jnp.square(lax.rsqrt(1.0 + jnp.exp(x2)))
  big_z = jnp.sum(jnp.exp(-2.0 * cap * r), axis=-1)
  if not want_u:
    return big_z, None
  p = jnp.square(lax.rsqrt(1.0 + jnp.exp(-x2)))  # = 1 - r
  return big_z, (jnp.exp(2.0 * cap * (p - 1.0)) * (4.0 * p * (1.0 - p))).astype(dtype)


def _xent_chunks(h, emb, labels, weights, *, cap, chunk, logits_dtype, inv_n, want_dh,
                 want_demb, math="exp"):
  """Loss sum over token chunks and, optionally, the gradients of the mean loss.

  For each chunk of tokens, `z = h_c @ emb.T` is written once in `logits_dtype`.
  With a soft-cap, float32 passes over `z` compute
  `s = cap * tanh(z / cap)`, `e = exp(s - cap)` (in (0, 1], since |s| <= cap: no
  max pass), the row sums `Z = sum(e)` (so `lse = cap + log Z`), and
  `u = e * (1 - tanh^2)`, written in `h`'s dtype. The gradient of the mean loss is
  `dz = (e / Z - onehot) * (1 - tanh^2) * w / n`; its two terms are applied
  separately, so nothing else of size tokens x vocabulary is read or written:
  `dh_c = (u @ emb) * (w / (n Z)) - (1 - tanh_label^2) * (w / n) * emb[label]`,
  and likewise `demb`. Without a cap it is the plain max-shifted log-sum-exp, with
  `dz = (softmax(z) - onehot) * w / n` formed in `h`'s dtype.
  """
  n_tok, d = h.shape
  nc = n_tok // chunk
  hs = h.reshape(nc, chunk, d)
  ls = labels.reshape(nc, chunk)
  ws = weights.reshape(nc, chunk)
  want_grad = want_dh or want_demb

  def body(demb, xs):
    hc, lc, wc = xs
    z = jnp.einsum("cd,vd->cv", hc, emb, preferred_element_type=logits_dtype)
    z_tgt = jnp.take_along_axis(z, lc[:, None], axis=-1)[:, 0].astype(jnp.float32)
    if cap is not None:
      big_z, u = _softcap_sum_and_u(z, cap, math, h.dtype, want_u=want_grad)
      lse = cap + jnp.log(big_z)
      th_tgt = jnp.tanh(z_tgt / cap)
      loss = jnp.sum((lse - cap * th_tgt) * wc)
      if not want_grad:
        return demb, (loss, None)
      row = (wc * inv_n / big_z)[:, None]  # scales u's rows
      lab = ((1.0 - th_tgt * th_tgt) * wc * inv_n)[:, None]  # the onehot term's rows
    else:
      zf = z.astype(jnp.float32)
      mx = lax.stop_gradient(jnp.max(zf, axis=-1))
      lse = mx + jnp.log(jnp.sum(jnp.exp(zf - mx[:, None]), axis=-1))
      loss = jnp.sum((lse - z_tgt) * wc)
      if not want_grad:
        return demb, (loss, None)
      u = (jnp.exp(zf - lse[:, None]) * (wc * inv_n)[:, None]).astype(h.dtype)
      row = None
      lab = (wc * inv_n)[:, None]
    e_tgt = jnp.take(emb, lc, axis=0).astype(jnp.float32)
    dh = None
    if want_dh:
      du = jnp.einsum("cv,vd->cd", u, emb, preferred_element_type=jnp.float32)
      dh = ((du if row is None else du * row) - lab * e_tgt).astype(h.dtype)
    if want_demb:
      hf = hc.astype(jnp.float32)
      hs_ = (hf if row is None else hf * row).astype(h.dtype)
      demb = demb + jnp.einsum("cv,cd->vd", u, hs_, preferred_element_type=jnp.float32)
      demb = demb.at[lc].add(-lab * hf)
    return demb, (loss, dh)

  demb0 = jnp.zeros(emb.shape, jnp.float32) if want_demb else None
  demb, (losses, dh) = lax.scan(body, demb0, (hs, ls, ws))
  dh = None if dh is None else dh.reshape(n_tok, d)
  return jnp.sum(losses), dh, demb


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _fused_xent(h, emb, labels, weights, cap, chunk, logits_dtype, math):
  n = jnp.maximum(jnp.sum(weights), 1.0)
  loss, _, _ = _xent_chunks(h, emb, labels, weights, cap=cap, chunk=chunk,
                            logits_dtype=logits_dtype, inv_n=None, want_dh=False,
                            want_demb=False, math=math)
  return loss / n


def _fused_xent_fwd(h, emb, labels, weights, cap, chunk, logits_dtype, math):
  hv, ev, lv, wv = h.value, emb.value, labels.value, weights.value
  n = jnp.maximum(jnp.sum(wv), 1.0)
  loss, dh, demb = _xent_chunks(hv, ev, lv, wv, cap=cap, chunk=chunk, logits_dtype=logits_dtype,
                                inv_n=1.0 / n, want_dh=h.perturbed, want_demb=emb.perturbed,
                                math=math)
  if demb is not None:
    demb = demb.astype(ev.dtype)
  return loss / n, (dh, demb, None)


def _fused_xent_bwd(cap, chunk, logits_dtype, math, res, ct):
  dh, demb, _ = res
  if isinstance(ct, jax.custom_derivatives.SymbolicZero):
    return None, None, None, None
  scale = lambda x: None if x is None else (x.astype(jnp.float32) * ct).astype(x.dtype)
  return scale(dh), scale(demb), None, None


_fused_xent.defvjp(_fused_xent_fwd, _fused_xent_bwd, symbolic_zeros=True)


def softcap_cross_entropy(h, emb, labels, *, cap: float | None = 30.0, chunk: int = 2048,
                          logits_dtype=jnp.bfloat16, weights=None, math: str = "exp"):
  """Mean cross-entropy of `cap * tanh(h @ emb.T / cap)` against `labels`, fused and chunked.

  Tokens are processed `chunk` at a time, and the forward pass computes the
  gradients with respect to `h` (and `emb`, only when `emb` is differentiated)
  as it goes (a `jax.custom_vjp`): no (tokens x vocabulary) array is kept for
  the backward pass, nothing is recomputed, and the largest temporaries are one
  chunk of logits and its gradient factor (both in `h`'s dtype; see
  `_xent_chunks`). The head matmuls keep their `2 * tokens * vocab * width`
  FLOPs each: one for the logits, one for `dh`, and one more for `demb` in a
  full fine-tune.

  Args:
    h: final hidden states, `(tokens, width)` (any leading shape is flattened).
    emb: the tied embedding, `(vocab, width)`.
    labels: int targets with `h`'s leading shape.
    cap: the final-logit soft-cap (None: plain logits).
    chunk: tokens per chunk (the token count is padded up to a multiple).
    logits_dtype: the dtype of the logits matmul's output.
    weights: optional per-token loss weights (default ones); the loss is
      `sum(w * nll) / sum(w)`.
    math: how the soft-capped terms are computed: `"exp"` (exponentials and
      reciprocal square roots only, two XLA passes over each chunk of logits),
      `"pallas"` (`softcap_terms`, one pass) or `"tanh"` (tanh and divisions;
      slower on GPUs, kept for comparison). See `_xent_chunks`.

  Returns:
    The scalar float32 loss.
  """
  d = h.shape[-1]
  h = h.reshape(-1, d)
  labels = labels.reshape(-1).astype(jnp.int32)
  n = h.shape[0]
  w = jnp.ones((n,), jnp.float32) if weights is None else weights.reshape(-1).astype(jnp.float32)
  chunk = max(1, min(chunk, n))
  pad = (-n) % chunk
  if pad:
    h = jnp.pad(h, ((0, pad), (0, 0)))
    labels = jnp.pad(labels, (0, pad))
    w = jnp.pad(w, (0, pad))
  if math not in LOSS_MATH:
    raise ValueError(f"softcap_cross_entropy: math={math!r} is not one of {LOSS_MATH}.")
  loss = _fused_xent(h, emb, labels, w, cap, chunk, jnp.dtype(logits_dtype), math)
  return loss


def plain_cross_entropy(h, emb, labels, *, cap: float | None = 30.0, logits_dtype=jnp.bfloat16):
  """The reference loss: full float32 logits, `log_softmax`, mean NLL."""
  logits = jnp.einsum("...d,vd->...v", h, emb, preferred_element_type=logits_dtype)
  logits = logits.astype(jnp.float32)
  if cap is not None:
    logits = cap * jnp.tanh(logits / cap)
  lp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.mean(jnp.take_along_axis(lp, labels[..., None].astype(jnp.int32), axis=-1))


# --------------------------------------------------------------------------- the model


class Gemma2(nn.Module):
  """The Gemma 2 decoder. `apply(v, ids)` -> soft-capped float32 logits;
  `apply(v, ids, labels)` -> the mean next-token loss."""

  cfg: Gemma2Config

  @nn.compact
  def __call__(self, ids, labels=None):
    c = self.cfg
    emb = self.param("embedding", _kernel_init(lambda _: c.width ** -0.5),
                     (c.vocab_size, c.width), c.dtype)
    x = jnp.take(emb, ids, axis=0) * jnp.asarray(math.sqrt(c.width), c.dtype)
    rope = rope_tables(ids.shape[1], c.head_dim, c.rope_base)

    policy = remat_policy(c.remat)
    if c.layers == "scan":
      block = Block
      if c.remat != "none":
        block = nn.remat(Block, policy=policy, prevent_cse=False)
      scanned = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=nn.broadcast, length=c.num_layers, unroll=c.scan_unroll)
      x, _ = scanned(c, name="layers")(x, rope)
    elif c.layers == "unstacked":
      block = Block if c.remat == "none" else nn.remat(Block, policy=policy, prevent_cse=True)
      for i in range(c.num_layers):
        x, _ = block(c, name=f"layers_{i}")(x, rope)
    else:
      stacked = self.param("layers", functools.partial(_init_stacked, c))

      def block(p, x):
        return Block(c).apply({"params": p}, x, rope)[0]

      if c.remat != "none":
        block = jax.checkpoint(block, policy=policy, prevent_cse=True)
      for i in range(c.num_layers):
        layer = jax.tree.map(lambda w: lax.index_in_dim(w, i, 0, keepdims=False), stacked)
        x = block(layer, x)
    x = RMSNorm(c.dtype, name="final_norm")(x)

    if labels is None:
      logits = jnp.einsum("btd,vd->btv", x, emb, preferred_element_type=c.logits_dtype)
      logits = logits.astype(jnp.float32)
      if c.final_logit_cap is not None:
        logits = c.final_logit_cap * jnp.tanh(logits / c.final_logit_cap)
      return logits
    if c.loss_chunk > 0:
      return softcap_cross_entropy(x, emb, labels, cap=c.final_logit_cap, chunk=c.loss_chunk,
                                   logits_dtype=c.logits_dtype, math=c.loss_math)
    return plain_cross_entropy(x, emb, labels, cap=c.final_logit_cap,
                               logits_dtype=c.logits_dtype)


def _init_stacked(cfg: Gemma2Config, key: jax.Array) -> dict:
  """The parameters of `num_layers` blocks stacked on a leading axis (as `nn.scan` makes them)."""
  shape_cfg = dataclasses.replace(cfg, attention="xla")
  x = jnp.zeros((1, 1, cfg.width), cfg.dtype)
  rope = rope_tables(1, cfg.head_dim, cfg.rope_base)
  init_one = lambda k: Block(shape_cfg).init(k, x, rope)["params"]
  return jax.vmap(init_one)(jax.random.split(key, cfg.num_layers))


def init_params(cfg: Gemma2Config, key: jax.Array, kernel_fn=None) -> dict:
  """Random parameters with the model's structure, drawn straight from the PRNG.

  Kernels ~ N(0, 1/fan_in), the embedding ~ N(0, 1/width), norm scales zero
  (the same distributions as the modules' initializers). Cheaper to compile than
  `model.init`, which also traces the forward pass; jit it to build on device.
  `kernel_fn(path, key, shape_dtype, std)`, if given, makes each kernel in place of
  drawing it (e.g. draws and quantizes it, a layer at a time), so the float kernels
  never coexist.
  """
  shape_cfg = dataclasses.replace(cfg, attention="xla")  # shapes only: any attention will do
  shapes = jax.eval_shape(lambda k: Gemma2(shape_cfg).init(k, jnp.zeros((1, 1), jnp.int32)), key)
  flat, treedef = jax.tree_util.tree_flatten_with_path(shapes["params"])
  out = []
  for i, (path, s) in enumerate(flat):
    name = "/".join(str(getattr(p, "key", p)) for p in path)
    k = jax.random.fold_in(key, i)
    if name.endswith("scale"):
      out.append(jnp.zeros(s.shape, s.dtype))
    elif name == "embedding":
      out.append((jax.random.normal(k, s.shape, jnp.float32) * cfg.width ** -0.5).astype(s.dtype))
    elif kernel_fn is not None:
      out.append(kernel_fn(name, k, s, s.shape[-2] ** -0.5))
    else:
      out.append((jax.random.normal(k, s.shape, jnp.float32) * s.shape[-2] ** -0.5)
                 .astype(s.dtype))
  return jax.tree_util.tree_unflatten(treedef, out)
