"""Registry benchmark: registration throughput, watch latency, Redis-restart recovery, heartbeat expiry.

Runs in-process registries (the same build_server() as `python -m registry`) against their own
append-only Valkey, so it needs nothing running. Prints a table and writes JSON.

    .venv/bin/python bench/registry/bench_registry.py                 # ~30 s
    .venv/bin/python bench/registry/bench_registry.py --trials 20     # the figures to quote

Cases:
  register        N concurrent registrations of a tiny model through 1 and 2 replicas (includes
                  validation: onnx.checker, an ONNX Runtime load and a batch-2 run)
  watch           promotion through replica A until replica B's WatchModels stream delivers it
  redis-restart   Valkey stopped and started again (same port and data) until ListModels answers
  expiry          heartbeats stop (TTL 1 s) until WatchWorkers reports the worker removed
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import platform
import secrets
import statistics
import sys
import tempfile
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fovea import codegen  # noqa: E402

codegen.require()

import grpc  # noqa: E402

from fovea.redis_server import RedisServer  # noqa: E402
from fovea.v1 import model_pb2, registry_pb2, registry_pb2_grpc  # noqa: E402
from registry.config import RegistryConfig  # noqa: E402
from registry.server import RegistryServer, build_server  # noqa: E402
from tests.tinymodels import color_model  # noqa: E402


class Client:
    def __init__(self, port: int, token: str) -> None:
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = registry_pb2_grpc.RegistryServiceStub(self.channel)
        self.md = (("authorization", f"Bearer {token}"),)

    async def register(self, name: str, data: bytes) -> int:
        async def parts() -> Any:
            yield registry_pb2.RegisterModelRequest(metadata=model_pb2.ModelVersion(name=name))
            yield registry_pb2.RegisterModelRequest(chunk=data)

        return int((await self.stub.RegisterModel(parts(), metadata=self.md, timeout=60)).model.version)

    async def promote(self, name: str, version: int) -> None:
        await self.stub.SetAlias(
            registry_pb2.SetAliasRequest(
                model=name, alias="production", targets=[model_pb2.AliasTarget(version=version, weight=100)]
            ),
            metadata=self.md,
            timeout=10,
        )


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "n": len(values),
        "p50": statistics.median(ordered),
        "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
        "max": ordered[-1],
    }


async def bench_register(start: Any, token: str, n: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for replicas in (1, 2):
        servers = [await start() for _ in range(replicas)]
        clients = [Client(s.port, token) for s in servers]
        name = f"reg-{replicas}"
        artifacts = [color_model(bias=float(i)) for i in range(n)]
        t0 = time.perf_counter()
        versions = await asyncio.gather(*(clients[i % replicas].register(name, artifacts[i]) for i in range(n)))
        wall = time.perf_counter() - t0
        assert sorted(versions) == list(range(1, n + 1)), versions
        out[f"{replicas} replica(s)"] = {"registrations": n, "wall_s": wall, "per_s": n / wall}
    return out


async def bench_watch(start: Any, token: str, trials: int) -> dict[str, float]:
    a, b = await start(), await start()
    ca, cb = Client(a.port, token), Client(b.port, token)
    for i in range(2):
        await ca.register("watched", color_model(bias=float(i)))
    stream = cb.stub.WatchModels(registry_pb2.WatchModelsRequest(), metadata=cb.md)
    it = stream.__aiter__()
    await it.__anext__()  # snapshot
    latencies = []
    for i in range(trials):
        t0 = time.perf_counter()
        await ca.promote("watched", 1 + i % 2)
        while not (await it.__anext__()).aliases:
            pass
        latencies.append(time.perf_counter() - t0)
    stream.cancel()
    return summary(latencies)


async def bench_redis_restart(start: Any, token: str, redis: RedisServer, trials: int) -> dict[str, float]:
    server = await start()
    client = Client(server.port, token)
    await client.register("restart", color_model())
    recoveries = []
    for _ in range(trials):
        await asyncio.to_thread(redis.stop)
        await asyncio.to_thread(redis.start)
        back = time.perf_counter()
        while True:
            try:
                await client.stub.ListModels(model_pb2.ListModelsRequest(), metadata=client.md, timeout=1)
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.005)
        recoveries.append(time.perf_counter() - back)
    return summary(recoveries)


async def bench_expiry(start: Any, token: str, worker_token: str, trials: int, ttl_s: float = 1.0) -> dict[str, float]:
    server = await start(heartbeat_ttl_s=ttl_s)
    client = Client(server.port, token)
    worker_md = (("authorization", f"Bearer {worker_token}"),)  # only workers may heartbeat
    stream = client.stub.WatchWorkers(registry_pb2.WatchWorkersRequest(), metadata=client.md)
    it = stream.__aiter__()
    await it.__anext__()
    delays = []
    for i in range(trials):
        wid = f"w{i}"
        status = registry_pb2.WorkerStatus(worker_id=wid, address="127.0.0.1:1", state=registry_pb2.WORKER_STATE_READY)
        sent = time.perf_counter()
        await client.stub.Heartbeat(registry_pb2.HeartbeatRequest(status=status), metadata=worker_md, timeout=5)
        while True:
            event = await it.__anext__()
            if wid in event.removed_worker_ids:
                delays.append(time.perf_counter() - sent)
                break
    stream.cancel()
    return {**summary(delays), "ttl_s": ttl_s}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    token = secrets.token_hex(24)  # an operator's (admin) token
    worker_token = secrets.token_hex(24)
    with tempfile.TemporaryDirectory() as tmp:
        redis = RedisServer(pathlib.Path(tmp) / "redis", appendonly=True).start()
        servers: list[RegistryServer] = []

        async def start(**overrides: Any) -> RegistryServer:
            config = RegistryConfig(
                port=0,
                redis_url=redis.url,
                artifact_dir=pathlib.Path(tmp) / "artifacts",
                admin_tokens=token,
                worker_tokens=worker_token,
                log_level="WARNING",
                **overrides,
            )
            servers.append(await build_server(config))
            return servers[-1]

        try:
            return {
                "register": await bench_register(start, token, args.registrations),
                "watch": await bench_watch(start, token, args.trials),
                "redis-restart": await bench_redis_restart(start, token, redis, max(3, args.trials // 4)),
                "expiry": await bench_expiry(start, token, worker_token, max(3, args.trials // 4)),
            }
        finally:
            for s in servers:
                await s.stop(0.1)
            redis.stop()


def print_table(results: dict[str, Any]) -> None:
    print(f"{'case':<28}{'n':>5}{'p50 ms':>10}{'p95 ms':>10}{'max ms':>10}")
    for case in ("watch", "redis-restart", "expiry"):
        r = results[case]
        print(f"{case:<28}{r['n']:>5}{r['p50'] * 1000:>10.1f}{r['p95'] * 1000:>10.1f}{r['max'] * 1000:>10.1f}")
    for label, r in results["register"].items():
        print(f"register, {label:<18}{r['registrations']:>5}   {r['per_s']:.1f} registrations/s ({r['wall_s']:.2f} s)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--registrations", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench" / "registry.json"))
    args = parser.parse_args()
    results = asyncio.run(main(args))
    print_table(results)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "machine": {
                    "python": platform.python_version(),
                    "platform": platform.platform(),
                    "processor": platform.processor(),
                },
                "results": results,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
