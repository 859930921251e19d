#!/usr/bin/env bash
# Issue 20's benchmark on one host with 4 GPUs (Qwen2.5-VL-7B shape, dummy bf16 weights): one bursty
# mix of two request classes, each with its own SLO, served by the fcfs and by the slo scheduling
# policy on the layout `epd plan` finds best for it; goodput and per-class attainment side by side.
#   LAYOUT=4EPD KNOBS="--max-num-seqs 512 --max-num-batched-tokens 2048" \
#     bash scripts/bench_slo.sh OUT [CONFIG_DIR]  # what `epd plan` chose here (CPU, see "Time")
#   bash scripts/bench_slo.sh OUT [CONFIG_DIR]    # plans first: minutes of CPU
#   DRY=1 bash scripts/bench_slo.sh OUT           # every step, demo model on the CPU (~1.5 min)
#
# Workload: gamma arrivals with CV 3 (CV=); 70% "small" (one 448x448 image, 64 tokens out), 30%
# "large" (six 1344x1344 images, 256 tokens out), 64 text tokens each. Per-class SLOs, from the
# 4xH200 profile (alone, a small request's TTFT is ~0.15 s, a large one's ~1 s; decode steps
# 5-50 ms): SMALL_TTFT=1 s, LARGE_TTFT=4 s, SMALL_TPOT=LARGE_TPOT=0.05 s. Both servers predict
# step times from the same profile (--slo-profile), so the policies differ only in queue order.
# Layout: LAYOUT (and KNOBS, its engine limits); else PLAN, an `epd plan --json` file (its winner);
# else `epd plan` on PROFILE for this workload (PLAN_ARGS: its search) -> OUT/plan.json.
# Rates: RATES (9,14,19 req/s: `epd simulate` of that 4EPD with the profile puts fcfs's goodput
# at 11.5 req/s and slo's at 17.5; issue 15 measured TTFTs above the simulator's: likely lower),
# NUM_REQUESTS (200 per rate), WARMUP (8), SEED (0), POLICIES (fcfs slo). `--same-arrivals`, and
# classes drawn from the seed alone: every rate sends the same arrival pattern, scaled to exactly
# that rate, and the same sequence of classes (new images), so the runs differ only in rate.
# Output: OUT/<policy>/<layout>/results.json + server.log, OUT/<policy>.log, and OUT/compare/:
# attainment.png, ttft_cdf.png, stage_breakdown.png, overview.png, classes.md (the table).
#
# Time (one device call of 560 s at most; LAYOUT given, no plan): per policy a server start
# (30-60 s) and stop (~10 s), 8 warm-up requests one at a time (~10 s), and per rate 200 requests
# built (~12 s: 60 of them carry six 1344 px JPEGs, 8 MB) then sent: 200/rate s of arrivals (22,
# 14, 10 s) and the tail (simulated: 25, 17, 16 s per run in all): ~170 s per policy, ~370 s in
# all with the wheels and the plots. 200 requests span 10-22 s, several request lifetimes and
# more than one CV-3 burst. SWEEP_TIMEOUT (230 s) bounds each policy so that the other still runs.
# `epd plan` takes 6-13 min on a 2-core CPU for this workload (117 simulations of 200 requests):
# plan on a CPU first and pass LAYOUT/KNOBS (or PLAN) to the GPU run.
set -u
OUT=${1:?usage: scripts/bench_slo.sh OUT [CONFIG_DIR]}
CONFIGS=${2:-/work/shared/model-configs}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
[ -d "$CONFIGS" ] && CONFIGS=$(cd "$CONFIGS" && pwd)
cd "$(dirname "$0")/.."  # the repository root: the profile's path, .whl, .venv
CV=${CV:-3}
POLICIES=${POLICIES:-fcfs slo}

if [ "${DRY:-0}" = 1 ]; then  # the same steps, tiny: demo model, small images, CPU
  PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
  MODEL=$($PY -c 'from epd.demo import DEMO_MODEL_DIR; print(DEMO_MODEL_DIR)')
  GPUS=${GPUS:-3} DEVICES=cpu ENGINE="--max-model-len 1024 --num-kv-blocks 512" SERVE=""
  PLAN_ARGS=${PLAN_ARGS:-"--num-requests 20 --tune-top 1 --knob-trials 1 --rate-steps 1 --max-simulations 30"}
  SMALL='"images_per_request": 1, "image_size": "64x48", "output_tokens": 8'
  LARGE='"images_per_request": 2, "image_size": "160x120", "output_tokens": 16'
  SMALL_TTFT=${SMALL_TTFT:-2} LARGE_TTFT=${LARGE_TTFT:-5} TPOT=0.5
  RATES=${RATES:-1,2,4} NUM_REQUESTS=${NUM_REQUESTS:-8} WARMUP=${WARMUP:-1}
