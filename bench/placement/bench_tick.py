"""Placement loop benchmark: how long one leader tick takes (Redis reads, targets, plan(), fenced write).

A real Valkey/Redis server (started here, in a temporary directory) holds 1,000 models and 100
pool workers' heartbeats, written straight into Redis in the registry's layout (registering 1,000
models through the RPC would validate 1,000 ONNX files, which is not what is measured). Models:
one version each, artifacts of 1-40 MB (so an estimate of 22-256 MB each), half with a production
alias, one in ten scaled to zero. Workers: budgets of 2-6 GB, a zone label each.

Cases (each tick run by registry.placements.Placements.step(), the same code the loop runs):
  cold      the first tick of a new leader: every replica placed, 1,000 placements and 100
            assignments written
  converge  the tick after every worker reported its assigned models ready (with their measured
            memory): every placement changes to READY and is rewritten
  steady    nothing changed since the last tick: reads and planning only, nothing written

Prints a table (ms per tick: p50, p95, max of wall time, and the median CPU time of this process,
steadier on a shared machine) and writes JSON (default docs/bench/placement_tick.json).
The tick must stay well under placement_interval_s (0.5 s).

    .venv/bin/python bench/placement/bench_tick.py             # ~30 s
    .venv/bin/python bench/placement/bench_tick.py --models 2000 --workers 200
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import pathlib
import platform
import random
import statistics
import sys
import tempfile
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import redis.asyncio as aioredis  # noqa: E402

from fovea.names import redis_key  # noqa: E402
from fovea.redis_server import RedisServer  # noqa: E402
from fovea.v1 import model_pb2, registry_pb2  # noqa: E402
from registry.config import RegistryConfig  # noqa: E402
from registry.placements import Placements  # noqa: E402

MB = 10**6


async def seed(r: Any, rng: random.Random, models: int, workers: int) -> None:
    async with r.pipeline(transaction=False) as pipe:
        for i in range(models):
            name = f"model-{i:05d}"
            mv = model_pb2.ModelVersion(
                name=name, version=1, size_bytes=rng.randint(1, 40) * MB, state=model_pb2.VERSION_STATE_READY
            )
            pipe.sadd(redis_key("models"), name)
            pipe.set(redis_key("model", name, "seq"), 1)
            pipe.set(redis_key("model", name, "v", 1), mv.SerializeToString())
            if i % 2:
                alias = model_pb2.Alias(model=name, name="production", targets=[model_pb2.AliasTarget(version=1)])
                pipe.hset(redis_key("model", name, "aliases"), "production", alias.SerializeToString())
            if i % 10 == 0:
                scale = registry_pb2.ModelScale(model=name, replicas=0, min_replicas=0, max_replicas=1)
                pipe.set(redis_key("scale", name), scale.SerializeToString())
        await pipe.execute()
    budgets = {f"worker-{i:03d}": rng.randint(2000, 6000) * MB for i in range(workers)}
    await beat(r, budgets, {})


async def beat(r: Any, budgets: dict[str, int], assigned: dict[str, list[str]]) -> None:
    """Every worker's heartbeat, with the models it was assigned loaded and ready."""
    async with r.pipeline(transaction=False) as pipe:
        for i, (wid, budget) in enumerate(sorted(budgets.items())):
            st = registry_pb2.WorkerStatus(
                worker_id=wid,
                address=f"10.0.{i // 250}.{i % 250}:8600",
                state=registry_pb2.WORKER_STATE_READY,
                pooled=True,
                labels={"device": "cpu", "zone": "abcd"[i % 4]},
                memory_budget_bytes=budget,
                models=[
                    registry_pb2.LoadedModel(name=m, version=1, ready=True, memory_bytes=30 * MB, idle_s=1.0)
                    for m in assigned.get(wid, [])
                ],
            )
            pipe.set(redis_key("worker", wid), st.SerializeToString(), px=600_000)
            pipe.zadd(redis_key("workers"), {wid: time.time() + 600})
        pipe.set(redis_key("placement", "pool"), "bench", px=600_000)
        await pipe.execute()


async def assignments(r: Any, workers: list[str]) -> dict[str, list[str]]:
    raws = await r.mget([redis_key("placement", "assign", w) for w in workers])
    return {w: [n for n in (raw or b"").decode().split(",") if n] for w, raw in zip(workers, raws, strict=True)}


async def timed(p: Placements) -> tuple[float, float]:
    """Wall and CPU milliseconds of one step (CPU: this process only, steadier on a shared machine)."""
    t0, c0 = time.perf_counter(), time.process_time()
    assert await p.step(), "the bench replica must lead"
    return (time.perf_counter() - t0) * 1000, (time.process_time() - c0) * 1000


def row(case: str, samples: list[tuple[float, float]]) -> dict[str, Any]:
    ms = sorted(w for w, _ in samples)
    return {
        "case": case,
        "ticks": len(ms),
        "p50_ms": round(statistics.median(ms), 2),
        "p95_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.95))], 2),
        "max_ms": round(ms[-1], 2),
        "cpu_p50_ms": round(statistics.median(c for _, c in samples), 2),
    }


async def run(models: int, workers: int, repeats: int) -> list[dict[str, Any]]:
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(pathlib.Path(tmp), appendonly=False).start()
        try:
            cold, converge, steady = [], [], []
            for rep in range(repeats):
                r: Any = aioredis.Redis.from_url(server.url)
                await r.flushdb()
                rng = random.Random(rep)
                await seed(r, rng, models, workers)
                p = Placements(r, RegistryConfig(placement_interval_s=0.5))
                cold.append(await timed(p))
                ids = sorted(w.decode() for w in await r.zrange(redis_key("workers"), 0, -1))
                budgets = {
                    w: registry_pb2.WorkerStatus.FromString(await r.get(redis_key("worker", w))).memory_budget_bytes
                    for w in ids
                }
                await beat(r, budgets, await assignments(r, ids))
                converge.append(await timed(p))
                for _ in range(10):
                    steady.append(await timed(p))
                placed, _ = await p.list_placements()
                ready = sum(1 for x in placed if x.state == registry_pb2.PLACEMENT_STATE_READY)
                await p.stop()
                await r.aclose()
            results = [row("cold", cold), row("converge", converge), row("steady", steady)]
            for res in results:
                res["models"], res["workers"], res["ready_after"] = models, workers, ready
        finally:
            server.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench" / "placement_tick.json"))
    args = parser.parse_args()
    if not (1 <= args.models <= 100_000 and 1 <= args.workers <= 10_000 and 1 <= args.repeats <= 100):
        parser.error("--models 1..100000, --workers 1..10000, --repeats 1..100")
    results = asyncio.run(run(args.models, args.workers, args.repeats))
    print(f"placement tick, {args.models} models on {args.workers} pool workers (ms per tick)")
    print(f"{'case':<10} {'ticks':>5} {'p50':>8} {'p95':>8} {'max':>8} {'cpu p50':>8}")
    for res in results:
        print(
            f"{res['case']:<10} {res['ticks']:>5} {res['p50_ms']:>8} {res['p95_ms']:>8} {res['max_ms']:>8}"
            f" {res['cpu_p50_ms']:>8}"
        )
    print(f"load average while it ran: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    print(f"models READY after converging: {results[0]['ready_after']} of {args.models}")
    machine = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpus": os.cpu_count(),
    }
    when = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "date": when, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
