#!/usr/bin/env bash
# Set up a fresh machine: the Debian packages the native parts build with, a virtual environment with
# everything Fovea needs (CPU ONNX Runtime, the CPU build of torch for training/export, test tools), the
# Python code generated from protos/, then Fovea itself, installed editable with its native parts built.
# Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q -U pip
# The CPU wheel first: a bare torch requirement would pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
# Debian packages: what the native parts build with (the install below runs CMakeLists.txt: a C++
# compiler, CMake, Ninja, pkg-config, gRPC C++, protoc and its gRPC plugin, OpenSSL; ccache makes a second
# clone's build, tests/house/test_fresh_install.py, cache hits), then libb64 for Triton's perf_analyzer
# (from the tritonclient wheel), which is optional.
BUILD_DEBS="g++ make cmake ninja-build pkg-config libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc libssl-dev ccache"
OPTIONAL_DEBS="libb64-0d"
missing=""
for deb in $BUILD_DEBS $OPTIONAL_DEBS; do
  dpkg -s "$deb" >/dev/null 2>&1 || missing="$missing $deb"
done
if [ -n "$missing" ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  if command -v apt-get >/dev/null 2>&1; then
    # shellcheck disable=SC2086
    $SUDO apt-get install -y -q $missing >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q $missing >/dev/null 2>&1; } \
      || echo "warning: could not install$missing" >&2
  else
    echo "warning: no apt-get; install$missing (or their equivalents)" >&2
  fi
  for deb in $BUILD_DEBS; do
    if command -v dpkg >/dev/null 2>&1 && ! dpkg -s "$deb" >/dev/null 2>&1; then
      echo "error: $deb is missing; the native parts cannot be built without$BUILD_DEBS" >&2
      exit 1
    fi
  done
fi
# Generate the stubs before installing, the order every install keeps: a regular `pip install .` packs
# them into the wheel (the editable install below imports them from the tree).
python -m pip install -q "grpcio-tools>=1.85"
python -m fovea.codegen
# The editable install builds the native parts (scikit-build-core runs CMakeLists.txt) into
# gateway/native/build/ and worker/native/build/; after editing C++, scripts/native.sh rebuilds them.
python -m pip install -q -e ".[cpu,train,test]"
# buf, for the protos check (scripts/check.sh protos); optional: that check installs it too.
if command -v npm >/dev/null 2>&1 && [ ! -x protos/node_modules/.bin/buf ]; then
  (cd protos && npm ci --no-audit --no-fund --loglevel=error) || echo "warning: npm ci failed in protos" >&2
fi
# The TypeScript client example (tests/gateway/test_typescript_client.py runs it); optional: skipped without npm.
if command -v npm >/dev/null 2>&1 && [ ! -d clients/typescript/node_modules/@grpc/grpc-js ]; then
  (cd clients/typescript && npm ci --no-audit --no-fund --loglevel=error) || echo "warning: npm ci failed in clients/typescript" >&2
fi
