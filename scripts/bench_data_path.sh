#!/usr/bin/env bash
# Issue 14's layout table on one host with 4 GPUs (Qwen2.5-VL-7B shape, dummy bf16 weights): three
# 1280x960 images, 48 text tokens and 192 output tokens per request, Poisson arrivals, 120 requests
# per rate, each layout served by `epd serve` and swept over the rates by `epd bench sweep`.
#   LAYOUTS="4EPD,2EP+2D,1E+2P+1D" bash scripts/bench_data_path.sh OUT [CONFIG_DIR]   # one call
#   LAYOUTS="1E+3PD,2E+2PD,2E+1P+1D" bash scripts/bench_data_path.sh OUT [CONFIG_DIR] # the next
#   DRY=1 bash scripts/bench_data_path.sh OUT                  # the demo model on the CPU, tiny
# LAYOUTS (all six by default: more than one 600-s device call), RATES (12,20,28), NUM_REQUESTS
# (120) override. Results: OUT/sweep/<layout>/results.json and the sweep's plots; the summary
# (`python -m epd.bench.serve.breakdown`-style stage table) is printed by `epd bench plot`.
# Time on 4 H200s: per layout a server start (30-60 s) and per rate the 360 images drawn (~3 s)
# and 120 requests sent (10 s of arrivals at 12 req/s, more past saturation): ~2-3 min a layout.
set -u
OUT=${1:?usage: scripts/bench_data_path.sh OUT [CONFIG_DIR]}
CONFIGS=${2:-/work/shared/model-configs}
mkdir -p "$OUT"
if [ "${DRY:-0}" = 1 ]; then
  PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
  MODEL=$($PY -c 'from epd.demo import DEMO_MODEL_DIR; print(DEMO_MODEL_DIR)')
  DEVICES=cpu SIZE=160x120 TOKENS=8
  SERVE="--max-model-len 2048 --kv-cache-memory-bytes 64MiB --mm-cache-bytes 64MiB"
  LAYOUTS=${LAYOUTS:-1EPD,1E+1P+1D} RATES=${RATES:-2,4} NUM_REQUESTS=${NUM_REQUESTS:-6}
else
  PY=${PYTHON:-python3}
  if [ -d .whl ]; then source scripts/gpu_env.sh .whl || exit 1; fi
  MODEL=${MODEL_DIR:-/tmp/qwen2_5_vl_7b}
  [ -f "$MODEL/config.json" ] || $PY -m epd.bench.model_dir --out "$MODEL" --config-dir "$CONFIGS" >/dev/null
  DEVICES=${DEVICES:-cuda:0,cuda:1,cuda:2,cuda:3} SIZE=1280x960 TOKENS=192
  SERVE="--load-format dummy --dtype bfloat16 --max-model-len 16384 --kv-cache-memory-bytes 40GiB --mm-cache-bytes 8GiB"
  LAYOUTS=${LAYOUTS:-4EPD,2EP+2D,1E+2P+1D,1E+3PD,2E+2PD,2E+1P+1D}
  RATES=${RATES:-12,20,28} NUM_REQUESTS=${NUM_REQUESTS:-120}
fi
$PY -m epd.cli bench sweep --model "$MODEL" --layouts "$LAYOUTS" --devices "$DEVICES" \
  --serve-args "$SERVE ${KNOBS:-}" --images-per-request 3 --image-size $SIZE --prompt-tokens 48 \
  --output-tokens $TOKENS --rates "$RATES" --num-requests "$NUM_REQUESTS" --no-progress \
  --out "$OUT/sweep"
# The issue's table, and each layout's results under a name without '+' (OUT/results/).
$PY - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
(out / "results").mkdir(exist_ok=True)
rows = ["| layout | rate | req/s done | TTFT p50 (s) | TPOT p50 (ms) | encode queue (s) | encode (s) "
        "| mm_transfer (ms) | preprocess (ms) | prefill queue (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
for path in sorted((out / "sweep").glob("*/results.json")):
    layout = path.parent.name
    data = json.loads(path.read_text())
    (out / "results" / f"{layout.replace('+', '_')}.json").write_text(json.dumps(data))
    for run in data["runs"]:
        s, st = run["summary"], run["stages"]
        rows.append(f"| {layout} | {run['rate']:g} | {s['request_throughput']:.2f} | {s['ttft']['p50']:.2f} "
                    f"| {s['tpot']['p50'] * 1e3:.1f} | {st.get('encode_queue', 0):.3f} | {st.get('encode', 0):.3f} | {st.get('mm_transfer', 0) * 1e3:.1f} "
                    f"| {st.get('preprocess', 0) * 1e3:.1f} | {st.get('prefill_queue', 0):.3f} |")
(out / "table.md").write_text("\n".join(rows) + "\n")
print("\n".join(rows))
PY
