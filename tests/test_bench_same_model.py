"""benchmarks/baselines/jax_handwritten.py on the tiny model: the inline LoRA and the same
model through jlora are one experiment, and for q,v they compile to one program.

On the CPU the rule that folds wide up-projections does not run (GPUs only), so every
configuration's jlora step should be the inline step's program: same instruction counts,
temporary bytes, FLOPs and bytes (`hlo_stats`). The GPU rows (benchmarks/README.md) measure
what the fold adds there.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
from baselines import jax_handwritten as H  # noqa: E402


def _rows(config, layout, remat):
  common = [config, "--layout", layout, "--remat", remat, "--tiny", "--hlo-stats",
            "--warmup", "1", "--steps", "1", "--rounds", "1"]
  return H.main(common + ["--impl", "inline"]), H.main(common + ["--impl", "jlora"])


def _check(config, layout, remat):
  inline, lora = _rows(config, layout, remat)
  assert inline["trainable"] == lora["trainable"] > 0
  assert inline["loss_first"] == lora["loss_first"]  # b = 0: the model itself, same weights
  assert inline["hlo_stats"]["instructions"].get("dot", 0) > 0
  assert lora["hlo_stats"] == inline["hlo_stats"]


def test_jlora_step_is_the_inline_step():
  _check("qv4", "scan", "dots")


@pytest.mark.slow
@pytest.mark.parametrize("config,layout,remat", [("all16", "loop", "names"),
                                                 ("all16", "scan", "nothing"),
                                                 ("qv4", "loop", "none"),
                                                 ("all16", "scan", "dots")])
def test_jlora_step_is_the_inline_step_in_other_layouts(config, layout, remat):
  _check(config, layout, remat)
