#!/usr/bin/env bash
# On the lent GPU machine, after every wheel part arrived (scripts/gpu/README.md): install, then run the worker's CUDA check
# (issue 4) and the mixed-precision training recipe (issue 6). Results and logs go to $OUT.
# The call that runs it carries fovea/v1 inference runs/bench-worker/efficientnet-lite0.onnx (runs/mnist for train).
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
source scripts/gpu/device_setup.sh || exit 3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/nvidia-smi.txt"
what=${1:-all}
if [ "$what" = all ] || [ "$what" = worker ]; then
  timeout 480 python3 bench/worker/gpu_check.py --out "$OUT" --seconds 6 --client-procs 8 --concurrency 128 --main-port-variants "${@:2}" 2>&1 | tee "$OUT/worker_check.log"
fi
# Issue #19's acceptance 4, second model: ResNet-50-sized, random weights, made here (100 MB is more than a call carries).
if [ "$what" = resnet50 ]; then
  python3 bench/gpu/resnet50_onnx.py /tmp/resnet50.onnx \
    && timeout 400 python3 bench/worker/gpu_check.py --out "$OUT/resnet50" --model-file /tmp/resnet50.onnx --input-shape 3,224,224 \
      --seconds 6 --client-procs 8 --concurrency 128 --no-perf-analyzer "${@:2}" 2>&1 | tee "$OUT/resnet50_check.log"
fi
if [ "$what" = all ] || [ "$what" = train ]; then
  timeout 290 python3 -m bench.training.gpu_recipe --data-dir runs/mnist/mnist.pkl.gz --out "$OUT/gpu_recipe.json" 2>&1 \
    | grep -v '^\s*$' | tail -60 | tee "$OUT/train_recipe.log"
fi
