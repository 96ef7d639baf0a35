"""Turns run_gpu.sh's results.jsonl into the README's tables (Markdown), and records a run.

Usage:
  python benchmarks/make_table.py runs/gpu/results.jsonl [more.jsonl] [--phase table|attribution]
      [--versions runs/gpu/versions.json]
  python benchmarks/make_table.py runs/gpu/results.jsonl \\
      --record benchmarks/results/gemma2_h200.json --run 17 --machine N --note "what ran, where"

Two tables, each from the rows of one run_gpu.sh phase (one device call, so its
ratios compare rows of one machine): the comparison (`table`: jlora against PEFT,
keras-hub and the hand-written JAX step, both configurations) and the attribution
(`attribution`: jlora's benchmark model, one change at a time: the merge path
instead of the factored step, the plain loss, autodiff's RoPE gradient, XLA's dots
remat policy). The exit status is 1 when a row is missing. `--record` appends the
rows, tagged with `run` and `machine`, to the results JSON (the history;
`machines[machine]` gets the note).
"""

from __future__ import annotations

import argparse
import json
import sys

# (label, suite, row names: the first one found is shown), in table order.
COMPARISON = [
    ("**jlora** r=4 q,v", "jlora", ("qv4",)),
    ("PEFT r=4 q,v", "peft", ("qv4_compile", "qv4")),
    ("keras-hub r=4 q,v (`enable_lora`)", "keras", ("qv4",)),
    ("hand-written JAX r=4 q,v", "handwritten", ("qv4",)),
    ("**jlora** r=16 all-linear", "jlora", ("all16",)),
    ("PEFT r=16 all-linear", "peft", ("all16_compile", "all16")),
    ("keras-hub r=16 seven projections (`enable_lora`)", "keras", ("all16",)),
    ("hand-written JAX r=16 all-linear", "handwritten", ("all16",)),
]
# (label, jlora row name, the row it is compared with, whose share the difference is).
ATTRIBUTION = [
    ("r=4 q,v as in the table", "qv4", None, None),
    ("r=4 q,v, merge path (`jlora.merge` in the step)", "qv4_merge", "qv4",
     "jlora: the factored step"),
    ("r=4 q,v, plain loss (full float32 logits)", "qv4_plainloss", "qv4", "model: the fused loss"),
    ("r=4 q,v, autodiff's RoPE gradient", "qv4_ropeautodiff", "qv4", "model: RoPE's custom VJP"),
    ("r=4 q,v, remat `dots` (XLA's policy)", "qv4_dots", "qv4", "model: its remat policy"),
    ("r=16 all-linear as in the table", "all16", None, None),
    ("r=16 all-linear, merge path", "all16_merge", "all16", "jlora: the factored step"),
]


def latest(rows: list[dict], phase: str | None) -> dict:
  """The last measured row of each (suite, name), of `phase` (rows without one count too)."""
  out = {}
  for r in rows:
    if "tokens_s" in r and r.get("phase", phase) == phase:
      out[(r["suite"], r["name"])] = r
  return out


def _n(x, fmt="{:,}"):
  return "—" if x is None else fmt.format(x)


def comparison(rows: list[dict]) -> tuple[list[str], list[str]]:
  """The comparison table's lines, and the rows it misses."""
  by = latest(rows, "table")
  missing = []
  lines = ["| configuration | tokens/s | peak GiB | MFU | jlora's speed-up |",
           "|---|---:|---:|---:|---:|"]
  for label, suite, names in COMPARISON:
    r = next((by[(suite, n)] for n in names if (suite, n) in by), None)
    if r is None:
      missing.append(f"{suite}/{names[0]}")
      lines.append(f"| {label} | not run | | | |")
      continue
    if suite == "peft":
      label += f" ({'torch.compile' if r.get('compile') else 'eager'}, {r.get('attention')})"
    if suite == "handwritten":
      label += f" (remat {r.get('remat')})"
    j = by.get(("jlora", r.get("config")))
    ratio = "" if suite == "jlora" or j is None else f"{j['tokens_s'] / r['tokens_s']:.2f}×"
    lines.append(f"| {label} | {_n(r['tokens_s'])} | {_n(r.get('peak_gib'), '{:.1f}')} | "
                 f"{_n(r.get('mfu'), '{:.2f}')} | {ratio} |")
  return lines, missing


