#!/usr/bin/env bash
# Issue 16's benchmark on one host with 4 GPUs (Qwen2.5-VL-7B shape, dummy bf16 weights): a
# two-phase workload served by static layouts, by --role-switching auto, and by one switch made
# by hand at the phase boundary (the admin API).
#   ONLY=static    bash scripts/bench_role_switching.sh OUT [CONFIG_DIR]   # the static layouts
#   ONLY=switching bash scripts/bench_role_switching.sh OUT [CONFIG_DIR]   # auto, then by hand
#   ONLY=summary   bash scripts/bench_role_switching.sh OUT                # the table of what OUT holds
#   DRY=1          bash scripts/bench_role_switching.sh OUT                # the demo model on the CPU
# Without ONLY: all four runs, one after the other (more than one 600-s device call: use the halves,
# each two server starts, 6-9 minutes with the defaults on 4 H200s).
# Phase 1: one 1344x1344 image per request, 16 output tokens; phase 2: the same images, 512
# output tokens. STATIC (layouts), AUTO_LAYOUT (where auto and by-hand start), HAND (instance:roles
# switched at the boundary), PHASE_S (seconds per phase), RATE1/RATE2, SLO_TTFT/SLO_TPOT, AUTO_FLAGS
# (more flags for the auto server, e.g. --role-switching-profile P) override the defaults.
# The switch by hand is made PHASE_S after the bench's first timed request reaches the server (its
# warm-up done, read from /metrics): the bench draws every image before its timeline starts, which
# takes tens of seconds, so a clock started with the bench would switch in the middle of phase 1.
# DRY=1 checks this script end to end in minutes: the demo model on cpu, small images and rates,
# 5-s phases, auto with a 5-s window and dwell.
set -u
OUT=${1:?usage: scripts/bench_role_switching.sh OUT [CONFIG_DIR]}
CONFIGS=${2:-/work/shared/model-configs}
ONLY=${ONLY:-all}
case $ONLY in all|static|switching|summary) ;; *) echo "ONLY: all, static, switching or summary" >&2; exit 2;; esac
PORT=${PORT:-8321}
URL="http://127.0.0.1:$PORT"
WARMUP=2  # the bench's warm-up requests (its default), before its timeline
mkdir -p "$OUT"
T0=$SECONDS
log() { echo "[$((SECONDS - T0)) s] $*" | tee -a "$OUT/timeline.txt"; }

if [ "${DRY:-0}" = 1 ] && [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python3}; fi
if [ "${DRY:-0}" = 1 ]; then
  MODEL=${MODEL_DIR:-$($PY -c 'from epd.demo import DEMO_MODEL_DIR; print(DEMO_MODEL_DIR)')}
  SERVE=(--model "$MODEL" --load-format dummy --dtype float32 --max-model-len 2048
         --kv-cache-memory-bytes 64MiB --mm-cache-bytes 64MiB --devices cpu,cpu,cpu,cpu)
  PHASE_S=${PHASE_S:-5}; RATE1=${RATE1:-2}; RATE2=${RATE2:-1}; TOKENS2=64; IMAGE=224x224; SLO=(10 1)
  AUTO_FLAGS=${AUTO_FLAGS:---role-switching-window 5 --role-switching-dwell 5}
else
  MODEL=${MODEL_DIR:-/tmp/qwen2_5_vl_7b}
  if [ -d .whl ] && [ "$ONLY" != summary ]; then source scripts/gpu_env.sh .whl || exit 1; fi
  [ -f "$MODEL/config.json" ] || [ "$ONLY" = summary ] || $PY -m epd.bench.model_dir --out "$MODEL" --config-dir "$CONFIGS" >/dev/null
  SERVE=(--model "$MODEL" --load-format dummy --dtype ${DTYPE:-bfloat16} --max-model-len ${MAX_LEN:-16384}
         --kv-cache-memory-bytes ${KV:-40GiB} --mm-cache-bytes ${MM:-8GiB}
         --devices ${DEVICES:-cuda:0,cuda:1,cuda:2,cuda:3})
  PHASE_S=${PHASE_S:-40}; RATE1=${RATE1:-8}; RATE2=${RATE2:-4}; TOKENS2=512; IMAGE=1344x1344
  SLO=(${SLO_TTFT:-2} ${SLO_TPOT:-0.05})
  AUTO_FLAGS=${AUTO_FLAGS:-}
