"""The test suite's XLA CPU settings, shared with scripts that must reproduce the tests' numbers
(benchmarks/qlora_real_cpu.py).

The tests compile about two thousand small programs and run each once or twice, so XLA's CPU
compiler takes three quarters of their time. These settings make it about three times faster:
the loop emitters instead of the newer MLIR fusion emitters, one code-generation thread per
program, and no LLVM optimization passes (`jax_disable_most_optimizations`). The HLO passes
(fusion, buffer assignment, the memory analyses tests/test_factored_memory.py reads) are the
same. jaxlib 0.11 removed the fusion-emitter switch (an unknown XLA flag aborts the process).
"""

import importlib.metadata
import os


def set_xla_flags():
  """Adds the flags to XLA_FLAGS: call before JAX creates its backend (subprocesses inherit
  them)."""
  jaxlib = tuple(int(p) for p in importlib.metadata.version("jaxlib").split(".")[:2])
  os.environ["XLA_FLAGS"] = " ".join(filter(None, [
      os.environ.get("XLA_FLAGS"),
      "--xla_cpu_use_fusion_emitters=false" if jaxlib < (0, 11) else None,
      "--xla_cpu_parallel_codegen_split_count=1"]))


def configure_jax():
  """The JAX side: no LLVM optimization passes."""
  import jax
  jax.config.update("jax_disable_most_optimizations", True)