def attribution(rows: list[dict]) -> tuple[list[str], list[str]]:
  """The attribution table's lines, and the rows it misses."""
  by = latest(rows, "attribution")
  missing = []
  lines = ["| jlora's benchmark model | tokens/s | peak GiB | the table's row is faster by | "
           "whose share |", "|---|---:|---:|---:|---|"]
  for label, name, base, what in ATTRIBUTION:
    r = by.get(("jlora", name))
    if r is None:
      missing.append(f"jlora/{name}")
      lines.append(f"| {label} | not run | | | |")
      continue
    gain = ""
    if base and ("jlora", base) in by:
      gain = f"{(by[('jlora', base)]['tokens_s'] / r['tokens_s'] - 1) * 100:+.1f} %"
    lines.append(f"| {label} | {_n(r['tokens_s'])} | {_n(r.get('peak_gib'), '{:.1f}')} | "
                 f"{gain} | {what or ''} |")
  return lines, missing


def tables(rows: list[dict], phases, versions: dict | None = None) -> tuple[str, list[str]]:
  """`(markdown, missing rows)` of the tables of `phases`."""
  lines, missing = [], []
  for phase in phases:
    table, miss = (comparison if phase == "table" else attribution)(rows)
    lines += ([""] if lines else []) + table
    missing += miss
  measured = [r for r in rows if "tokens_s" in r]
  any_row = measured[0] if measured else {}
  setup = (f"\nBatch {any_row.get('batch')} × {any_row.get('seq')} tokens"
           f"{' (--tiny: a CPU dry run, the numbers mean nothing)' if any_row.get('tiny') else ''}"
           f"; "
           f"median of 3 rounds of 8 steps after 3 warm-up steps; each row its own process.")
  lines.append(setup)
  if versions:
    lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + ".")
  return "\n".join(lines) + "\n", missing


def record(rows: list[dict], path: str, run: int, machine: str, note: str) -> int:
  with open(path) as f:
    data = json.load(f)
  new = [dict(r, run=run, machine=machine) for r in rows]
  data["rows"].extend(new)
  if note:
    data.setdefault("machines", {})[machine] = note
  with open(path, "w") as f:
    json.dump(data, f, indent=1)
    f.write("\n")
  return len(new)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("results", nargs="+", help="run_gpu.sh's results.jsonl (one or more)")
  p.add_argument("--phase", choices=("table", "attribution", "both"), default="both")
  p.add_argument("--versions", default="", help="run_gpu.sh's versions.json")
  p.add_argument("--record", default="", help="append the rows to this results JSON")
  p.add_argument("--run", type=int, default=0)
  p.add_argument("--machine", default="")
  p.add_argument("--note", default="")
  args = p.parse_args(argv)
  rows = []
  for path in args.results:
    with open(path) as f:
      rows += [json.loads(line) for line in f if line.strip()]
  versions = None
  if args.versions:
    try:
      with open(args.versions) as f:
        versions = json.load(f)
    except (OSError, ValueError):
      versions = None
  if args.record:
    if not (args.run and args.machine):
      p.error("--record needs --run and --machine")
    print(f"recorded {record(rows, args.record, args.run, args.machine, args.note)} rows "
          f"in {args.record}", file=sys.stderr)
  phases = ("table", "attribution") if args.phase == "both" else (args.phase,)
  text, missing = tables(rows, phases, versions)
  print(text, end="")
  failed = [r["job"] for r in rows if (r.get("rc") not in (None, 0) or r.get("skipped"))
            and r.get("phase") in phases]
  if missing or failed:
    print(f"\nMissing rows: {', '.join(missing) or 'none'}; failed or skipped jobs: "
          f"{', '.join(failed) or 'none'}.")
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
