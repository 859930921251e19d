#!/usr/bin/env bash
# Regenerate requirements/lock.txt: every runtime and dev dependency pinned, for every
# supported Python (a universal lock: per-version pins carry markers). torch is left out
# (scripts/setup.sh installs torch==2.13.0, the CPU wheel); its own needs are pinned via
# requirements/torch-cpu.in. Run after changing pyproject's dependencies, or to take newer
# releases on purpose; then run scripts/test.sh on the new lock and commit both.
#   bash scripts/lock.sh              # keep current pins where still allowed
#   bash scripts/lock.sh --upgrade    # newest allowed releases
set -euo pipefail
cd "$(dirname "$0")/.."
UV_VENV=${UV_VENV:-.venv-uv}
[ -x "$UV_VENV/bin/uv" ] || { python3 -m venv "$UV_VENV" && "$UV_VENV/bin/pip" install -q uv==0.13.9; }
"$UV_VENV/bin/uv" pip compile pyproject.toml requirements/torch-cpu.in --extra dev \
    --universal --python-version 3.10 --override requirements/without-torch.txt \
    --custom-compile-command "bash scripts/lock.sh" -o requirements/lock.txt "$@"
