"""Baseline: keras-hub's Gemma with `enable_lora`, JAX backend, on the Gemma-2-2B shape.

The model is `keras_hub.models.GemmaCausalLM` over a `GemmaBackbone` with Gemma 2
2B's configuration (bench_common.GEMMA2_2B, mapped to keras-hub's arguments as its
Hugging Face converter does: `intermediate_dim` is the two GeGLU halves together,
post-attention and post-feed-forward norms, soft-caps, sliding window), random
init, `dtype="bfloat16"`. Keras computes Gemma 2's attention itself, with the
attention-logit soft-cap 50 (einsums, not a fused kernel): that is keras-hub's
path, which the table reports as it is. `backbone.enable_lora(rank)` adapts the
`query` and `value` layers (`qv4`); `all16` passes the seven projections'
layer names. Keras keeps the adapters in float32 and forms `W + A·B` in every
forward pass.

The train step is the Keras JAX-backend loop: `model.stateless_call` under
`jax.value_and_grad`, `keras.optimizers.AdamW(1e-4, weight_decay=1e-4)`'s
`stateless_apply`, the whole step `jax.jit`-compiled with the trainable and
optimizer variables donated; the loss is
`keras.losses.SparseCategoricalCrossentropy(from_logits=True)` on the soft-capped
logits.

Usage (one configuration per process; needs keras 3.15.1 and keras-hub 0.32.0, see
benchmarks/requirements-gpu.txt):

  KERAS_BACKEND=jax python benchmarks/baselines/keras_hub_lora.py qv4|all16 [--tiny]

Prints one JSON row: tokens/s, peak device memory (`peak_bytes_in_use`), MFU.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_common as C  # noqa: E402

# keras-hub's Gemma layer names for the seven projections (Hugging Face names as keys).
KERAS_NAMES = dict(q_proj="query", k_proj="key", v_proj="value", o_proj="attention_output",
                   gate_proj="ffw_gating", up_proj="ffw_gating_2", down_proj="ffw_linear")


def backbone(s: dict, dtype: str = "bfloat16") -> keras_hub.models.GemmaBackbone:
  """keras-hub's Gemma 2 backbone of shape `s`, random init."""
  return keras_hub.models.GemmaBackbone(
      vocabulary_size=s["vocab_size"], num_layers=s["num_hidden_layers"],
      num_query_heads=s["num_attention_heads"], num_key_value_heads=s["num_key_value_heads"],
      hidden_dim=s["hidden_size"], intermediate_dim=2 * s["intermediate_size"],
      head_dim=s["head_dim"], query_head_dim_normalize=True, use_post_ffw_norm=True,
      use_post_attention_norm=True, final_logit_soft_cap=s["final_logit_softcapping"],
      attention_logit_soft_cap=50.0, use_sliding_window_attention=True, sliding_window_size=4096,
      layer_norm_epsilon=s["rms_norm_eps"], dtype=dtype)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("config", choices=sorted(C.CONFIGS))
  C.add_args(p)
  args = p.parse_args(argv)
  if keras.backend.backend() != "jax":
    raise SystemExit(f"keras_hub_lora.py: KERAS_BACKEND is {keras.backend.backend()!r}; run it "
                     f"with KERAS_BACKEND=jax.")
  s = C.shape_of(args.tiny)
  batch, seq = C.batch_seq(args)
  rank, targets = C.CONFIGS[args.config]
  print("keras", keras.__version__, "keras_hub", keras_hub.__version__, "jax", jax.__version__,
        jax.devices(), flush=True)

  keras.utils.set_random_seed(0)
  bb = backbone(s)
  total = bb.count_params()
  # qv4: enable_lora's own default targets (query, value); all16: the seven projections.
  names = None if args.config == "qv4" else [KERAS_NAMES[t] for t in targets]
  bb.enable_lora(rank=rank, target_layer_names=names)
  model = keras_hub.models.GemmaCausalLM(backbone=bb, preprocessor=None)
  loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  opt = keras.optimizers.AdamW(learning_rate=1e-4, weight_decay=1e-4)
  opt.build(model.trainable_variables)

  def loss(trainable, frozen, x, y):
    logits, _ = model.stateless_call(trainable, frozen, x, training=True)
    return loss_fn(y, logits)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(trainable, opt_vars, frozen, x, y):
    value, grads = jax.value_and_grad(loss)(trainable, frozen, x, y)
    trainable, opt_vars = opt.stateless_apply(opt_vars, grads, trainable)
    return trainable, opt_vars, value

  ids = np.random.default_rng(0).integers(0, s["vocab_size"], (batch, seq + 1), dtype=np.int32)
  x = dict(token_ids=jax.numpy.asarray(ids[:, :-1]),
           padding_mask=jax.numpy.ones((batch, seq), np.int32))
  y = jax.numpy.asarray(ids[:, 1:])
  frozen = [v.value for v in model.non_trainable_variables]
  state = [[v.value for v in model.trainable_variables], [v.value for v in opt.variables]]

  def step():
    state[0], state[1], value = train_step(state[0], state[1], frozen, x, y)
    return value

  timing = C.time_steps(step, lambda v: v.block_until_ready(), warmup=args.warmup, steps=args.steps,
                        rounds=args.rounds)
  stats = jax.devices()[0].memory_stats() or {}
  trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
  r = C.row("keras", args.config, timing, batch=batch, seq=seq, shape=s, config=args.config,
            rank=rank, targets=[KERAS_NAMES[t] for t in targets], total=int(total),
            trainable=trainable, adapter_dtype=str(state[0][0].dtype),
            peak_gib=round(stats.get("peak_bytes_in_use", 0) / 2 ** 30, 2),
            keras=keras.__version__,
            keras_hub=keras_hub.__version__, jax=jax.__version__,
            device=jax.devices()[0].device_kind)
  return C.emit(r, args.out)


if __name__ == "__main__":
  main()
