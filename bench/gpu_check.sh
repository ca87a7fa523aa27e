#!/usr/bin/env bash
# One-call GPU check of erasure speed at real scale (device machine: one H100/H200, no network), ~8 minutes.
# Usage on the device: bash bench/gpu_check.sh        (carry .whl: the wheels the device image lacks)
# Runs bench/erasure_speed.py --size sd15 on CUDA (SD-1.5's UNet, text encoder and VAE from their configs with
# random weights: the real model's compute) for every SD method, reference and optimised paths, then MiniSD.
# Returns under $OUT: sd15.json, mini.json and bench.log. Record the figures in docs/performance.md.
set -u
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
if [ -z "${SKIP_WHEELS:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/bench.log"
STEPS=${STEPS:-4}
timeout "${SD15_TIMEOUT:-390}" python3 bench/erasure_speed.py --device cuda --size sd15 --steps "$STEPS" \
  --json "$OUT/sd15.json" 2>&1 | grep -v -i warn | tee -a "$OUT/bench.log"
timeout "${MINI_TIMEOUT:-90}" python3 bench/erasure_speed.py --device cuda --size mini --steps "$STEPS" \
  --json "$OUT/mini.json" 2>&1 | grep -v -i warn | tee -a "$OUT/bench.log"
