"""Placement planner benchmark: how long registry.placement.plan() takes for a large cluster.

A simulated cluster (no Redis, no services; the planner is a pure function): 1,000 models of mixed
sizes (some in a GPU pool or a zone, some scaled to zero and evictable) on 100 pool workers of
mixed budgets, about 70% of the cluster's memory wanted. Two cases, each repeated:

  cold     plan from nothing: every replica placed anew (a new cluster, or a new leader with no
           assignments written yet)
  steady   a placement-loop tick: current = the previous tick's result, with a few changes since
           (2 workers leave, 2 join, 10 models change their target, 5 scaled-to-zero models get a call)

Both run on the cluster above ("normal") and on its first half of the workers ("overfull": about
140% of the memory wanted, so many replicas fit nowhere: the slow path of failed fits, eviction
searches and reasons).

Prints a table (plan time in ms: p50, p95 and max of wall time, and the median CPU time, steadier
on a shared machine; decisions per second = models whose placement is decided per second at the
p50) and writes JSON (default docs/bench/placement_plan.json) with the machine it ran on.

    .venv/bin/python bench/placement/bench_plan.py                    # ~10 s
    .venv/bin/python bench/placement/bench_plan.py --models 5000 --workers 500
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import random
import statistics
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from registry.placement import Capacity, Decision, Need, plan  # noqa: E402

MB = 10**6


def make_worker(rng: random.Random, i: int) -> Capacity:
    zone = "abcd"[i % 4]
    if i % 5 == 0:  # one in five has a GPU and a device budget
        return Capacity(
            f"worker-{i:04d}",
            {"device": "gpu", "zone": zone},
            rng.randint(4000, 8000) * MB,
            device_memory_bytes=rng.randint(8000, 24000) * MB,
        )
    reserved = rng.choice([0, 0, 0, 200, 500]) * MB  # some also serve a fixed model list
    return Capacity(f"worker-{i:04d}", {"device": "cpu", "zone": zone}, rng.randint(1500, 5000) * MB, 0, reserved)


def make_need(rng: random.Random, i: int, now: float) -> Need:
    # sizes from 5 MB to 1.2 GB, most of them small (log-uniform)
    memory = int(10 ** rng.uniform(6.7, 9.08))
    evictable = rng.random() < 0.3
    roll = rng.random()
    pool: dict[str, str] = {}
    device = 0
    if roll < 0.15:
        pool = {"device": "gpu"}
        device = int(memory * rng.uniform(1.0, 2.0))
    elif roll < 0.25:
        pool = {"zone": rng.choice("abcd")}
    replicas = rng.choice([0, 1, 1]) if evictable else rng.choice([1, 1, 1, 2, 2, 3])
    return Need(
        f"model-{i:04d}",
        replicas,
        memory,
        device_memory_bytes=device,
        pool=pool,
        evictable=evictable,
        last_used=now - rng.uniform(0, 3600) if evictable else 0.0,
    )


def tick_changes(
    rng: random.Random, needs: list[Need], workers: list[Capacity], next_id: int, now: float
) -> tuple[list[Need], list[Capacity], int]:
    """What changes between two ticks of a busy cluster: workers come and go, targets move."""
    workers = list(workers)
    for _ in range(2):
        workers.pop(rng.randrange(len(workers)))
    for _ in range(2):
        workers.append(make_worker(rng, next_id))
        next_id += 1
    needs = list(needs)
    for i in rng.sample(range(len(needs)), 10):
        n = needs[i]
        step = rng.choice([-1, 1])
        needs[i] = dataclasses.replace(n, replicas=max(0 if n.evictable else 1, min(4, n.replicas + step)))
    evictables = [i for i, n in enumerate(needs) if n.evictable]
    for i in rng.sample(evictables, min(5, len(evictables))):  # a call or a demand
        needs[i] = dataclasses.replace(needs[i], replicas=max(1, needs[i].replicas), last_used=now)
    return needs, workers, next_id


def counts(d: Decision) -> dict[str, int]:
    return {
        "replicas_assigned": sum(len(ids) for ids in d.assignments.values()),
        "short": len(d.reasons),
        "unplaceable": len(d.unplaceable),
        "evicted": len(d.evicted),
    }


def timed(needs: list[Need], workers: list[Capacity], current: dict[str, list[str]]) -> tuple[Decision, float, float]:
    """One plan(): its decision, wall seconds and CPU seconds (the CPU time is steadier on a shared machine)."""
    w0, c0 = time.perf_counter(), time.process_time()
    decision = plan(needs, workers, current)
    return decision, time.perf_counter() - w0, time.process_time() - c0


def summary(walls: list[float], cpus: list[float], models: int) -> dict[str, Any]:
    ordered = sorted(walls)
    p50 = statistics.median(ordered)
    return {
        "n": len(ordered),
        "p50_ms": p50 * 1000,
        "p95_ms": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))] * 1000,
        "max_ms": ordered[-1] * 1000,
        "cpu_p50_ms": statistics.median(cpus) * 1000,
        "decisions_per_s": models / p50,
        "decisions_per_cpu_s": models / max(statistics.median(cpus), 1e-9),
    }


def scenario(args: argparse.Namespace, n_workers: int) -> dict[str, Any]:
    """Cold plans, then steady-state ticks, on the first n_workers workers of the seed's cluster."""
    rng = random.Random(args.seed)
    now = 1_800_000_000.0
    workers = [make_worker(rng, i) for i in range(args.workers)][:n_workers]
    needs = [make_need(rng, i, now) for i in range(args.models)]
    wanted = sum(n.memory_bytes * n.replicas for n in needs)
    budget = sum(w.memory_bytes - w.reserved_bytes for w in workers)
    cluster = {
        "models": len(needs),
        "workers": len(workers),
        "replicas_wanted": sum(n.replicas for n in needs),
        "memory_wanted_fraction": round(wanted / budget, 3),
    }

    walls: list[float] = []
    cpus: list[float] = []
    decision = plan(needs, workers, {})  # warm-up
    for _ in range(args.repeats):
        decision, wall, cpu = timed(needs, workers, {})
        walls.append(wall)
        cpus.append(cpu)
    cold = {**summary(walls, cpus, len(needs)), **counts(decision)}

    walls, cpus = [], []
    added: list[int] = []
    evicted: list[int] = []
    current = decision.assignments
    next_id = args.workers
    for _ in range(args.ticks):
        now += 0.5
        needs, workers, next_id = tick_changes(rng, needs, workers, next_id, now)
        decision, wall, cpu = timed(needs, workers, current)
        walls.append(wall)
        cpus.append(cpu)
        added.append(sum(len(set(ids) - set(current.get(m, ()))) for m, ids in decision.assignments.items()))
        evicted.append(len(decision.evicted))
        current = decision.assignments
    steady = {
        **summary(walls, cpus, len(needs)),
        "replicas_added_per_tick_mean": statistics.mean(added),
        "evicted_per_tick_mean": statistics.mean(evicted),
        "last_tick": counts(decision),
    }
    return {"cluster": cluster, "cold": cold, "steady": steady}


