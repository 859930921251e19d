#!/usr/bin/env bash
# Soak (issue 17; not in CI): `epd serve` on the demo model with a redundant layout (2E+2P+2D) at
# ~80% of its measured capacity for 30 min, instances SIGKILLed or SIGSTOPped at random. Prints and
# writes (OUT/soak.json) requests sent/answered/lost (lost must be 0), recoveries and restarts, p99
# latency, and RSS / KV / MM cache use over time with a flatness check; exit 1 when one fails.
#   bash scripts/soak.sh [--duration 30m] [--rate R] [--chaos-gap 20-40] [--out DIR] ...
#   bash scripts/soak.sh --help      # every flag (epd/bench/soak.py)
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-.venv/bin/python}" -m epd.bench.soak "$@"
