#!/usr/bin/env bash
# Create .venv with epd and its test tools, at the versions pinned in requirements/lock.txt.
# Idempotent; safe to run on a fresh clone and again after the lock changes.
#   VENV=DIR       where to put the environment (default .venv)
#   EPD_DEPS=latest  newest releases pyproject allows instead of the lock (scripts/test-latest.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
# A venv left half-made by an interrupted run (no pip yet) is made again.
"$VENV/bin/python" -m pip --version >/dev/null 2>&1 || "$PYTHON" -m venv --clear "$VENV"
PIP=("$VENV/bin/python" -m pip install -q)
# torch first and pinned: the local CPU wheel; a looser request would pull GBs of CUDA packages.
"${PIP[@]}" torch==2.13.0
if [ "${EPD_DEPS:-lock}" = latest ]; then
    "${PIP[@]}" --upgrade --upgrade-strategy eager -e '.[dev]'
else
    "${PIP[@]}" -r requirements/lock.txt
    "${PIP[@]}" --no-deps -e .
fi
"$VENV/bin/python" -m pip check
