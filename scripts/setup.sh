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
python -m pip install -q -e ".[cpu,train,test]"
python -m fovea.codegen
# Triton's perf_analyzer (from the tritonclient wheel) also links Debian's libb64.
if ! ldconfig -p 2>/dev/null | grep -q libb64.so.0d; then
  SUDO=""
  [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  if command -v apt-get >/dev/null 2>&1; then
    $SUDO apt-get install -y -q libb64-0d >/dev/null 2>&1 \
      || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q libb64-0d >/dev/null 2>&1; } \
      || echo "warning: could not install libb64-0d; perf_analyzer will not run" >&2
  else
    echo "warning: no apt-get; install libb64 (libb64.so.0d) for perf_analyzer" >&2
  fi
fi
# The TypeScript client example (tests/gateway/test_typescript_client.py runs it); optional: skipped without npm.
if command -v npm >/dev/null 2>&1 && [ ! -d clients/typescript/node_modules/@grpc/grpc-js ]; then
  (cd clients/typescript && npm ci --no-audit --no-fund --loglevel=error) || echo "warning: npm ci failed in clients/typescript" >&2
fi
