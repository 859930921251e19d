#!/usr/bin/env bash
# Issue 22's GPU figures, one device call per part (Qwen2.5-VL-7B and -72B shapes, dummy bf16):
#   PART=steps bash scripts/bench_tp.sh OUT       # 2 GPUs, ~4 min: decode b1/b64 and prefill 8k at tp1
#                                                 # and tp2, peer all-reduce on and off; the tp tests
#   PART=handoff bash scripts/bench_tp.sh OUT     # 2 GPUs, ~3 min: KV hand-off of a 9k-token prompt,
#                                                 # P tp1 -> D tp1 against P tp2 -> D tp1
#   PART=72b bash scripts/bench_tp.sh OUT         # 4 GPUs, ~8 min: the 72B shape in 1EPD@tp4 and
#                                                 # 1E+1P@tp2+1D@tp2, decode time per token (its MBU)
#   PART=async bash scripts/bench_tp.sh OUT       # 2 GPUs, ~3 min: engine decode steps at tp1 and tp2,
#                                                 # async scheduling off and on (peer all-reduce)
#   PART=vision bash scripts/bench_tp.sh OUT      # 2 GPUs, ~4 min: the E stage on one GPU, replicated
#                                                 # and split; 1E@tp2+1P+1D against 1E+1P+1D served
# Each part writes OUT/<part>/ (logs, JSON) and prints its figures. Goals (the issue): prefill 8k
# at tp2 <= 0.6x tp1, decode b1 at tp2 <= 0.65x, the hand-off tp2 -> tp1 <= 5 ms.
set -u
OUT=${1:?usage: PART=steps|handoff|72b scripts/bench_tp.sh OUT [CONFIG_DIR]}
CONFIGS=${2:-.cfg}
cd "$(dirname "$0")/.."
source scripts/gpu_env.sh .whl || exit 1
PART=${PART:-steps}
mkdir -p "$OUT/$PART"
R=$OUT/$PART
Q7=/tmp/qwen2_5_vl_7b
[ -f $Q7/config.json ] || python3 -m epd.bench.model_dir --out $Q7 --config-dir "$CONFIGS" > /dev/null

profile() {  # $1: label, $2: EPD_PEER_ALL_REDUCE, rest: profile flags
  local label=$1 peer=$2
  shift 2
  EPD_PEER_ALL_REDUCE=$peer python3 -m epd.plan.profile --model $Q7 --device cuda:0 --dtype bfloat16 \
    --load-format dummy --kv-cache-gib 8 --tp 1,2 --out "$R/$label.json" "$@" > "$R/$label.log" 2>&1
  grep -E "^\[(tp2\] \[)?(decode|prefill)\]" "$R/$label.log" | sed "s/^/$label: /"
}

case $PART in
steps)
  profile decode_peer 1 --stages decode --decode-batches 1,8,64 --decode-contexts 1024
  profile decode_nccl 0 --stages decode --decode-batches 1,8,64 --decode-contexts 1024
  profile prefill 1 --stages prefill --prefill-seqs 1 --prefill-tokens 2048,8192 --prefill-contexts 0 \
    --mixed-decodes 16
  EPD_PEER_ALL_REDUCE=1 python3 -m pytest -q tests/gpu/test_peer_all_reduce.py \
    tests/gpu/test_tensor_parallel_cuda.py 2>&1 | tail -3 | tee "$R/tests.txt"
  ;;
handoff)
  # 4 images of 1344 px: 9,216 image tokens. E shares cuda:0 with P (rank 0); D is on cuda:1.
  EPD_PEER_ALL_REDUCE=1 python3 -m epd.bench.disagg_overhead --model $Q7 --load-format dummy \
    --dtype bfloat16 --devices cuda:0,cuda:0,cuda:1,cuda:1 --images 4 --image-side 1344 --max-tokens 8 \
    --requests 8 --kv-cache-gib 4 --max-model-len 16384 --json "$R/handoff.json" \
    --variants 1E+1P+1D:cuda_ipc:request,1E+1P@tp2+1D:cuda_ipc:request,1E+1P@tp2+1D:cuda_ipc:layer \
    2>&1 | tee "$R/handoff.log" | tail -12
  ;;
72b)
  Q72=/tmp/qwen2_5_vl_72b
  [ -f $Q72/config.json ] || python3 -m epd.bench.model_dir --out $Q72 --config-dir epd/bench/configs \
    --config qwen2_5_vl_72b.json > /dev/null
  # decode time per token = decode stage / (max_tokens - 1); MBU = weight + KV bytes per step over
  # it and the GPUs' copy rate (BENCHMARKS.md).
  for run in "1EPD@tp4:cuda:0,cuda:1,cuda:2,cuda:3" "1E+1P@tp2+1D@tp2:cuda:0,cuda:0,cuda:1,cuda:2,cuda:3"; do
    layout=${run%%:*} devices=${run#*:}
    EPD_PEER_ALL_REDUCE=1 python3 -m epd.bench.disagg_overhead --model $Q72 --load-format dummy \
      --dtype bfloat16 --devices "$devices" --images 1 --image-side 896 --max-tokens 65 --requests 4 --kv-cache-gib 4 --max-model-len 16384 \
      --variants "$layout:cuda_ipc:request" --json "$R/${layout//[@+]/_}.json" \
      2>&1 | tee "$R/${layout//[@+]/_}.log" | tail -6
  done
  ;;
async)
  for tp in 1 2; do
    EPD_PEER_ALL_REDUCE=1 python3 -m epd.bench.async_steps --model $Q7 --device cuda:0 --dtype bfloat16 \
      --load-format dummy --batches 1,64 --context 1024 --steps 100 --tp $tp --json "$R/async_tp$tp.json" \
      2>&1 | tee "$R/async_tp$tp.log" | grep "^|"
  done
  ;;
vision)
  python3 -m epd.bench.vision_tp --config-dir "$CONFIGS" --devices cuda:0,cuda:1 --sizes 448,896,1344 \
    --batches 1,8 --dtype bfloat16 --out "$R/vision_tp.json" 2>&1 | tee "$R/vision_tp.log" | tail -20
  # E split over both GPUs (P on cuda:0, D on cuda:1) against E on one: one request at a time.
  EPD_PEER_ALL_REDUCE=1 python3 -m epd.bench.disagg_overhead --model $Q7 --load-format dummy \
    --dtype bfloat16 --devices cuda:0,cuda:1,cuda:0,cuda:1 --images 4 --image-side 1344 --max-tokens 8 \
    --requests 8 --kv-cache-gib 4 --max-model-len 16384 --json "$R/e_tp2.json" \
    --variants 1E+1P+1D:cuda_ipc:request,1E@tp2+1P+1D:cuda_ipc:request 2>&1 | tee "$R/e_tp2.log" | tail -6
  ;;
*)
  echo "PART must be steps, handoff, 72b, async or vision" >&2
  exit 2
  ;;
esac