else
  PY=${PYTHON:-python3}
  if [ -d .whl ]; then source scripts/gpu_env.sh .whl || exit 1; fi
  MODEL=${MODEL_DIR:-/tmp/qwen2_5_vl_7b}
  [ -f "$MODEL/config.json" ] || $PY -m epd.bench.model_dir --out "$MODEL" --config-dir "$CONFIGS" >/dev/null
  PROFILE=${PROFILE:-docs/profiles/h200x4_qwen2_5_vl_7b_bf16.json}
  GPUS=${GPUS:-4} DEVICES=${DEVICES:-cuda:0,cuda:1,cuda:2,cuda:3}
  ENGINE="--dtype bfloat16 --max-model-len 16384 --kv-cache-memory-bytes 40GiB --mm-cache-bytes 8GiB"
  SERVE="--load-format dummy --slo-profile $PROFILE"
  PLAN_ARGS=${PLAN_ARGS:-"--profile $PROFILE --num-requests 200"}
  SMALL='"images_per_request": 1, "image_size": "448x448", "output_tokens": 64'
  LARGE='"images_per_request": 6, "image_size": "1344x1344", "output_tokens": 256'
  SMALL_TTFT=${SMALL_TTFT:-1} LARGE_TTFT=${LARGE_TTFT:-4} TPOT=0.05
  RATES=${RATES:-9,14,19} NUM_REQUESTS=${NUM_REQUESTS:-200} WARMUP=${WARMUP:-8}
fi
cat > "$OUT/classes.json" <<EOF
[{"name": "small", "share": 0.7, $SMALL, "slo_ttft": $SMALL_TTFT, "slo_tpot": ${SMALL_TPOT:-$TPOT}},
 {"name": "large", "share": 0.3, $LARGE, "slo_ttft": $LARGE_TTFT, "slo_tpot": ${LARGE_TPOT:-$TPOT}}]
EOF
# What `epd plan` simulates and `epd bench` sends: the same requests and arrivals (same seed).
WORKLOAD="--classes $OUT/classes.json --arrival gamma --burstiness $CV --seed ${SEED:-0}"

say() { echo "[$SECONDS s] $*"; }

winner() {  # an `epd plan --json` file -> "LAYOUT<tab>--max-num-seqs N ..." (its winner's)
  $PY - "$1" <<'EOF'
import json, sys
winner = json.load(open(sys.argv[1]))["winner"]
if winner is None:
    sys.exit(f"{sys.argv[1]}: no configuration met the SLOs")
knobs = [f"--{k.replace('_', '-')} {v}" for k, v in winner["knobs"].items() if v is not None]
print(winner["layout"], " ".join(knobs), sep="\t")
EOF
}

if [ -z "${LAYOUT:-}" ]; then
  if [ -z "${PLAN:-}" ]; then
    PLAN=$OUT/plan.json
    say "epd plan on $GPUS GPUs (log: $OUT/plan.log)"
    # Every class sets its own TPOT; --slo-tpot only satisfies the plan's "some SLO" check.
    # shellcheck disable=SC2086
    $PY -m epd.cli plan --model "$MODEL" --gpus "$GPUS" $ENGINE $WORKLOAD --slo-tpot "$TPOT" \
      $PLAN_ARGS --json "$PLAN" > "$OUT/plan.log" 2>&1
    grep -E "^best:|no configuration" "$OUT/plan.log"
  fi
  IFS=$'\t' read -r LAYOUT KNOBS < <(winner "$PLAN") || { say "no layout from $PLAN"; exit 1; }
fi
KNOBS=${KNOBS:-}
say "layout $LAYOUT $KNOBS; rates $RATES; $NUM_REQUESTS requests per rate"

for policy in $POLICIES; do
  say "$policy: epd serve + epd bench (log: $OUT/$policy.log)"
  # shellcheck disable=SC2086
  timeout --signal=INT --kill-after=30 "${SWEEP_TIMEOUT:-230}" \
    $PY -m epd.cli bench sweep --model "$MODEL" --layouts "$LAYOUT" --devices "$DEVICES" \
      --serve-args "$ENGINE $SERVE $KNOBS --scheduling-policy $policy" --server-start-timeout 180 \
      $WORKLOAD --same-arrivals --rates "$RATES" --num-requests "$NUM_REQUESTS" --warmup "$WARMUP" \
      --request-timeout 120 --no-progress --out "$OUT/$policy" > "$OUT/$policy.log" 2>&1
  echo "  exit $?: $(grep -h "^goodput" "$OUT/$policy.log" || echo "no goodput line")"
done

DOCS=() LABELS=()
for policy in $POLICIES; do
  if [ -f "$OUT/$policy/$LAYOUT/results.json" ]; then
    DOCS+=("$OUT/$policy/$LAYOUT/results.json")
    LABELS+=("$policy")
  fi
done
[ ${#DOCS[@]} -gt 0 ] || { say "no results"; exit 1; }
say "comparison (also $OUT/compare/classes.md)"
COLUMNS=160 $PY -m epd.cli bench plot "${DOCS[@]}" --labels "$(IFS=,; echo "${LABELS[*]}")" \
  --out "$OUT/compare"
say "done"
