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
# The TypeScript client example (tests/gateway/test_typescript_client.py runs it); optional: skipped without npm.
if command -v npm >/dev/null 2>&1 && [ ! -d clients/typescript/node_modules/@grpc/grpc-js ]; then
  (cd clients/typescript && npm ci --no-audit --no-fund --loglevel=error) || echo "warning: npm ci failed in clients/typescript" >&2
fi