fi
SERVE+=(--port "$PORT")
PHASES="[{\"name\": \"short\", \"output_tokens\": 16, \"rate\": $RATE1, \"duration\": $PHASE_S},
         {\"name\": \"long\", \"output_tokens\": $TOKENS2, \"rate\": $RATE2, \"duration\": $PHASE_S}]"
BENCH=(--base-url "$URL" --phases "$PHASES" --image-size $IMAGE --images-per-request 1
       --prompt-tokens 32 --warmup $WARMUP --slo-ttft ${SLO[0]} --slo-tpot ${SLO[1]} --no-progress)
STATIC=${STATIC:-2EP+2D 1E+1P+2D}
START=${AUTO_LAYOUT:-2EP+2D}
HAND=${HAND:-EP1:PD}

serve() {  # name, extra serve flags...; starts the server and waits for /health
  local name=$1; shift
  log "$name: starting the server"
  $PY -m epd.cli serve "${SERVE[@]}" "$@" > "$OUT/$name.server.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 600); do
    curl -sf "$URL/health" >/dev/null && { log "$name: server up"; return 0; }
    kill -0 $SERVER 2>/dev/null || break
    sleep 1
  done
  log "$name: server did not start (see $name.server.log)"
  stop
  return 1
}

stop() {  # the server, and its instances with it; killed if it has not stopped within 30 s
  kill -INT $SERVER 2>/dev/null
  for _ in $(seq 60); do kill -0 $SERVER 2>/dev/null || break; sleep 0.5; done
  kill -0 $SERVER 2>/dev/null && { log "server did not stop: killed"; kill -KILL $SERVER; }
  wait $SERVER 2>/dev/null
  log "server stopped"
}

bench() {  # name: the two phases against the running server, in the background (BENCH_PID)
  $PY -m epd.cli bench "${BENCH[@]}" --label "$1" --out "$OUT/$1" > "$OUT/$1.log" 2>&1 &
  BENCH_PID=$!
}

finish() {  # name: waits for the bench, keeps the server's switch counters, stops the server
  wait $BENCH_PID
  log "$1: bench done"
  curl -s "$URL/metrics" | grep -E '^epd_role_switch(es_total|es_auto_total|_phase_seconds_(sum|count))' \
    > "$OUT/$1.switches.txt"
  stop
}

run() {  # name, extra serve flags...
  local name=$1; shift
  serve "$name" "$@" || return
  bench "$name"
  finish "$name"
}

timeline_started() {  # the bench's warm-up requests have finished and a timed one is in
  curl -sf "$URL/metrics" | awk -v warm=$WARMUP '
    /^epd_request_finished_total/ {done += $2}
    /^epd_requests_admitted / {busy = $2}
    END {exit !(done >= warm && busy >= 1)}'
}

by_hand() {  # the same start as auto, one switch (HAND=instance:roles) at the phase boundary
  local name="hand-$START"
  serve "$name" --layout "$START" --switchable-roles || return
  bench "$name"
  until timeline_started; do
    kill -0 $BENCH_PID 2>/dev/null || { log "$name: bench ended before its timeline"; finish "$name"; return; }
    sleep 0.1
  done
  log "$name: timeline started; switching ${HAND%%:*} to ${HAND##*:} in $PHASE_S s"
  sleep "$PHASE_S"
  log "$name: switching"
  curl -s --max-time 300 -X POST "$URL/admin/instances/${HAND%%:*}/roles" \
    -H 'Content-Type: application/json' -d "{\"roles\": \"${HAND##*:}\"}" > "$OUT/hand-switch.json"
  log "$name: switched: $(cat "$OUT/hand-switch.json")"
  finish "$name"
}

summary() {  # every run in OUT: the whole run and each phase, and auto and by hand against the best static
  $PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
runs = {p.parent.name: json.loads(p.read_text()) for p in sorted(Path(sys.argv[1]).glob("*/results.json"))}
def row(label, s):
    e2e, att = s["e2e"]["mean"], s["slo_attainment"]
    return f"{label:<26}{s['completed']:>5}{s['goodput'] or 0:>9.2f}{att if att is not None else float('nan'):>7.2f}{e2e or float('nan'):>9.2f}"
print(f"{'run (phase)':<26}{'done':>5}{'goodput':>9}{'SLO':>7}{'e2e s':>9}")
for name, doc in runs.items():
    print(row(name, doc["overall"]))
    for phase in doc["runs"]:
        print(row(f"  {phase['phase']['name']}", phase["summary"]))
static = [d["overall"] for n, d in runs.items() if n.startswith("static-")]
if static:
    best_goodput = max(s["goodput"] or 0 for s in static)
    best_e2e = min(s["e2e"]["mean"] or float("inf") for s in static)
    for name, doc in runs.items():
        if not name.startswith("static-"):
            s = doc["overall"]
            gain = (s["goodput"] or 0) / best_goodput if best_goodput else float("nan")
            speed = best_e2e / s["e2e"]["mean"] if s["e2e"]["mean"] else float("nan")
            print(f"{name}: goodput x{gain:.2f}, mean e2e x{speed:.2f} the best static (goal: either >= 1.5)")
auto = next((d["overall"] for n, d in runs.items() if n.startswith("auto-")), None)
hand = next((d["overall"] for n, d in runs.items() if n.startswith("hand-")), None)
if auto and hand and hand["goodput"] and auto["e2e"]["mean"]:
    gain, speed = (auto["goodput"] or 0) / hand["goodput"], hand["e2e"]["mean"] / auto["e2e"]["mean"]
    print(f"auto: goodput x{gain:.2f}, mean e2e x{speed:.2f} switching by hand (goal: within 15%)")
EOF
}

# One new image per request, all drawn by the bench before its timeline (tens of ms each).
IMAGES=$(awk -v a=$RATE1 -v b=$RATE2 -v t=$PHASE_S 'BEGIN {printf "%d", (a + b) * t}')
log "ONLY=$ONLY, phases of $PHASE_S s at $RATE1 and $RATE2 req/s (~$IMAGES images drawn per bench run)"
if [ "$ONLY" = all ] || [ "$ONLY" = static ]; then
  for layout in $STATIC; do
    run "static-$layout" --layout "$layout"
  done
fi
if [ "$ONLY" = all ] || [ "$ONLY" = switching ]; then
  run "auto-$START" --layout "$START" --role-switching auto --switchable-roles $AUTO_FLAGS
  by_hand
fi
summary | tee "$OUT/summary.txt"
log "done"
