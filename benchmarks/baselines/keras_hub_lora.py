"""Baseline: keras-hub's Gemma with `enable_lora`, JAX backend, on the Gemma-2-2B shape;
and the same model's LoRA through `jlora.keras` (`--impl jlora`).

The model is `keras_hub.models.GemmaCausalLM` over a `GemmaBackbone` with Gemma 2
2B's configuration (bench_common.GEMMA2_2B, mapped to keras-hub's arguments as its
Hugging Face converter does: `intermediate_dim` is the two GeGLU halves together,
post-attention and post-feed-forward norms, soft-caps, sliding window), random
init, `dtype="bfloat16"`. Keras computes Gemma 2's attention itself, with the
attention-logit soft-cap 50 (einsums, not a fused kernel): that is keras-hub's
path, which the table reports as it is.

Two implementations of one LoRA on that model (`--impl`):

- `keras` (default): Keras's own LoRA. `backbone.enable_lora(rank)` adapts the
  `query` and `value` layers (`qv4`); `all16` passes the seven projections'
  layer names. Keras keeps the adapters in float32 and forms `W + A·B` in every
  forward pass. The train step is the Keras JAX-backend loop:
  `model.stateless_call` under `jax.value_and_grad`,
  `keras.optimizers.AdamW(1e-4, weight_decay=1e-4)`'s `stateless_apply`, the
  whole step `jax.jit`-compiled with the trainable and optimizer variables
  donated.
- `jlora`: the same backbone (same seed, so the same weights) without
  `enable_lora`; its variables as a tree (`jlora.keras.params`, sharing the
  model's buffers), `jlora.apply` on the same layers with Keras's factoring
  (`layout="keras"`: per-head `A` of shape `kernel.shape[:-1] + (r,)`, `B (r,
  kernel.shape[-1])`, float32, alpha = rank, so the trainable count is
  `enable_lora`'s), the forward `jlora.keras.apply_fn(model, mode="lora")`
  (Keras's `stateless_call` with each adapted kernel computed factored,
  `x·W + s·(x·A)·B`), and `jlora.train_step(loss, optax.adamw(1e-4,
  weight_decay=1e-4))` (jitted, adapters and optimizer state donated). The
  optimizer differs from the Keras row's only because each implementation uses
  its own ecosystem's AdamW; it is not what the two rows compare (both update
  only the adapters, element-wise).

Both compute `keras.losses.SparseCategoricalCrossentropy(from_logits=True)` on
the model's soft-capped logits, on one fixed random batch. Both train the same
parameters: at Gemma 2 2B's shape 2,928,640 for `qv4` and 31,842,304 for `all16`
(`enable_lora`'s counts in the README's table; `jlora.count` of `jlora_targets`
applied to `recipes.models.gemma.abstract_params("gemma2_2b_en")` gives the same).

Usage (one configuration per process; needs keras 3.15.1 and keras-hub 0.32.0, see
benchmarks/requirements-gpu.txt):

  KERAS_BACKEND=jax python benchmarks/baselines/keras_hub_lora.py qv4|all16 \\
      [--impl keras|jlora] [--tiny [--head-dim 32]]

`--tiny` with `--impl jlora` runs `qv4` only: `jlora.apply` refuses a rank that is not
below both sides of the factored kernel, and `all16`'s rank 16 meets the tiny model's
16-wide heads (a query kernel `(4, 64, 16)` is factored as 256 x 16), where Keras
accepts it. `--head-dim 32` gives the tiny model 32-wide heads, for a dry run of
`all16` with both implementations.

Prints one JSON row: tokens/s, peak device memory (`peak_bytes_in_use`), MFU. The
row's suite is `keras` and its `impl` field names the implementation; the jlora
rows are named `qv4_jlora` and `all16_jlora`, so make_table.py's `keras` rows
(`qv4`, `all16`) stay Keras's own.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import types

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import keras  # noqa: E402
import keras_hub  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_common as C  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# keras-hub's Gemma layer names for the seven projections (Hugging Face names as keys).
KERAS_NAMES = dict(q_proj="query", k_proj="key", v_proj="value", o_proj="attention_output",
                   gate_proj="ffw_gating", up_proj="ffw_gating_2", down_proj="ffw_linear")
IMPLS = ("keras", "jlora")
LR = WEIGHT_DECAY = 1e-4


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


def batch_of(s: dict, batch: int, seq: int) -> tuple[dict, jax.Array]:
  """The fixed random batch: `(inputs, labels)`, the labels the inputs shifted by one."""
  ids = np.random.default_rng(0).integers(0, s["vocab_size"], (batch, seq + 1), dtype=np.int32)
  x = dict(token_ids=jax.numpy.asarray(ids[:, :-1]),
           padding_mask=jax.numpy.ones((batch, seq), np.int32))
  return x, jax.numpy.asarray(ids[:, 1:])


def keras_impl(s: dict, config: str, x, y, *, lr: float = LR) -> types.SimpleNamespace:
  """Keras's LoRA: `enable_lora` and the Keras JAX training loop (the module docstring).

  Returns a namespace: `step()` runs one train step and returns its loss; `state` holds
  `[trainable values, optimizer values]` (in `model.trainable_variables`' order); `model`,
  `total` (the backbone's parameters before LoRA), `trainable`, `adapter_dtype`,
  `optimizer`, and `fields` for the row.
  """
  rank, targets = C.CONFIGS[config]
  keras.utils.set_random_seed(0)
  bb = backbone(s)
  total = bb.count_params()
  # qv4: enable_lora's own default targets (query, value); all16: the seven projections.
  names = None if config == "qv4" else [KERAS_NAMES[t] for t in targets]
  bb.enable_lora(rank=rank, target_layer_names=names)
  model = keras_hub.models.GemmaCausalLM(backbone=bb, preprocessor=None)
  loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  opt = keras.optimizers.AdamW(learning_rate=lr, weight_decay=WEIGHT_DECAY)
  opt.build(model.trainable_variables)

  def loss(trainable, frozen, x, y):
    logits, _ = model.stateless_call(trainable, frozen, x, training=True)
    return loss_fn(y, logits)

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(trainable, opt_vars, frozen, x, y):
    value, grads = jax.value_and_grad(loss)(trainable, frozen, x, y)
    trainable, opt_vars = opt.stateless_apply(opt_vars, grads, trainable)
    return trainable, opt_vars, value

  frozen = [v.value for v in model.non_trainable_variables]
  state = [[v.value for v in model.trainable_variables], [v.value for v in opt.variables]]

  def step():
    state[0], state[1], value = train_step(state[0], state[1], frozen, x, y)
    return value

  trainable = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
  return types.SimpleNamespace(step=step, state=state, model=model, total=int(total),
                               trainable=trainable, adapter_dtype=str(state[0][0].dtype),
                               optimizer="keras.optimizers.AdamW", fields={})


def jlora_targets(config: str) -> list[str]:
  """`jlora.apply` patterns selecting the kernels of the layers `enable_lora` adapts."""
  _, targets = C.CONFIGS[config]
  return [rf"(^|/){KERAS_NAMES[t]}/kernel$" for t in targets]


def jlora_impl(s: dict, config: str, x, y, *, lr: float = LR) -> types.SimpleNamespace:
  """The same LoRA through `jlora.keras` and `jlora.train_step` (the module docstring).

  Returns a namespace as `keras_impl`'s, `state` being `[tree, optimizer state]`.
  """
  # Imported here, so the Keras row needs neither; jlora from this checkout, as the other
  # benchmark scripts import it.
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  import optax  # pylint: disable=import-outside-toplevel

  import jlora  # pylint: disable=import-outside-toplevel
  import jlora.keras as jk  # pylint: disable=import-outside-toplevel

  rank, _ = C.CONFIGS[config]
  keras.utils.set_random_seed(0)
  bb = backbone(s)
  total = bb.count_params()
  model = keras_hub.models.GemmaCausalLM(backbone=bb, preprocessor=None)
  loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
  # copy=False: the tree holds the model's own buffers (as the Keras row's `frozen` list
  # does); nothing here runs Keras's fit/predict, which would donate them.
  tree = jlora.apply(jk.params(model, copy=False), rank=rank, targets=jlora_targets(config),
                     layout="keras")
  forward = jk.apply_fn(model, mode="lora")

  def loss(tree, x, y):
    return loss_fn(y, forward(tree, x, training=True))

  train_step = jlora.train_step(loss, optax.adamw(lr, weight_decay=WEIGHT_DECAY))
  state = [tree, train_step.init(tree)]

  def step():
    state[0], state[1], value = train_step(state[0], state[1], x, y)
    return value

  first = next(leaf for leaf in jax.tree.leaves(tree, is_leaf=jlora.is_lora)
               if jlora.is_lora(leaf))
  return types.SimpleNamespace(step=step, state=state, model=model, total=int(total),
                               trainable=jlora.count(tree).trainable,
                               adapter_dtype=str(first.a.dtype), optimizer="optax.adamw",
                               fields=dict(mode="lora", jlora=jlora.__version__))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("config", choices=sorted(C.CONFIGS))
  p.add_argument("--impl", choices=IMPLS, default="keras",
                 help="keras: enable_lora and Keras's training loop (default); jlora: "
                      "jlora.keras.apply_fn and jlora.train_step on the same model")
  p.add_argument("--head-dim", type=int, default=None,
                 help="override the shape's head_dim (e.g. 32 with --tiny for all16 --impl "
                      "jlora, see the module docstring)")
  C.add_args(p)
  args = p.parse_args(argv)
  if keras.backend.backend() != "jax":
    raise SystemExit(f"keras_hub_lora.py: KERAS_BACKEND is {keras.backend.backend()!r}; run it "
                     f"with KERAS_BACKEND=jax.")
  s = C.shape_of(args.tiny)
  if args.head_dim:
    s["head_dim"] = args.head_dim
  batch, seq = C.batch_seq(args)
  rank, targets = C.CONFIGS[args.config]
  print("keras", keras.__version__, "keras_hub", keras_hub.__version__, "jax", jax.__version__,
        jax.devices(), flush=True)

  x, y = batch_of(s, batch, seq)
  run = (keras_impl if args.impl == "keras" else jlora_impl)(s, args.config, x, y)
  timing = C.time_steps(run.step, lambda v: v.block_until_ready(), warmup=args.warmup,
                        steps=args.steps, rounds=args.rounds)
  stats = jax.devices()[0].memory_stats() or {}
  name = args.config if args.impl == "keras" else f"{args.config}_{args.impl}"
  extra = dict(head_dim=s["head_dim"]) if args.head_dim else {}
  r = C.row("keras", name, timing, batch=batch, seq=seq, shape=s, impl=args.impl,
            config=args.config, rank=rank, targets=[KERAS_NAMES[t] for t in targets],
            total=run.total, trainable=run.trainable, adapter_dtype=run.adapter_dtype,
            optimizer=run.optimizer, **run.fields, **extra,
            peak_gib=round(stats.get("peak_bytes_in_use", 0) / 2 ** 30, 2),
            keras=keras.__version__,
            keras_hub=keras_hub.__version__, jax=jax.__version__,
            device=jax.devices()[0].device_kind)
  return C.emit(r, args.out)


if __name__ == "__main__":
  main()
