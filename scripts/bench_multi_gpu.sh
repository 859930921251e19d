#!/usr/bin/env bash
# Issue-8 measurements on one host with >= 3 GPUs (Qwen2.5-VL-7B shape, dummy bf16 weights):
#   bash scripts/bench_multi_gpu.sh OUT [CONFIG_DIR]      # transfers, KV streaming, memory
#   SWEEP=1 bash scripts/bench_multi_gpu.sh OUT [CONFIG_DIR]  # the layout sweep instead
# CONFIG_DIR holds qwen2_5_vl_7b.json and qwen2_5_vl_preprocessor_config.json (default: shared/).
set -u
OUT=${1:?usage: scripts/bench_multi_gpu.sh OUT [CONFIG_DIR]}
CONFIGS=${2:-/work/shared/model-configs}
MODEL=$OUT/qwen2_5_vl_7b
PY=${PYTHON:-python3}
mkdir -p "$OUT"
# On a bare GPU machine: the locked wheels of what it lacks (scripts/gpu_wheels.sh .whl, carried).
if [ -d .whl ]; then source scripts/gpu_env.sh .whl || exit 1; fi
$PY -m epd.bench.model_dir --out "$MODEL" --config-dir "$CONFIGS" >/dev/null
SERVE="--load-format dummy --dtype bfloat16 --max-model-len 16384 --kv-cache-memory-bytes 40GiB --mm-cache-bytes 8GiB"

if [ "${SWEEP:-0}" = 1 ]; then
  $PY -m epd.cli bench sweep --model "$MODEL" --layouts "${LAYOUTS:-4EPD,2EP+2D,1E+2P+1D}" \
    --devices cuda:0,cuda:1,cuda:2,cuda:3 --serve-args "$SERVE" \
    --images-per-request 4 --image-size 1344x1344 --prompt-tokens 32 --output-tokens 64 \
    --rates "${RATES:-2,4,6,8}" --num-requests "${NUM_REQUESTS:-40}" --slo-ttft 3 --slo-tpot 0.06 \
    --no-progress --out "$OUT/sweep"
  exit
fi

$PY -m epd.transfer.bench --backend cuda_ipc --producer-device cuda:0 --consumer-device cuda:1 \
  --mb 4,16,64,256 --iters 10 --json "$OUT/transfer.json"
$PY -m epd.bench.disagg_overhead --model "$MODEL" --load-format dummy --dtype bfloat16 \
  --devices cuda:0,cuda:1,cuda:2 --images 4 --image-side 1344 --max-tokens 8 --requests 6 \
  --max-model-len 16384 --kv-cache-gib 16 --mm-cache-gib 4 \
  --variants "1EPD,1E+1P+1D:cuda_ipc:layer,1E+1P+1D:cuda_ipc:request" --json "$OUT/kv_streaming.json"
$PY -m epd.bench.memory --out "$OUT" --config-dir "$CONFIGS" --max-num-batched-tokens 16384
