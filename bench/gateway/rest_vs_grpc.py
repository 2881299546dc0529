"""The gateway's HTTP/REST port beside its gRPC port: the same ModelInfer, the same model, the same run.

Starts Redis, a registry, one worker and one gateway (gRPC and HTTP ports) as processes on loopback, then
sends the same call three ways: gRPC ModelInfer (raw FP32 tensor), REST with the binary data extension, and
REST with the tensor as a JSON list. The model is the tiny "colors" classifier ([1,3,8,8] FP32 pixels in, the
classification extension's top label out), so nearly all of a call's time is serving, not compute. Windows of
each protocol at concurrency 1 and --concurrency take turns (--rounds rounds), so machine noise hits all three;
each row gives calls/s, p50 and p99, and the CPU ms per call of the gateway and of this client (steadier
than throughput on a busy machine, where the client's CPU is taken from the same cores). Client bodies are
built once: the figures are the server's cost, not a client's JSON encoder.

    .venv/bin/python bench/gateway/rest_vs_grpc.py                     # about a minute
    .venv/bin/python bench/gateway/rest_vs_grpc.py --window-s 5 --rounds 3 --concurrency 16

Prints a table and writes JSON (--out, default docs/bench/rest_vs_grpc.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import grpc  # noqa: E402
import numpy as np  # noqa: E402

from fovea.client import RegistryClient  # noqa: E402
from fovea.cluster import Cluster  # noqa: E402
from fovea.redis_server import free_port  # noqa: E402
from fovea.v1 import model_pb2  # noqa: E402
from inference import grpc_predict_v2_pb2 as pb  # noqa: E402
from inference import grpc_predict_v2_pb2_grpc as pb_grpc  # noqa: E402
from tests.tinymodels import color_model  # noqa: E402

Call = Callable[[], Awaitable[None]]


def pixels() -> np.ndarray:
    red = np.zeros((1, 3, 8, 8), np.float32)
    red[:, 0] = 1.0
    return red


def bodies() -> tuple[pb.ModelInferRequest, bytes, dict[str, str], bytes]:
    """The call as gRPC, REST binary (body and its header) and REST JSON: the same tensor, top label asked for."""
    array = pixels()
    grpc_req = pb.ModelInferRequest(model_name="colors")
    grpc_req.inputs.add(name="input", datatype="FP32", shape=list(array.shape))
    grpc_req.raw_input_contents.append(array.tobytes())
    grpc_req.outputs.add(name="logits").parameters["classification"].int64_param = 1
    output = {"name": "logits", "parameters": {"classification": 1, "binary_data": False}}
    tensor = {"name": "input", "shape": list(array.shape), "datatype": "FP32"}
    header = json.dumps(
        {"inputs": [{**tensor, "parameters": {"binary_data_size": array.nbytes}}], "outputs": [output]}
    ).encode()
    as_json = json.dumps({"inputs": [{**tensor, "data": array.reshape(-1).tolist()}], "outputs": [output]}).encode()
    return grpc_req, header + array.tobytes(), {"Inference-Header-Content-Length": str(len(header))}, as_json


async def window(call: Call, concurrency: int, seconds: float) -> dict[str, float]:
    latencies: list[float] = []
    failures = 0
    end = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal failures
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            try:
                await call()
            except Exception:  # noqa: BLE001 - counted and reported
                failures += 1
                continue
            latencies.append((time.perf_counter() - t0) * 1000)

    start = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "rps": len(latencies) / elapsed,
        "p50_ms": latencies[len(latencies) // 2] if latencies else float("nan"),
        "p99_ms": latencies[int(len(latencies) * 0.99)] if latencies else float("nan"),
        "calls": len(latencies),
        "failures": failures,
    }


def cpu_s(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(args: argparse.Namespace, grpc_address: str, http_base: str, secret: str, gateway_pid: int) -> Any:
    grpc_req, binary, binary_headers, as_json = bodies()
    md = (("authorization", f"Bearer {secret}"),)
    auth = {"Authorization": f"Bearer {secret}"}
    channel = grpc.aio.insecure_channel(grpc_address)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    connector = aiohttp.TCPConnector(limit=max(args.concurrency, 1))
    session = aiohttp.ClientSession(connector=connector)
    url = f"{http_base}/v2/models/colors/infer"

    async def via_grpc() -> None:
        resp = await stub.ModelInfer(grpc_req, metadata=md, timeout=30)
        assert resp.raw_output_contents[0][4:].endswith(b":0:red"), resp

    async def post(body: bytes, headers: dict[str, str]) -> None:
        async with session.post(url, data=body, headers={**auth, **headers}) as resp:
            answer = await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{resp.status}: {answer[:200]!r}")
        label = json.loads(answer)["outputs"][0]["data"][0]
        assert label.endswith(":0:red"), label

    async def via_binary() -> None:
        await post(binary, binary_headers)

    async def via_json() -> None:
        await post(as_json, {"Content-Type": "application/json"})

    calls: dict[str, Call] = {"gRPC": via_grpc, "REST binary": via_binary, "REST JSON": via_json}
    for call in calls.values():  # warm: connections, key cache, routes, the worker
        await window(call, args.concurrency, 0.5)
    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    for r in range(args.rounds):
        order = list(calls.items()) if r % 2 == 0 else list(calls.items())[::-1]
        for concurrency in (1, args.concurrency):
            for name, call in order:
                cpu0, client0 = cpu_s(gateway_pid), time.process_time()
                row = await window(call, concurrency, args.window_s)
                row["gateway_cpu_ms_per_call"] = (cpu_s(gateway_pid) - cpu0) * 1000 / max(row["calls"], 1)
                row["client_cpu_ms_per_call"] = (time.process_time() - client0) * 1000 / max(row["calls"], 1)
                runs.setdefault((name, concurrency), []).append(row)
                print(f"  round {r + 1} {name:<11} c={concurrency:<3} {row['rps']:8.0f}/s p50 {row['p50_ms']:.2f} ms")
    await session.close()
    await channel.close()
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=8, help="the higher concurrency (the lower is 1)")
    ap.add_argument("--window-s", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "rest_vs_grpc.json"))
    args = ap.parse_args()
    data_dir = pathlib.Path(tempfile.mkdtemp(prefix="fovea-bench-rest-"))
    cluster = Cluster(data_dir / "cluster")
    try:
        reg = cluster.start_registry()
        rc = RegistryClient(reg.address, cluster.admin_token, timeout_s=60)
        mv = rc.register(color_model(), model_pb2.ModelVersion(name="colors"))
        rc.set_alias(mv.name, "production", [(mv.version, 100)])
        _, secret = rc.create_key("infer")
        cluster.start_worker(reg.address, ["colors"], name="worker", FOVEA_WORKER_INTRA_OP_THREADS="1")
        while not rc.list_workers("colors", ready_only=True):
            time.sleep(0.1)
        http_port = free_port()
        gw = cluster.start_gateway(reg.address, FOVEA_GATEWAY_HTTP_PORT=str(http_port), FOVEA_GATEWAY_ACCESS_LOG="0")
        runs = asyncio.run(measure(args, gw.address, f"http://127.0.0.1:{http_port}", secret, gw.proc.pid))
    finally:
        cluster.stop()
    rows = []
    for (name, concurrency), windows in runs.items():
        rows.append(
            {
                "protocol": name,
                "concurrency": concurrency,
                **{k: statistics.median(w[k] for w in windows) for k in ("rps", "p50_ms", "p99_ms")},
                "gateway_cpu_ms_per_call": statistics.median(w["gateway_cpu_ms_per_call"] for w in windows),
                "client_cpu_ms_per_call": statistics.median(w["client_cpu_ms_per_call"] for w in windows),
                "failures": sum(int(w["failures"]) for w in windows),
                "rps_windows": [round(w["rps"], 1) for w in windows],
            }
        )
    rows.sort(key=lambda r: (r["concurrency"], list(("gRPC", "REST binary", "REST JSON")).index(r["protocol"])))
    print(
        f"\n{'protocol':<12} {'c':>3} {'calls/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
        f"{'gw CPU ms/call':>15} {'client CPU':>11} {'vs gRPC':>8}"
    )
    base = {r["concurrency"]: r["rps"] for r in rows if r["protocol"] == "gRPC"}
    for r in rows:
        print(
            f"{r['protocol']:<12} {r['concurrency']:>3} {r['rps']:>9.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} "
            f"{r['gateway_cpu_ms_per_call']:>15.3f} {r['client_cpu_ms_per_call']:>11.3f} "
            f"{r['rps'] / base[r['concurrency']]:>7.0%}"
        )
    out = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),  # other work on the machine, if any
        },
        "model": "colors (tests/tinymodels.py: [1,3,8,8] FP32 in, top-1 label out)",
        "settings": {"window_s": args.window_s, "rounds": args.rounds, "concurrency": [1, args.concurrency]},
        "rows": rows,
    }
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
