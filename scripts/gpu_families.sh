#!/usr/bin/env bash
# Issue 19's GPU figures on ONE GPU, dummy bf16 weights, the configs of epd/bench/configs:
#   (a) the encoder roofline of InternVL3-8B, the InternVL2-26B-like shape and Qwen3-VL-8B
#       (images/s, ms an image, TFLOP/s, MFU at batch 1 and 8; 448/896/1344 px images);
#   (b) peak memory of an E-only instance against a 1EPD one encoding the same images
#       (the heavy-encoder InternVL2-26B-like shape first, then the two 8B ones).
# From the repository root, on the GPU machine (about 1.5 minutes on one H200):
#   source scripts/gpu_env.sh .whl && bash scripts/gpu_families.sh OUT
# `--dry-run` (tiny models on the CPU) checks every code path; other arguments go to
# epd.bench.encoder_families (e.g. --sections encoder, --memory-families internvl2_26b_like).
# Writes OUT/encoder_families.json and OUT/log.txt (the tables are at its end).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: gpu_families.sh OUT [--dry-run] [args of epd.bench.encoder_families]}
shift
mkdir -p "$OUT"
PYTHON=${PYTHON:-python3}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0}  # one GPU, whatever the machine has
if [[ " $* " != *" --dry-run "* ]]; then
    nvidia-smi --query-gpu=name,memory.total,memory.used --format=csv | tee "$OUT/gpu.txt"
fi
started=$SECONDS
"$PYTHON" -m epd.bench.encoder_families --out "$OUT" --config-dir epd/bench/configs "$@" 2>&1 | tee "$OUT/log.txt"
rc=${PIPESTATUS[0]}
echo "gpu_families: rc=$rc in $((SECONDS - started)) s" | tee -a "$OUT/log.txt"
exit "$rc"
