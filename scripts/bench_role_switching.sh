#!/usr/bin/env bash
# Issue 16's benchmark on one host with 4 GPUs (Qwen2.5-VL-7B shape, dummy bf16 weights): a
# two-phase workload served by static layouts, by --role-switching auto, and by one switch made
# by hand at the phase boundary (the admin API).
#   bash scripts/bench_role_switching.sh OUT [CONFIG_DIR]
# Phase 1: one 1344x1344 image per request, 16 output tokens; phase 2: the same images, 512
# output tokens. STATIC (layouts), AUTO_LAYOUT (where auto and by-hand start), HAND (instance:roles
# switched at the boundary), PHASE_S (seconds per phase), RATE1/RATE2 override the defaults.
set -u
OUT=${1:?usage: scripts/bench_role_switching.sh OUT [CONFIG_DIR]}
CONFIGS=${2:-/work/shared/model-configs}
MODEL=${MODEL_DIR:-/tmp/qwen2_5_vl_7b}
PY=${PYTHON:-python3}
PORT=${PORT:-8321}
mkdir -p "$OUT"
if [ -d .whl ]; then source scripts/gpu_env.sh .whl || exit 1; fi
[ -f "$MODEL/config.json" ] || $PY -m epd.bench.model_dir --out "$MODEL" --config-dir "$CONFIGS" >/dev/null
SERVE=(--model "$MODEL" --load-format dummy --dtype ${DTYPE:-bfloat16} --max-model-len ${MAX_LEN:-16384}
       --kv-cache-memory-bytes ${KV:-40GiB} --mm-cache-bytes ${MM:-8GiB} --devices ${DEVICES:-cuda:0,cuda:1,cuda:2,cuda:3}
       --port "$PORT")
PHASE_S=${PHASE_S:-60}
PHASES="[{\"name\": \"short\", \"output_tokens\": 16, \"rate\": ${RATE1:-8}, \"duration\": $PHASE_S},
         {\"name\": \"long\", \"output_tokens\": 512, \"rate\": ${RATE2:-4}, \"duration\": $PHASE_S}]"
BENCH=(--base-url "http://127.0.0.1:$PORT" --phases "$PHASES" --image-size 1344x1344
       --images-per-request 1 --prompt-tokens 32 --slo-ttft 2 --slo-tpot 0.05 --no-progress)

serve() {  # name, extra serve flags...; starts the server and waits for /health
  local name=$1; shift
  $PY -m epd.cli serve "${SERVE[@]}" "$@" > "$OUT/$name.server.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 600); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && return 0
    kill -0 $SERVER 2>/dev/null || return 1
    sleep 1
  done
  return 1
}

stop() { kill -INT $SERVER; wait $SERVER; }

run() {  # name, extra serve flags...
  local name=$1; shift
  serve "$name" "$@" || { echo "$name: server did not start"; return; }
  $PY -m epd.cli bench "${BENCH[@]}" --label "$name" --out "$OUT/$name" > "$OUT/$name.log" 2>&1
  stop
  grep -A3 "all phases" "$OUT/$name.log" | head -4
}

for layout in ${STATIC:-2EP+2D 1E+1P+2D}; do
  run "static-$layout" --layout "$layout"
done
START=${AUTO_LAYOUT:-2EP+2D}
run "auto-$START" --layout "$START" --role-switching auto --switchable-roles

# By hand: the same start, one switch at the phase boundary (HAND=instance:roles).
HAND=${HAND:-EP1:PD}
if serve "hand-$START" --layout "$START" --switchable-roles; then
  $PY -m epd.cli bench "${BENCH[@]}" --label "hand-$START" --out "$OUT/hand-$START" > "$OUT/hand-$START.log" 2>&1 &
  BENCH_PID=$!
  sleep "$PHASE_S"
  curl -s -X POST "http://127.0.0.1:$PORT/admin/instances/${HAND%%:*}/roles" \
    -H 'Content-Type: application/json' -d "{\"roles\": \"${HAND##*:}\"}" > "$OUT/hand-switch.json"
  wait $BENCH_PID
  stop
  cat "$OUT/hand-switch.json"; echo
fi
