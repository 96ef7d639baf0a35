"""PEFT's mixed-adapter batch: one forward with `adapter_names` (one adapter per example).

The peer row of benchmarks/multi_gpu.py: the Gemma-2-2B-shaped `Gemma2ForCausalLM` of
peft_torch.py (bf16, random init, sdpa), 16 LoRA adapters of rank 8 on q_proj and v_proj (random
non-zero B), batch 8 x 1024, `torch.no_grad()`. Rows: one adapter active for the whole batch, and
the mixed batch `model(input_ids, adapter_names=[...])`, which PEFT runs as a loop over the
examples' adapters (its documented behaviour). Prints one JSON row each (median of rounds).

  python benchmarks/baselines/peft_multi.py [--tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import peft
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_common as C  # noqa: E402
from peft_torch import build_model  # noqa: E402

N = 16


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tiny", action="store_true")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--steps", type=int, default=4)
  p.add_argument("--batch", type=int, default=0, help="examples (default 8; 4 tiny)")
  p.add_argument("--seq", type=int, default=0, help="tokens per example (default 1024)")
  a = p.parse_args(argv)
  dev = "cpu" if a.tiny else "cuda"
  batch, seq = (a.batch, a.seq) if a.batch else ((4, 32) if a.tiny else (8, 1024))
  torch.manual_seed(0)
  model, attn = build_model(C.shape_of(a.tiny), "sdpa", dev, a.tiny)
  cfg = peft.LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                        init_lora_weights=False)  # random A and B: every adapter changes outputs
  model = peft.get_peft_model(model, cfg, adapter_name="a0")
  for i in range(1, N):
    model.add_adapter(f"a{i}", cfg)
  model.to(torch.bfloat16).eval()
  ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=dev)
  # random draws when the batch is smaller than N, else every adapter on batch/N examples
  order = (torch.randint(0, N, (batch,)) if batch < N else
           torch.arange(N).repeat(-(-batch // N))[:batch][torch.randperm(batch)])
  names = [f"a{i}" for i in order.tolist()]

  def run(mixed):
    with torch.no_grad():
      if mixed:
        return model(input_ids=ids, adapter_names=names).logits
      return model(input_ids=ids).logits

  sync = (lambda _: torch.cuda.synchronize()) if dev == "cuda" else (lambda _: None)
  for mixed in (False, True):
    t = C.time_steps(lambda: run(mixed), sync, warmup=2, steps=a.steps, rounds=a.rounds)
    print(json.dumps(dict(suite="peft_multi", name="forward_16_mixed" if mixed else
                          "forward_single", adapters=N, step_s=t["step_s"],
                          step_s_rounds=t["step_s_rounds"],
                          tokens_s=round(batch * seq / t["step_s"]), attention=attn, batch=batch,
                          seq=seq, distinct=len(set(names)),
                          peft=peft.__version__, torch=torch.__version__)), flush=True)


if __name__ == "__main__":
  main()
