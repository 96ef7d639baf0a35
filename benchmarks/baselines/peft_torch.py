"""Baseline: Hugging Face PEFT LoRA on transformers' Gemma 2, PyTorch, on the Gemma-2-2B shape.

The model is `transformers.Gemma2ForCausalLM` built from a `Gemma2Config` of the
Gemma 2 2B shape (bench_common.GEMMA2_2B), random init, cast to bf16; attention
through `sdpa` (PyTorch's fused attention). The attention-logit soft-cap is off
(`attn_logit_softcapping=None`), as in jlora's benchmark model and the hand-written
baseline: transformers' sdpa path has none (older versions skip it silently, newer
ones refuse it). The final-logit soft-cap 30 stays. LoRA through
`peft.get_peft_model(LoraConfig(r, lora_alpha=r, lora_dropout=0))` (adapters in
float32, PEFT's default for a bf16 base), `torch.optim.AdamW(lr=1e-4,
weight_decay=1e-4, fused=True)` (optax.adamw's defaults), the model's own loss
(`labels=input_ids`), and `torch.compile(model)` with `--compile`.

Usage (one configuration per process):

  python benchmarks/baselines/peft_torch.py qv4|all16 [--compile] [--attention sdpa|eager] [--tiny]

Prints one JSON row: tokens/s, peak memory (`torch.cuda.max_memory_allocated`,
counted from the first training step: the float32 model built before the cast is
not counted), MFU (bench_common's FLOP model). `--tiny` runs on the CPU; where the
installed transformers refuses sdpa for Gemma 2 it then uses eager attention and
says so in the row (a GPU run fails instead).
"""

from __future__ import annotations

import argparse
import os
import sys

import peft
import torch
import transformers

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench_common as C  # noqa: E402


def gemma2_config(s: dict, attention: str) -> transformers.Gemma2Config:
  """The shape `s` as a `Gemma2Config` (RoPE base: Gemma 2's and transformers' default, 10,000)."""
  assert s["rope_theta"] == 10_000.0, s["rope_theta"]
  kw = {k: v for k, v in s.items() if k != "rope_theta"}
  return transformers.Gemma2Config(
      **kw, query_pre_attn_scalar=s["head_dim"], attn_logit_softcapping=None,
      hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True,
      attn_implementation=attention)


def build_model(s: dict, attention: str, device, tiny: bool):
  """`(model, attention used)`; bf16 weights, random init, on `device`."""
  try:
    cfg = gemma2_config(s, attention)
    with torch.device(device):
      model = transformers.Gemma2ForCausalLM(cfg)
  except ValueError as e:
    if not (tiny and attention != "eager"):
      raise
    print(f"# {attention} refused by transformers {transformers.__version__} ({str(e)[:80]}...): "
          f"eager attention for this dry run", flush=True)
    return build_model(s, "eager", device, tiny)[0], f"eager ({attention} refused)"
  return model.to(torch.bfloat16), attention


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("config", choices=sorted(C.CONFIGS))
  p.add_argument("--compile", action="store_true", help="torch.compile the model")
  p.add_argument("--attention", default="sdpa", choices=("sdpa", "eager"))
  C.add_args(p)
  args = p.parse_args(argv)
  s = C.shape_of(args.tiny)
  batch, seq = C.batch_seq(args)
  rank, targets = C.CONFIGS[args.config]
  cuda = torch.cuda.is_available() and not args.tiny
  device = torch.device("cuda" if cuda else "cpu")
  print("torch", torch.__version__, "transformers", transformers.__version__, "peft",
        peft.__version__, torch.cuda.get_device_name() if cuda else "cpu", flush=True)

  torch.manual_seed(0)
  model, attention = build_model(s, args.attention, device, args.tiny)
  model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0,
                                                     target_modules=list(targets)))
  model.train()
  trainable = [w for w in model.parameters() if w.requires_grad]
  opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=1e-4, fused=cuda)
  forward = torch.compile(model) if args.compile else model
  ids = torch.randint(0, s["vocab_size"], (batch, seq), device=device)
  if cuda:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()

  def step():
    loss = forward(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()

  sync = (lambda _: torch.cuda.synchronize()) if cuda else (lambda _: None)
  timing = C.time_steps(step, sync, warmup=args.warmup, steps=args.steps, rounds=args.rounds)
  peak = torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else 0.0
  r = C.row("peft", args.config + ("_compile" if args.compile else ""), timing, batch=batch,
            seq=seq, shape=s, config=args.config, rank=rank, targets=list(targets),
            compile=args.compile, attention=attention,
            trainable=int(sum(w.numel() for w in trainable)),
            adapter_dtype=str(trainable[0].dtype).removeprefix("torch."), peak_gib=round(peak, 2),
            torch=torch.__version__,
            transformers=transformers.__version__, peft=peft.__version__,
            device=torch.cuda.get_device_name() if cuda else "cpu")
  return C.emit(r, args.out)


if __name__ == "__main__":
  main()
