#!/usr/bin/env bash
# Drift check: the suite on the newest releases that pyproject's ranges admit, in a
# separate venv (.venv-latest), so that a release that breaks epd is seen before the lock
# is refreshed (bash scripts/lock.sh --upgrade). Prints the versions it ran with.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-latest EPD_DEPS=latest bash scripts/setup.sh
.venv-latest/bin/python -m pip freeze --exclude-editable > .venv-latest/versions.txt
echo "drift check on: $(tr '\n' ' ' < .venv-latest/versions.txt)"
exec .venv-latest/bin/python -m pytest -q "$@"
