#!/usr/bin/env bash
# Downloads the wheels that the GPU benchmark needs and a GPU machine without a package registry lacks:
# keras, keras-hub, namex and optree, at the versions pinned in benchmarks/requirements-gpu.txt, for
# CPython 3.12 on x86-64 Linux (the workplace's GPU image). Run it on a machine that reaches PyPI,
# from the repository root; then carry .whl/ to the GPU machine (it is git-ignored), where
# benchmarks/run_gpu.sh installs them into /tmp/site for the keras-hub jobs.
#
# Usage: bash benchmarks/fetch_wheels.sh [DEST]        (DEST: default .whl)
#   PY=.venv/bin/python bash benchmarks/fetch_wheels.sh  (any Python whose pip can download)
set -euo pipefail
DEST=${1:-.whl}
PY=${PY:-python3}
REQ=benchmarks/requirements-gpu.txt
[ -f "$REQ" ] || { echo "fetch_wheels.sh: run it from the repository root ($REQ not found)" >&2; exit 2; }
# keras, namex, optree are pinned lines; keras-hub is pinned in the file's no-deps comment line.
PINS=$(grep -oE '^(keras|namex|optree)==[0-9A-Za-z.]+' "$REQ"; grep -oE 'keras-hub==[0-9A-Za-z.]+' "$REQ" | head -1)
[ "$(echo "$PINS" | wc -l)" = 4 ] || { echo "fetch_wheels.sh: expected 4 pins in $REQ, got: $PINS" >&2; exit 2; }
mkdir -p "$DEST"
# One version of each package in DEST: two of one package would stop the install on the GPU machine.
for pin in $PINS; do
  name=${pin%%==*}
  rm -f "$DEST/${name//-/_}"-*.whl
done
# shellcheck disable=SC2086
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$DEST" $PINS
ls -l "$DEST"/*.whl