def run(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "seed": args.seed,
        "normal": scenario(args, args.workers),
        # the same models on half the workers: many do not fit, which is the planner's slow path
        # (failed fits, eviction searches, reasons)
        "overfull": scenario(args, args.workers // 2),
    }


def print_table(results: dict[str, Any]) -> None:
    print(f"{'cluster':<44}{'case':<8}{'n':>5}{'p50 ms':>8}{'p95 ms':>8}{'max ms':>8}{'cpu ms':>8}{'decisions/s':>13}")
    for name in ("normal", "overfull"):
        c = results[name]["cluster"]
        label = f"{name}: {c['models']} models, {c['workers']} workers, {c['memory_wanted_fraction']:.0%} mem"
        for case in ("cold", "steady"):
            r = results[name][case]
            print(
                f"{label:<44}{case:<8}{r['n']:>5}{r['p50_ms']:>8.1f}{r['p95_ms']:>8.1f}{r['max_ms']:>8.1f}"
                f"{r['cpu_p50_ms']:>8.1f}{r['decisions_per_s']:>13,.0f}"
            )
            label = ""
    for name in ("normal", "overfull"):
        cold, steady = results[name]["cold"], results[name]["steady"]
        print(
            f"{name}: cold assigns {cold['replicas_assigned']} replicas of "
            f"{results[name]['cluster']['replicas_wanted']} wanted, {cold['short']} models short, "
            f"{cold['unplaceable']} unplaceable; a steady tick adds {steady['replicas_added_per_tick_mean']:.1f} "
            f"replicas and evicts {steady['evicted_per_tick_mean']:.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=20, help="cold plans")
    parser.add_argument("--ticks", type=int, default=100, help="steady-state ticks")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench" / "placement_plan.json"))
    args = parser.parse_args()
    if not (1 <= args.models <= 100_000 and 4 <= args.workers <= 10_000 and args.repeats >= 1 and args.ticks >= 1):
        parser.error("--models 1..100000, --workers 4..10000, --repeats and --ticks >= 1")
    load_start = os.getloadavg()[0]
    results = run(args)
    print_table(results)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        "nproc": len(os.sched_getaffinity(0)),  # what `nproc` prints
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        # the 1-minute load average: above nproc, other work shared the cores and wall times stretch
        "load_1m_at_start": round(load_start, 2),
        "load_1m_at_end": round(os.getloadavg()[0], 2),
    }
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out.write_text(json.dumps({"machine": machine, "date": when, "results": results}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
