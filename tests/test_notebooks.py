"""The two Colab notebooks, executed top to bottom in a fresh kernel in their small (CI) mode.

They run in both test environments: the main one and the free Colab TPU runtime's stack
(`JLORA_STACK=colab`, Python 3.13, jax 0.7.2; see tests/conftest.py), where their install cells
find everything present, as on Colab.
"""

import pytest

from tests.helpers import REPO, run_notebook

pytestmark = pytest.mark.slow


def test_gemma_notebook_small_configuration(monkeypatch):
  monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
  monkeypatch.setenv("PYTHONPATH", str(REPO))
  # Two host devices, so the notebook's mesh really shards the batch and the weights.
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2", prepend=" ")
  text = run_notebook("gemma_lora.ipynb", timeout=300)
  assert "on cpu:" in text  # the accelerator check ran and passed
  assert "Trainable params: 2,928,640" in text
  assert "2 device(s): NamedSharding(mesh=Mesh('data': 2" in text
  assert "Keras trainable params after write-back" in text
  assert "generated: [" in text


def test_shakespeare_notebook_short_configuration(monkeypatch):
  monkeypatch.setenv("JLORA_NB_SMALL", "1")
  monkeypatch.setenv("PYTHONPATH", str(REPO))
  text = run_notebook("shakespeare_lora.ipynb", timeout=600)
  assert "on cpu:" in text
  assert "Paris" in text
  assert "Trainable params: 460,800" in text
  assert "restored logits identical: True; frozen weights unchanged: True" in text
