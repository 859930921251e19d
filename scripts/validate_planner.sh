#!/usr/bin/env bash
# Issue 15's validation on one host with 4 GPUs (Qwen2.5-VL-7B shape, dummy bf16 weights): the
# simulator's predictions next to real runs, per layout and rate, with a profile taken here.
#   bash scripts/validate_planner.sh OUT profile [CONFIG_DIR]   # epd profile -> OUT/profile.json
#   bash scripts/validate_planner.sh OUT w1 [CONFIG_DIR]        # BENCHMARKS.md's sweep workload
#   bash scripts/validate_planner.sh OUT w2 [CONFIG_DIR]        # 1-2 images of 896 px, 512 tokens out
# Each workload step is `epd bench sweep --compare-sim OUT/profile.json` (PROFILE=... to use
# another); LAYOUTS and RATES override the defaults below.
set -u
OUT=${1:?usage: scripts/validate_planner.sh OUT profile|w1|w2 [CONFIG_DIR]}
STEP=${2:?usage: scripts/validate_planner.sh OUT profile|w1|w2 [CONFIG_DIR]}
CONFIGS=${3:-/work/shared/model-configs}
MODEL=${MODEL_DIR:-/tmp/qwen2_5_vl_7b}
PROFILE=${PROFILE:-$OUT/profile.json}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if [ -d .whl ]; then source scripts/gpu_env.sh .whl || exit 1; fi
[ -f "$MODEL/config.json" ] || $PY -m epd.bench.model_dir --out "$MODEL" --config-dir "$CONFIGS" >/dev/null
DEVICES=cuda:0,cuda:1,cuda:2,cuda:3
SERVE="--load-format dummy --dtype bfloat16 --max-model-len 16384 --kv-cache-memory-bytes 40GiB --mm-cache-bytes 8GiB"
W1="--images-per-request 4 --image-size 1344x1344 --prompt-tokens 32 --output-tokens 64 --slo-ttft 3 --slo-tpot 0.06"
W2="--images-per-request 1-2 --image-size 896x896 --prompt-tokens 64 --output-tokens 512 --slo-ttft 2 --slo-tpot 0.025"

sweep() {  # name, workload flags, default layouts, default rates
  # shellcheck disable=SC2086
  $PY -m epd.cli bench sweep --model "$MODEL" --layouts "${LAYOUTS:-$3}" --devices "$DEVICES" \
    --serve-args "$SERVE" $2 --rates "${RATES:-$4}" --num-requests "${NUM_REQUESTS:-40}" \
    --compare-sim "$PROFILE" --no-progress --out "$OUT/$1"
}

case $STEP in
  profile) $PY -m epd.cli profile --model "$MODEL" --device cuda:0 --devices cuda:0,cuda:1 \
             --load-format dummy --dtype bfloat16 --out "$PROFILE" ;;
  w1) sweep w1 "$W1" "4EPD,2EP+2D,1E+2P+1D,2E+1P+1D" "2,4,6" ;;
  w2) sweep w2 "$W2" "4EPD,2EP+2D,1E+2P+1D,1E+1P+2D" "2,4,8" ;;
  *) echo "unknown step $STEP: profile, w1 or w2" >&2; exit 2 ;;
esac
