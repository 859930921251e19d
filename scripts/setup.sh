#!/usr/bin/env bash
# Create .venv with epd and its test tools. Idempotent; safe to run on a fresh clone.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
# torch first and pinned: the local CPU wheel; a looser request would pull GBs of CUDA packages.
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q -e '.[dev]'
