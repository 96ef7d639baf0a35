"""Keras's Gemma LoRA count, reproduced functionally: `enable_lora(rank)` as `jlora.apply`.

    python -m recipes.gemma_param_count --preset gemma2_2b_en --rank 4

builds the parameter tree of keras-hub's `GemmaBackbone` for the preset
abstractly (`jax.ShapeDtypeStruct` leaves: no weights allocated, nothing
downloaded), applies `jlora.apply(params, rank)` with Keras's default targets
(the attention `query` and `value` projections of every block) and Keras's
factoring (`layout="keras"`), and prints `jlora.summary`'s totals. For
`gemma2_2b_en` at rank 4 they match Keras's `backbone.summary()` after
`backbone.enable_lora(rank=4)`.

Options: `--table` prints the whole summary table, `--targets REGEX` adapts
other kernels (e.g. `--targets 'attention/(query|key|value|attention_output)|ffw'`),
`--layout fan` factors the standard fan-in/fan-out way, `--list` lists presets.
"""

from __future__ import annotations

import argparse
import sys


def count_text(preset: str, rank: int, *, targets: str | None = None, layout: str = "keras",
               table: bool = False) -> str:
  """The summary (totals only, unless `table`) of `preset` with rank-`rank` LoRA."""
  import jax

  import jlora
  from recipes.models import gemma

  cfg = gemma.config(preset)
  shapes = gemma.abstract_params(cfg)
  in_axes = {r"attention/(query|key|value)/kernel$": (1,),
             r"attention_output/kernel$": (0, 1), ".*": (0,)} if layout == "fan" else None
  lora = jax.eval_shape(
      lambda p: jlora.apply(p, rank=rank, targets=targets, layout=layout, in_axes=in_axes),
      shapes)
  text = jlora.summary(lora)
  if not table:
    text = "\n".join(text.splitlines()[-3:])
  head = (f"{preset}: Gemma {cfg.generation}, {cfg.num_layers} blocks, hidden {cfg.hidden_dim}, "
          f"{cfg.num_query_heads} query / {cfg.num_key_value_heads} key-value heads of "
          f"{cfg.head_dim}, vocabulary {cfg.vocabulary_size:,}; LoRA rank {rank}, targets "
          f"{targets or 'query and value (Keras default)'}, layout {layout!r}")
  return head + "\n" + text


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m recipes.gemma_param_count",
      description="Parameter counts of a keras-hub Gemma preset with LoRA applied by jlora "
                  "(abstract: nothing is allocated or downloaded).")
  parser.add_argument("--preset", default="gemma2_2b_en",
                      help="a keras-hub Gemma 1 or Gemma 2 preset (default: gemma2_2b_en)")
  parser.add_argument("--rank", type=int, default=4, help="the LoRA rank (default: 4)")
  parser.add_argument("--targets", default=None,
                      help="a regular expression over Keras variable paths (default: Keras's "
                           "query and value projections)")
  parser.add_argument("--layout", default="keras", choices=("keras", "fan"),
                      help="how 3-D attention kernels are factored (default: keras)")
  parser.add_argument("--table", action="store_true", help="print the whole summary table")
  parser.add_argument("--list", action="store_true", help="list the known presets and exit")
  args = parser.parse_args(argv)

  from recipes.models import gemma

  if args.list:
    for name, cfg in sorted(gemma.PRESETS.items()):
      print(f"{name:32s} Gemma {cfg.generation}, {cfg.num_layers} blocks, "
            f"hidden {cfg.hidden_dim}")
    return 0
  try:
    print(count_text(args.preset, args.rank, targets=args.targets, layout=args.layout,
                     table=args.table))
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
