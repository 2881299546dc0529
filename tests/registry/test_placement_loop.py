"""The placement loop (registry/placements.py) on a real registry and Valkey.

Pool workers are simulated by sending real Heartbeat RPCs with the worker token: the loop's only
input from workers is their heartbeats, so a sender that reports what it was assigned as loaded is
all the loop can see of a real worker. (The worker side is tested with real worker processes in
tests/worker.)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from fovea.v1 import registry_pb2
from tests.registry.conftest import StartRegistry
from tests.registry.helpers import Reg, poll, status_of

MB = 1_000_000
FAST = dict(placement_interval_s=0.1, leader_ttl_s=2.0)
P = registry_pb2


@dataclass
class SimWorker:
    """A pool worker as heartbeats show it: it 'loads' what it is assigned (ready at once, or never when
    frozen) and reports the figures a test sets (memory per model, queue depth, idle time, calls)."""

    reg: Reg
    worker_id: str
    budget: int = 1000 * MB
    labels: dict[str, str] = field(default_factory=lambda: {"device": "cpu"})
    pooled: bool = True
    ready: bool = True
    queue: dict[str, int] = field(default_factory=dict)
    idle_s: dict[str, float] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)
    fixed: tuple[tuple[str, int], ...] = ()
    assigned: list[str] = field(default_factory=list)
    known: bool = False
    versions: dict[str, int] = field(default_factory=dict)

    async def beat(self) -> registry_pb2.HeartbeatResponse:
        models = [P.LoadedModel(name=n, version=v, ready=True, provider="CPU") for n, v in self.fixed]
        for name in self.assigned:
            if name not in self.versions:
                self.versions[name] = (await self.reg.resolve(name)).model.version
            models.append(
                P.LoadedModel(
                    name=name,
                    version=self.versions[name],
                    ready=self.ready,
                    provider="CPU",
                    memory_bytes=self.memory.get(name, 0),
                    queue_depth=self.queue.get(name, 0),
                    idle_s=self.idle_s.get(name, 0.0),
                )
            )
        status = P.WorkerStatus(
            worker_id=self.worker_id,
            address=f"127.0.0.1:{1024 + abs(hash(self.worker_id)) % 50000}",
            state=P.WORKER_STATE_READY,
            models=models,
            device=P.Device(kind="CPU", name="simulated"),
            pooled=self.pooled,
            labels=self.labels,
            memory_budget_bytes=self.budget if self.pooled else 0,
        )
        resp: registry_pb2.HeartbeatResponse = await self.reg.call("Heartbeat", P.HeartbeatRequest(status=status))
        if resp.assignment_known:
            self.assigned = list(resp.assigned_models)
            self.versions = {n: v for n, v in self.versions.items() if n in self.assigned}
        self.known = resp.assignment_known
        return resp


@contextlib.asynccontextmanager
async def beating(*workers: SimWorker, every_s: float = 0.1) -> AsyncIterator[None]:
    """Heartbeats from every worker until the block ends."""

    async def loop(w: SimWorker) -> None:
        while True:
            await w.beat()
            await asyncio.sleep(every_s)

    tasks = [asyncio.create_task(loop(w)) for w in workers]
    try:
        yield
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def placement(reg: Reg, model: str) -> registry_pb2.ModelPlacement:
    resp = await reg.call("ListPlacements", P.ListPlacementsRequest(model=model))
    return resp.placements[0]


async def scale(reg: Reg, model: str, replicas: int, **fields: Any) -> registry_pb2.ModelPlacement:
    resp = await reg.call(
        "SetModelScale", P.SetModelScaleRequest(scale=P.ModelScale(model=model, replicas=replicas, **fields))
    )
    return resp.placement


def holders(workers: list[SimWorker], model: str) -> list[str]:
    return sorted(w.worker_id for w in workers if model in w.assigned)


@pytest.fixture
async def fast(start_registry: StartRegistry, token: str, worker_token: str) -> AsyncIterator[Reg]:
    server = await start_registry(**FAST)
    reg = Reg(f"127.0.0.1:{server.port}", token, worker_token=worker_token)
    yield reg
    await reg.close()


async def test_a_pool_worker_gets_its_model_in_the_heartbeat_answer(fast: Reg) -> None:
    await fast.register("colors")
    before = await placement(fast, "colors")
    assert before.state == P.PLACEMENT_STATE_UNPLACEABLE and "no pool worker is alive" in before.reason
    fixed = SimWorker(fast, "fixed-1", pooled=False, fixed=(("colors", 1),))
    w = SimWorker(fast, "pool-1")
    async with beating(fixed, w):
        await poll(lambda: _true(w.known and w.assigned == ["colors"]))
        p = await poll(lambda: _state(fast, "colors", P.PLACEMENT_STATE_READY))
        assert list(p.worker_ids) == ["pool-1"] and list(p.ready_worker_ids) == ["pool-1"]
        assert p.target_replicas == 1 and p.scale.replicas == 1 and p.scale.max_replicas == 1
        # A worker with a fixed model list never gets an assignment.
        resp = await fixed.beat()
        assert not resp.assignment_known and not resp.assigned_models
        listing = await fast.call("ListPlacements", P.ListPlacementsRequest())
        assert listing.leader.startswith("registry-")


async def test_replicas_land_on_different_workers_within_their_budgets(fast: Reg) -> None:
    """Five tiny models (about 17 MB each by the estimate) on three workers of 40 MB: two fit on each."""
    for name in ("m1", "m2", "m3", "m4"):
        await fast.register(name)
    workers = [SimWorker(fast, f"w{i}", budget=40 * MB) for i in range(3)]
    await scale(fast, "m1", 2)
    async with beating(*workers):
        await poll(lambda: _true(holders(workers, "m1") and all(holders(workers, m) for m in ("m2", "m3", "m4"))))
        assert len(holders(workers, "m1")) == 2  # two replicas, two workers
        for name in ("m1", "m2", "m3", "m4"):
            p = await poll(functools.partial(_state, fast, name, P.PLACEMENT_STATE_READY))
            assert len(set(p.worker_ids)) == len(p.worker_ids) == p.target_replicas
        sizes = {m: (await placement(fast, m)).memory_bytes for m in ("m1", "m2", "m3", "m4")}
        for w in workers:
            assert sum(sizes[m] for m in w.assigned) <= w.budget, (w.worker_id, w.assigned)
        # A model measured by a worker is placed by its measured size.
        workers[0].memory.update({m: 3 * MB for m in workers[0].assigned})
        measured = workers[0].assigned[0]
        await poll(lambda: _memory(fast, measured, 3 * MB))


async def test_a_declared_memory_figure_places_models_until_a_larger_one_is_measured(fast: Reg) -> None:
    """A scale's memory_bytes replaces the artifact estimate (about 17 MB here) and is a floor under what workers
    measure: two models declared at 30 MB do not share a 50 MB worker, and one measured at 45 MB costs 45."""
    for name in ("d1", "d2"):
        await fast.register(name)
        p = await scale(fast, name, 1, memory_bytes=30 * MB)
        assert p.scale.memory_bytes == 30 * MB
    workers = [SimWorker(fast, f"w{i}", budget=50 * MB) for i in range(2)]
    async with beating(*workers):
        await poll(lambda: _true(holders(workers, "d1") and holders(workers, "d2")))
        assert holders(workers, "d1") != holders(workers, "d2")  # 60 MB declared: not on one 50 MB worker
        assert (await placement(fast, "d1")).memory_bytes == 30 * MB
        # Measured below the declared figure: the declared one stands.
        for w in workers:
            w.memory.update({m: 10 * MB for m in w.assigned})
        await asyncio.sleep(0.5)
        assert (await placement(fast, "d1")).memory_bytes == 30 * MB
        # Measured above it: the measured one.
        for w in workers:
            w.memory.update({m: 45 * MB for m in w.assigned})
        await poll(lambda: _memory(fast, "d1", 45 * MB))
    code, msg = await status_of(scale(fast, "d1", 1, memory_bytes=(1 << 50) + 1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "memory_bytes" in msg and "1 PiB" in msg, msg
    code, msg = await status_of(scale(fast, "d1", 1, device_memory_bytes=1 << 60))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "device_memory_bytes" in msg, msg


async def test_a_model_too_big_for_every_worker_is_unplaceable_and_says_why(fast: Reg) -> None:
    await fast.register("big")
    w = SimWorker(fast, "small-1", budget=5 * MB)
    async with beating(w):
        p = await poll(lambda: _state(fast, "big", P.PLACEMENT_STATE_UNPLACEABLE, leader=True))
        assert p.reason and "MB" in p.reason, p.reason
        await poll(lambda: _true(w.known))
        assert not w.assigned
        # Once a worker that can hold it joins, it is placed there.
        roomy = SimWorker(fast, "roomy-1", budget=500 * MB)
        async with beating(roomy):
            p = await poll(lambda: _state(fast, "big", P.PLACEMENT_STATE_READY))
            assert list(p.worker_ids) == ["roomy-1"]


async def test_pool_labels_choose_the_workers(fast: Reg) -> None:
    await fast.register("gpu-only")
    await scale(fast, "gpu-only", 1, pool={"gpu": "h100"})
    cpu = SimWorker(fast, "cpu-1")
    async with beating(cpu):
        p = await poll(lambda: _state(fast, "gpu-only", P.PLACEMENT_STATE_UNPLACEABLE, leader=True))
        assert "gpu=h100" in p.reason, p.reason
        gpu = SimWorker(fast, "gpu-1", labels={"device": "gpu", "gpu": "h100"})
        async with beating(gpu):
            p = await poll(lambda: _state(fast, "gpu-only", P.PLACEMENT_STATE_READY))
            assert list(p.worker_ids) == ["gpu-1"] and not cpu.assigned


async def test_a_worker_whose_heartbeats_stop_is_dropped_and_its_models_move(
    start_registry: StartRegistry, token: str, worker_token: str
) -> None:
    server = await start_registry(heartbeat_ttl_s=1.0, **FAST)
    reg = Reg(f"127.0.0.1:{server.port}", token, worker_token=worker_token)
    await reg.register("colors")
    await reg.register("digits")
    a, b = SimWorker(reg, "a"), SimWorker(reg, "b")
    beats_of_a = beating(a)
    await beats_of_a.__aenter__()
    try:
        # Both models go to a, the only worker; b joins later and takes nothing (nothing needs to move).
        await poll(lambda: _true(sorted(a.assigned) == ["colors", "digits"]))
        async with beating(b):
            await poll(lambda: _true(b.known))
            await asyncio.sleep(0.5)
            assert sorted(a.assigned) == ["colors", "digits"] and not b.assigned
            for m in ("colors", "digits"):
                await poll(functools.partial(_state, reg, m, P.PLACEMENT_STATE_READY))
            # a's heartbeats stop: after the TTL (1 s) it is gone, and its models are assigned to b.
            await beats_of_a.__aexit__(None, None, None)
            started = time.monotonic()
            await poll(lambda: _true(sorted(b.assigned) == ["colors", "digits"]), timeout_s=10)
            assert time.monotonic() - started < 5.0
            for m in ("colors", "digits"):
                final = await poll(functools.partial(_state, reg, m, P.PLACEMENT_STATE_READY))
                assert list(final.worker_ids) == ["b"]
    finally:
        await beats_of_a.__aexit__(None, None, None)
        await reg.close()


async def test_load_adds_a_replica_and_idleness_takes_it_away(
    start_registry: StartRegistry, token: str, worker_token: str
) -> None:
    server = await start_registry(scale_up_after_s=0.5, scale_down_after_s=1.0, **FAST)
    reg = Reg(f"127.0.0.1:{server.port}", token, worker_token=worker_token)
    await reg.register("busy")
    await scale(reg, "busy", 1, min_replicas=1, max_replicas=2)
    a, b = SimWorker(reg, "a"), SimWorker(reg, "b")
    async with beating(a, b):
        p = await poll(lambda: _state(reg, "busy", P.PLACEMENT_STATE_READY))
        first = p.worker_ids[0]
        one = a if first == "a" else b
        one.queue["busy"] = 9  # 9 calls queued on one replica: above 4 per replica
        p = await poll(lambda: _replicas(reg, "busy", 2), timeout_s=10)
        assert sorted(p.worker_ids) == ["a", "b"] and p.target_replicas == 2
        # The queue drains and no call comes for longer than scale_down_after_s: back to one replica.
        one.queue["busy"] = 0
        for w in (a, b):
            w.idle_s["busy"] = 5.0
        p = await poll(lambda: _replicas(reg, "busy", 1), timeout_s=10)
        assert p.target_replicas == 1 and p.scale.min_replicas == 1
    await reg.close()


async def test_scale_to_zero_loads_on_demand_and_unloads_when_idle(
    start_registry: StartRegistry, token: str, worker_token: str, gateway_token: str
) -> None:
    server = await start_registry(**FAST)
    reg = Reg(f"127.0.0.1:{server.port}", token, worker_token=worker_token)
    gw = reg.with_token(gateway_token)
    await reg.register("sleepy")
    p = await scale(reg, "sleepy", 0, idle_unload_s=1.0)
    assert p.scale.replicas == 0 and p.scale.min_replicas == 0 and p.scale.max_replicas == 1
    w = SimWorker(reg, "w1")
    async with beating(w):
        p = await poll(lambda: _state(reg, "sleepy", P.PLACEMENT_STATE_IDLE, leader=True))
        assert not p.worker_ids and p.target_replicas == 0 and "next call" in p.reason
        await asyncio.sleep(0.5)
        assert not w.assigned
        # A gateway's demand: the leader decides at once and the answer already names the worker.
        demanded = (await gw.call("DemandModel", P.DemandModelRequest(model="sleepy"))).placement
        assert demanded.target_replicas == 1 and list(demanded.worker_ids) == ["w1"], demanded
        assert demanded.state in (P.PLACEMENT_STATE_LOADING, P.PLACEMENT_STATE_READY)
        await poll(lambda: _state(reg, "sleepy", P.PLACEMENT_STATE_READY))
        # It answers calls for a while (idle 0), then none for idle_unload_s: unassigned, idle again.
        w.idle_s["sleepy"] = 0.0
        await asyncio.sleep(0.5)
        assert w.assigned == ["sleepy"]
        w.idle_s["sleepy"] = 1.5
        p = await poll(lambda: _state(reg, "sleepy", P.PLACEMENT_STATE_IDLE), timeout_s=10)
        await poll(lambda: _true(not w.assigned))
    await reg.close()


async def test_a_model_loading_on_demand_is_not_unloaded_for_idleness(
    start_registry: StartRegistry, token: str, worker_token: str, gateway_token: str
) -> None:
    """A replica that takes longer to load than idle_unload_s keeps its assignment until it is ready."""
    server = await start_registry(**FAST)
    reg = Reg(f"127.0.0.1:{server.port}", token, worker_token=worker_token)
    gw = reg.with_token(gateway_token)
    await reg.register("slow-load")
    await scale(reg, "slow-load", 0, idle_unload_s=0.5)
    w = SimWorker(reg, "w1", ready=False)  # reports the model loading, never ready
    async with beating(w):
        await poll(lambda: _state(reg, "slow-load", P.PLACEMENT_STATE_IDLE, leader=True))
        await gw.call("DemandModel", P.DemandModelRequest(model="slow-load"))
        await poll(lambda: _true(w.assigned == ["slow-load"]))
        await asyncio.sleep(2.0)  # four idle times, twenty ticks
        assert w.assigned == ["slow-load"]
        assert (await placement(reg, "slow-load")).state == P.PLACEMENT_STATE_LOADING
    await reg.close()


async def test_access_rules_and_validation(fast: Reg, worker_token: str, gateway_token: str, redis_url: str) -> None:
    await fast.register("alpha")
    await fast.register("beta")
    _, infer = await fast.create_key(P.ROLE_INFER)
    _, publish_a = await fast.create_key(P.ROLE_PUBLISH, ("alpha*",))
    _, infer_b = await fast.create_key(P.ROLE_INFER, ("beta",))
    denied = grpc.StatusCode.PERMISSION_DENIED
    code, msg = await status_of(scale(fast.with_token(infer), "alpha", 2))
    assert code == denied and "needs publish" in msg
    code, msg = await status_of(scale(fast.with_token(publish_a), "beta", 2))
    assert code == denied and "'beta'" in msg
    assert (await scale(fast.with_token(publish_a), "alpha", 2)).scale.replicas == 2
    for t in (worker_token, infer):
        code, msg = await status_of(fast.with_token(t).call("DemandModel", P.DemandModelRequest(model="alpha")))
        assert code == denied and "DemandModel is only for gateways" in msg, msg
    request = P.SetModelScaleRequest(scale=P.ModelScale(model="alpha", replicas=1))
    code, _ = await status_of(fast.with_token(gateway_token).call("SetModelScale", request))
    assert code == denied
    # Everyone may list placements; a key limited to some models sees only those.
    for t in (worker_token, gateway_token, infer):
        seen = await fast.with_token(t).call("ListPlacements", P.ListPlacementsRequest())
        assert [p.scale.model for p in seen.placements] == ["alpha", "beta"]
    seen = await fast.with_token(infer_b).call("ListPlacements", P.ListPlacementsRequest())
    assert [p.scale.model for p in seen.placements] == ["beta"]
    code, _ = await status_of(fast.with_token(infer_b).call("ListPlacements", P.ListPlacementsRequest(model="alpha")))
    assert code == denied
    # Bad scales: INVALID_ARGUMENT with what was wrong; an unknown model: NOT_FOUND.
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases: list[tuple[dict[str, Any], str]] = [
        (dict(replicas=1, min_replicas=2), "min_replicas <= replicas <= max_replicas"),
        (dict(replicas=3, max_replicas=2), "min_replicas <= replicas <= max_replicas"),
        (dict(replicas=65, min_replicas=1, max_replicas=65), "max_replicas_limit"),
        (dict(replicas=1, pool={f"k{i}": "v" for i in range(17)}), "at most 16 labels"),
        (dict(replicas=1, pool={"GPU": "h100"}), "invalid pool label key"),
        (dict(replicas=1, pool={"gpu": "a b"}), "invalid pool label value"),
        (dict(replicas=0, idle_unload_s=-1.0), "idle_unload_s"),
        (dict(replicas=0, idle_unload_s=float("nan")), "idle_unload_s"),
        (dict(replicas=0, idle_unload_s=8 * 86400.0), "7 days"),
    ]
    for fields, expected in cases:
        code, msg = await status_of(scale(fast, "alpha", **fields))
        assert code == invalid and expected in msg, (fields, code, msg)
    code, msg = await status_of(scale(fast, "nope", 1))
    assert code == grpc.StatusCode.NOT_FOUND and "unknown model 'nope'" in msg
    code, msg = await status_of(fast.with_token(gateway_token).call("DemandModel", P.DemandModelRequest(model="nope")))
    assert code == grpc.StatusCode.NOT_FOUND
    code, msg = await status_of(scale(fast, "Bad Name", 1))
    assert code == invalid
    assert (await placement(fast, "alpha")).scale.replicas == 2  # the refused calls changed nothing


async def test_pool_heartbeats_are_bounded(fast: Reg) -> None:
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    cases: list[tuple[dict[str, Any], str]] = [
        (dict(labels={f"k{i}": "v" for i in range(33)}), "at most 32 labels"),
        (dict(labels={"Device": "cpu"}), "invalid label key"),
        (dict(memory_budget_bytes=0), "needs memory_budget_bytes"),
        (dict(memory_budget_bytes=1 << 51), "limited to"),
        (dict(device_memory_budget_bytes=1 << 51), "limited to"),
        (dict(models=[P.LoadedModel(name="m", version=1, memory_bytes=1 << 51)]), "memory figures"),
        (dict(models=[P.LoadedModel(name="m", version=1, idle_s=float("inf"))]), "idle_s"),
        (dict(models=[P.LoadedModel(name="m", version=1, idle_s=-1.0)]), "idle_s"),
    ]
    for fields, expected in cases:
        status = P.WorkerStatus(
            worker_id="w", address="127.0.0.1:9", state=P.WORKER_STATE_READY, pooled=True, memory_budget_bytes=MB
        )
        for k, v in fields.items():
            if k == "models":
                status.models.extend(v)
            elif k == "labels":
                status.labels.update(v)
            else:
                setattr(status, k, v)
        code, msg = await status_of(fast.call("Heartbeat", P.HeartbeatRequest(status=status)))
        assert code == invalid and expected in msg, (fields, code, msg)


# ---- small async predicates for poll() ---------------------------------------------------------


async def _true(value: object) -> object:
    return value


async def _state(reg: Reg, model: str, state: registry_pb2.PlacementState, leader: bool = False) -> Any:
    """The model's placement once it is in this state (and, with leader, decided by a leader), else None."""
    resp = await reg.call("ListPlacements", P.ListPlacementsRequest(model=model))
    p = resp.placements[0]
    if p.state != state or (leader and not p.HasField("updated_at")) or (leader and not resp.leader):
        return None
    return p


