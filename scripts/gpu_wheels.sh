#!/usr/bin/env bash
# Download, for CPython 3.12 on x86-64 Linux, the wheels of what the GPU machine lacks to run
# epd (server and tests), at exactly the versions in requirements/lock.txt, dependencies
# included (scripts/lock_subset.py reads the closure from the lock). The GPU machine has no
# network; carry DIR there and install with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl
#   export PYTHONPATH=/tmp/site
# Usage: bash scripts/gpu_wheels.sh DIR [PACKAGE ...]   (default: what that machine lacks)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:?usage: gpu_wheels.sh DIR [PACKAGE ...]}
shift
# The GPU image ships torch, transformers, tokenizers, numpy, pillow, prometheus-client, rich,
# httpx, matplotlib, pytest; these are the rest (openai: the server tests' client).
PACKAGES=("$@")
[ ${#PACKAGES[@]} -gt 0 ] || PACKAGES=(fastapi uvicorn uvloop pydantic pyzmq msgspec openai blake3 pybase64)
[ -x .venv/bin/python ] || bash scripts/setup.sh
mkdir -p "$DIR"
PINS=$(.venv/bin/python scripts/lock_subset.py --python 3.12 "${PACKAGES[@]}")
PLATFORMS=()
for tag in manylinux_2_{39,35,34,31,28,27,24,17,5}_x86_64 manylinux2014_x86_64 manylinux1_x86_64 linux_x86_64; do
    PLATFORMS+=(--platform "$tag")
done
# shellcheck disable=SC2086
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${PLATFORMS[@]}" -d "$DIR" $PINS
echo "$(ls "$DIR" | wc -l) wheels in $DIR ($(du -sh "$DIR" | cut -f1)):"
ls "$DIR"
