#!/usr/bin/env bash
# On a lent machine (16 cores): the gateway hop benchmark (issue 5, acceptance 6) with the client, the gateway and
# the worker on cores of their own, then with all of them sharing every core. CPU only: no GPU is used.
# The call carries .devcarry (wheels/, native.tar.xz and gwdata/ made by `scripts/gpu/gateway_carry.sh`),
# worker/native/build/_fovea_worker*.so and gateway/native/build/_fovea_gateway*.so (built for that machine's
# Python), fovea/v1 and inference.
# Rehearse here with PY=.venv/bin/python REHEARSAL=1 (no install; one short trial each).
set -uo pipefail
OUT=${OUT:-/tmp/gw-out}
PY=${PY:-python3}
mkdir -p "$OUT" /tmp/native /tmp/site
tar -xJf .devcarry/native.tar.xz -C /tmp/native
if [ -z "${REHEARSAL:-}" ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .devcarry/wheels/*.whl \
    || exit 3
  export PYTHONPATH=/tmp/site:$PWD
fi
export LD_LIBRARY_PATH="/tmp/native:${LD_LIBRARY_PATH:-}" PATH="/tmp/native:$PATH" PYTHONUNBUFFERED=1
(nproc; lscpu | grep -E 'Model name|^CPU\(s\)|Thread|MHz'; "$PY" -c 'import onnxruntime, grpc; print("onnxruntime", onnxruntime.__version__, "grpcio", grpc.__version__)') \
  2>&1 | tee "$OUT/machine.txt"
trials=${TRIALS:-3}
window=${WINDOW_MS:-3000}
run() {  # name, extra bench_gateway arguments...
  local name=$1; shift
  rm -rf /tmp/gwdata && cp -r .devcarry/gwdata /tmp/gwdata
  timeout "${RUN_TIMEOUT:-250}" "$PY" bench/gateway/bench_gateway.py --model efficientnet-lite0 --client perf_analyzer \
    --no-floor --trials "$trials" --window-ms "$window" --data-dir /tmp/gwdata --json "$OUT/$name.json" "$@" 2>&1 \
    | grep -v '^\s*$' | tail -40 | tee "$OUT/$name.log"
}
# With SINK_ROUNDS=N: first the hop alone, on a model with no compute (600 KB in, 4 KB out), N rounds at c=1
# through the worker directly and two gateways (one fast-port thread, and two), in turn.
if [ "${SINK_ROUNDS:-0}" -gt 0 ]; then
  timeout "${RUN_TIMEOUT:-250}" "$PY" bench/gateway/ab_gateways.py --model sink --b FOVEA_GATEWAY_FAST_THREADS=2 \
    --c1-rounds "$SINK_ROUNDS" --rounds 2 --window-ms 2000 --out "$OUT/sink_ab.json" 2>&1 \
    | grep -v '^\s*$' | tail -16 | tee "$OUT/sink_ab.log"
fi
# Worker: 4 intra-op threads on cores 0-3; gateway: cores 4-5; perf_analyzer: cores 6-11.
run pinned --cpus 0,1,2,3:4,5 --client-cpus 6,7,8,9,10,11 --worker-env FOVEA_WORKER_INTRA_OP_THREADS=4
# The same processes, every one free to run on any core.
run shared --worker-env FOVEA_WORKER_INTRA_OP_THREADS=4
