#!/usr/bin/env bash
# Fetch onnxruntime-gpu's libonnxruntime (the release pyproject.toml pins for GPU workers) into
# .venv/ort-gpu/, without installing it: tests/worker/test_ort_api.py proves the CUDA provider's C API
# entries against it, which need no GPU (worker/native/ort_probe.cc says how). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
release=$(sed -n 's/.*kGpuRelease = "\([^"]*\)".*/\1/p' worker/native/ort_api.h)
out=.venv/ort-gpu
[ -f "$out/libonnxruntime.so.$release" ] && exit 0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: "onnxruntime-gpu==$release" -d "$tmp"
mkdir -p "$out"
# The core library and the provider bridge it loads first; not the CUDA provider's 280 MB library, whose absence
# the proofs expect to see named.
.venv/bin/python - "$tmp"/onnxruntime_gpu-*.whl "$out" "$release" <<'PY'
import pathlib, sys, zipfile
wheel, out, release = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
with zipfile.ZipFile(wheel) as z:
    for name in (f"libonnxruntime.so.{release}", "libonnxruntime_providers_shared.so"):
        (out / name).write_bytes(z.read(f"onnxruntime/capi/{name}"))
PY
