#!/usr/bin/env bash
# On the lent GPU machine: install the carried wheels and libraries into /tmp (once, after every part of the
# onnxruntime-gpu wheel arrived), then set the environment. Later calls on the same warm machine only set it.
# Usage: source scripts/gpu/device_setup.sh
set -e
if [ ! -d /tmp/site/onnxruntime ]; then
  want=$(cat .whl/parts/ort.sha256)
  got=$(sha256sum /tmp/ort.whl | cut -d' ' -f1)
  if [ "$want" != "$got" ]; then echo "onnxruntime-gpu wheel is incomplete ($got != $want)"; return 1 2>/dev/null || exit 1; fi
  cp /tmp/ort.whl /tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    /tmp/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl .whl/small/*.whl
fi
# The worker's fast port (the front built here and the gRPC C++ libraries it links) and perf_analyzer with
# its libraries: none of them is installed there.
mkdir -p /tmp/native
if [ -d .whl/native ]; then cp .whl/native/* /tmp/native/; fi
# The worker's binding is an extension module for one Python version: it must be built for this machine's.
if ls worker/native/build/_fovea_worker*.so >/dev/null 2>&1; then cp worker/native/build/_fovea_worker*.so /tmp/native/;
elif ls /tmp/native/_fovea_worker*.so >/dev/null 2>&1; then mkdir -p worker/native/build; cp /tmp/native/_fovea_worker*.so worker/native/build/; fi
# CUDA 13 and cuDNN 9 come from the NVIDIA wheels that PyTorch installed there.
NV=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null || true)
if [ -n "$NV" ]; then
  export LD_LIBRARY_PATH="$(find "$NV/nvidia" -maxdepth 3 -name lib -type d | tr '\n' ':')${LD_LIBRARY_PATH:-}"
fi
export LD_LIBRARY_PATH="/tmp/native:${LD_LIBRARY_PATH:-}" PATH="/tmp/native:/tmp/site/bin:$PATH"
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())"
set +e
