"""The same-model table of `run_gpu.sh tax`: each model's own LoRA against jlora on it.

Reads the phase's results.jsonl and prints one Markdown row per pair: tokens/s of both (the
median round, and the spread of the rounds as min-max), jlora's ratio, and both peaks.

Usage: python benchmarks/tax_table.py runs/gpu/results.jsonl [more.jsonl ...]
"""

from __future__ import annotations

import json
import sys

# (suite, the peer's impl) -> the fields that name a pair
PEERS = {"handwritten": "inline", "nnx": "builtin", "keras": "keras"}


def rows(paths):
  for path in paths:
    with open(path) as f:
      for line in f:
        r = json.loads(line)
        if "tokens_s" in r and r.get("suite") in PEERS:
          yield r


def key(r):
  return (r["suite"], r["config"], r.get("layout", ""),
          r.get("remat", ""), r.get("fold", "auto"))


def spread(r):
  b, s = r["batch"] * r["seq"], r["step_s_rounds"]
  return f"{round(b / max(s)):,}-{round(b / min(s)):,}"


def same(p, j) -> str:
  """Whether the two compiled steps have the same statistics (`--hlo-stats`), if both have."""
  if "hlo_stats" not in p or "hlo_stats" not in j:
    return ""
  return "yes" if p["hlo_stats"] == j["hlo_stats"] else "no"


def table(paths) -> str:
  peer, ours = {}, {}
  for r in rows(paths):
    k = key(r)
    if r.get("impl", PEERS[r["suite"]]) == PEERS[r["suite"]]:
      peer[k[:4]] = r
    else:
      ours[k] = r
  out = ["| model | config | layout | remat | peer tokens/s (rounds) | jlora tokens/s (rounds) "
         "| jlora / peer | peak GiB peer / jlora | same program |",
         "|---|---|---|---|---:|---:|---:|---:|---|"]
  for k in sorted(ours, key=lambda k: (k[0], k[1], k[2], k[3], k[4])):
    j, p = ours[k], peer.get(k[:4])
    fold = "" if k[4] == "auto" else f" (fold {k[4]})"
    if p is None:
      out.append(f"| {k[0]} | {k[1]}{fold} | {k[2]} | {k[3]} | - | {j['tokens_s']:,} | - | - | |")
      continue
    ratio = j["tokens_s"] / p["tokens_s"]
    out.append(f"| {k[0]} | {k[1]}{fold} | {k[2]} | {k[3]} | {p['tokens_s']:,} ({spread(p)}) | "
               f"{j['tokens_s']:,} ({spread(j)}) | {ratio:.3f} | {p['peak_gib']} / "
               f"{j['peak_gib']} | {same(p, j)} |")
  return "\n".join(out)


if __name__ == "__main__":
  print(table(sys.argv[1:]))
