#!/usr/bin/env bash
# Set up a fresh machine: a virtual environment with everything Fovea needs
# (CPU ONNX Runtime, the CPU build of torch for training/export, test tools),
# then the Python code generated from protos/. Safe to run again.
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
# Generate the stubs before the editable install: setuptools maps only the packages that exist
# when it runs, so the generated top-level `inference` package must be there first.
python -m pip install -q "grpcio-tools>=1.85"
python -m fovea.codegen
python -m pip install -q -e ".[cpu,train,test]"
# Debian packages: libb64 for Triton's perf_analyzer (from the tritonclient wheel); a C++ compiler,
# gRPC C++ and protoc for the native fast ports of workers and gateways (worker/native, gateway/native).
# ccache makes the native builds of a second clone (tests/house/test_fresh_install.py) cache hits.
DEBS="libb64-0d g++ make pkg-config libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc libssl-dev ccache"
missing=""
for deb in $DEBS; do
  dpkg -s "$deb" >/dev/null 2>&1 || missing="$missing $deb"
done
if [ -n "$missing" ]; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  if command -v apt-get >/dev/null 2>&1; then
    # shellcheck disable=SC2086
    $SUDO apt-get install -y -q $missing >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q $missing >/dev/null 2>&1; } \
      || echo "warning: could not install$missing; perf_analyzer or the worker's fast port will be missing" >&2
  else
    echo "warning: no apt-get; install$missing (or their equivalents) for perf_analyzer and the fast port" >&2
  fi
fi
# The worker's native fast port; without it workers serve their main port only (and say so in their log).
worker/native/build.sh >/dev/null || echo "warning: the worker's fast port did not build (worker/native/build.sh)" >&2
# The gateway's native front serves its one port: without it the gateway refuses to start, so set-up fails here.
gateway/native/build.sh >/dev/null || { echo "error: the gateway's native front did not build (gateway/native/build.sh)" >&2; exit 1; }
# buf, for the protos check (scripts/check.sh protos); optional: that check installs it too.
if command -v npm >/dev/null 2>&1 && [ ! -x protos/node_modules/.bin/buf ]; then
  (cd protos && npm ci --no-audit --no-fund --loglevel=error) || echo "warning: npm ci failed in protos" >&2
fi
# The TypeScript client example (tests/gateway/test_typescript_client.py runs it); optional: skipped without npm.
if command -v npm >/dev/null 2>&1 && [ ! -d clients/typescript/node_modules/@grpc/grpc-js ]; then
  (cd clients/typescript && npm ci --no-audit --no-fund --loglevel=error) || echo "warning: npm ci failed in clients/typescript" >&2
fi
