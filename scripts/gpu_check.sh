#!/usr/bin/env bash
# On the GPU machine: `epd serve` on the demo model from the locked wheels, a request to it, then
# the GPU suite (tests/gpu and the transformers comparison). Logs land in OUT.
#   bash scripts/gpu_check.sh OUT [pytest args...]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: gpu_check.sh OUT [pytest args]}
shift
mkdir -p "$OUT"
source scripts/gpu_env.sh .whl || exit 1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpus.txt"
python3 -c 'import fastapi, uvicorn, zmq, msgspec, transformers, torch; print("fastapi", fastapi.__version__, "transformers", transformers.__version__, "torch", torch.__version__)' | tee -a "$OUT/gpus.txt"

echo "== epd serve (demo model, cuda:0)"
python3 -m epd.cli serve --device cuda:0 --port 8765 > "$OUT/serve.log" 2>&1 &
SERVER=$!
for _ in $(seq 300); do
    curl -sf http://127.0.0.1:8765/health >/dev/null && break
    kill -0 $SERVER 2>/dev/null || break
    sleep 1
done
python3 examples/ask_demo.py --url http://127.0.0.1:8765 | tee "$OUT/ask_demo.txt"
SERVE_RC=${PIPESTATUS[0]}
kill -INT $SERVER; wait $SERVER; echo "serve exit: $?" >> "$OUT/serve.log"

echo "== GPU suite"
python3 -m pytest -q -p no:cacheprovider tests/gpu tests/entrypoints/test_llm_vs_hf.py "$@" 2>&1 | tee "$OUT/pytest.log"
TEST_RC=${PIPESTATUS[0]}
echo "serve+request rc=$SERVE_RC, pytest rc=$TEST_RC"
[ "$SERVE_RC" = 0 ] && [ "$TEST_RC" = 0 ]