async def _replicas(reg: Reg, model: str, n: int) -> Any:
    p = await placement(reg, model)
    ok = p.state == P.PLACEMENT_STATE_READY and len(p.worker_ids) == n and len(p.ready_worker_ids) == n
    return p if ok else None


async def _memory(reg: Reg, model: str, n: int) -> bool:
    return (await placement(reg, model)).memory_bytes == n


async def test_the_served_version_follows_the_alias_and_skips_archived_ones(fast: Reg) -> None:
    """No alias: the latest version that is not archived; an alias: its version; all archived: nothing."""
    for _ in range(2):
        await fast.register("multi")
    await fast.register("gone")
    await fast.call("ArchiveVersion", P.ArchiveVersionRequest(model="multi", version=2))
    await fast.call("ArchiveVersion", P.ArchiveVersionRequest(model="gone", version=1))
    w = SimWorker(fast, "w1")
    async with beating(w):
        await poll(functools.partial(_state, fast, "multi", P.PLACEMENT_STATE_READY))
        assert w.versions == {"multi": 1}
        p = await poll(functools.partial(_state, fast, "gone", P.PLACEMENT_STATE_UNPLACEABLE, leader=True))
        assert "no version to serve" in p.reason and not p.worker_ids
        # A version that reports ready but is not the one wanted does not count: promote v3, and the
        # replica that still has v1 loaded is LOADING until it reports v3.
        await fast.register("multi")
        await fast.set_alias("multi", "production", (3, 100))
        p = await poll(functools.partial(_state, fast, "multi", P.PLACEMENT_STATE_LOADING))
        assert "multi v3 is loading on w1" in p.reason, p.reason
        w.versions.clear()  # the simulated worker follows the alias
        await poll(functools.partial(_state, fast, "multi", P.PLACEMENT_STATE_READY))
        assert w.versions == {"multi": 3}


async def test_a_replica_with_placement_off_never_leads(
    start_registry: StartRegistry, token: str, worker_token: str
) -> None:
    off = await start_registry(placement=False, **FAST)
    reg = Reg(f"127.0.0.1:{off.port}", token, worker_token=worker_token)
    await reg.register("colors")
    w = SimWorker(reg, "w1")
    async with beating(w):
        await asyncio.sleep(1.0)
        assert not off.placements.leading and not w.known
        listing = await reg.call("ListPlacements", P.ListPlacementsRequest())
        assert listing.leader == "" and listing.placements[0].reason == "no placement leader yet"
        on = await start_registry(**FAST)  # a replica that places: it leads, and w1 gets colors
        await poll(lambda: _true(w.assigned == ["colors"]))
        assert on.placements.leading and not off.placements.leading
    await reg.close()
