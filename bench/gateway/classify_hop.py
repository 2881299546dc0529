"""Classify through the gateway's one port: p50 at concurrency 1 and calls/s at --concurrency, for a key the
gateway's native front serves itself and for one with a rate limit never reached (relayed to the Python
server, which routes it), beside the same images sent straight to the worker's main port as a BYTES ModelInfer.

Starts a registry, one worker and one gateway on loopback with the tiny `colors` model (tests/tinymodels.py:
zero compute to speak of, so the serving path is what is measured) and a 32x32 PNG per call.

    .venv/bin/python bench/gateway/classify_hop.py --seconds 8 --out /tmp/classify_hop.json

Prints a table and writes JSON. Targets are measured in turn, round by round, so that the machine's load
moves them alike.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable

import grpc

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fovea import oip  # noqa: E402
from fovea.client import RegistryClient  # noqa: E402
from fovea.cluster import Cluster  # noqa: E402
from fovea.v1 import image_pb2, image_pb2_grpc, model_pb2  # noqa: E402
from inference import grpc_predict_v2_pb2 as pb  # noqa: E402
from inference import grpc_predict_v2_pb2_grpc as pb_grpc  # noqa: E402
from tests.tinymodels import color_model, png  # noqa: E402

Call = Callable[[], Awaitable[object]]


async def c1_p50_ms(call: Call, n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        await call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


async def throughput(call: Call, concurrency: int, seconds: float) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await call()
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return done / (time.perf_counter() - start)


async def measure(gateway: str, worker: str, keys: dict[str, str], token: str, args: argparse.Namespace) -> dict:
    image = png((240, 20, 20), size=32)
    request = image_pb2.ClassifyRequest(model="colors", top_k=1, images=[image_pb2.Image(data=image, id="0")])
    direct = pb.ModelInferRequest(model_name="colors", model_version="1")
    direct.inputs.add(name="input", datatype="BYTES", shape=[1])
    direct.raw_input_contents.append(oip.encode_bytes([image]))
    direct.outputs.add(name="logits").parameters["classification"].int64_param = 1
    async with grpc.aio.insecure_channel(gateway) as gw_ch, grpc.aio.insecure_channel(worker) as w_ch:
        images = image_pb2_grpc.ImageServiceStub(gw_ch)
        infer = pb_grpc.GRPCInferenceServiceStub(w_ch)

        def classify(secret: str) -> Call:
            md = (("authorization", f"Bearer {secret}"),)
            return lambda: images.Classify(request, metadata=md, timeout=10)

        calls: dict[str, Call] = {name: classify(secret) for name, secret in keys.items()}
        calls["direct to worker"] = lambda: infer.ModelInfer(
            direct, metadata=(("authorization", f"Bearer {token}"),), timeout=10
        )
        for call in calls.values():  # warm: key caches, channels
            for _ in range(50):
                await call()
        rows: dict[str, dict[str, list[float]]] = {name: {"p50_ms": [], "calls_s": []} for name in calls}
        for r in range(args.rounds):
            order = list(calls.items()) if r % 2 == 0 else list(calls.items())[::-1]
            for name, call in order:
                rows[name]["p50_ms"].append(await c1_p50_ms(call, args.c1_calls))
                rows[name]["calls_s"].append(await throughput(call, args.concurrency, args.seconds))
    return {name: {k: statistics.median(v) for k, v in row.items()} | {"rounds": row} for name, row in rows.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--c1-calls", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "classify_hop.json"))
    args = ap.parse_args()
    cluster = Cluster(pathlib.Path(tempfile.mkdtemp(prefix="fovea-classify-hop-")))
    try:
        reg = cluster.start_registry()
        rc = RegistryClient(reg.address, cluster.admin_token, timeout_s=30)
        mv = rc.register(color_model(), model_pb2.ModelVersion(name="colors"))
        rc.set_alias("colors", "production", [(mv.version, 100)])
        worker = cluster.start_worker(
            reg.address, ["colors"], FOVEA_WORKER_INTRA_OP_THREADS="1", FOVEA_WORKER_DECODE_THREADS="1"
        )
        while not rc.list_workers("colors", ready_only=True):
            time.sleep(0.1)
        gateway = cluster.start_gateway(reg.address, FOVEA_GATEWAY_ACCESS_LOG="false")
        keys = {
            "gateway, unlimited key": rc.create_key("infer")[1],
            "gateway, limited key (Python path)": rc.create_key("infer", rate_limit_rps=1e6, rate_burst=1e6)[1],
        }
        results = asyncio.run(measure(gateway.address, worker.address, keys, cluster.worker_call_token, args))
    finally:
        cluster.stop()
    print(f"{'target':40} {'p50 c=1 ms':>11} {f'calls/s c={args.concurrency}':>14}")
    for name, row in results.items():
        print(f"{name:40} {row['p50_ms']:11.3f} {row['calls_s']:14.1f}")
    out = {
        "bench": "classify_hop",
        "machine": platform.node(),
        "cpus": __import__("os").cpu_count(),
        "args": vars(args),
        "results": results,
    }
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
