"""Placement leadership: two registry replicas on one Valkey; one leads, a model is never assigned twice,
the other takes over when the leader stops or dies, and a deposed leader's write is refused."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import redis.asyncio as aioredis

from fovea.names import redis_key
from fovea.v1 import registry_pb2
from registry.placements import LEADER, assign_key
from registry.server import RegistryServer
from tests.registry.conftest import StartRegistry
from tests.registry.helpers import Reg, poll
from tests.registry.test_placement_loop import SimWorker, beating

P = registry_pb2
LEADER_TTL_S = 1.5
FAST = dict(placement_interval_s=0.1, leader_ttl_s=LEADER_TTL_S)
MODELS = ("m1", "m2", "m3")


def leaders(*servers: RegistryServer) -> list[str]:
    return [s.placements.id for s in servers if s.placements.leading]


async def assignment_counts(r: Any, workers: list[str]) -> dict[str, int]:
    """How many workers each model is assigned to, read straight from Redis in one round trip."""
    counts: dict[str, int] = {}
    for raw in await r.mget([assign_key(w) for w in workers]):
        for name in (raw or b"").decode().split(","):
            if name:
                counts[name] = counts.get(name, 0) + 1
    return counts


async def test_one_replica_leads_and_no_model_is_ever_assigned_twice(
    start_registry: StartRegistry, token: str, worker_token: str, redis_url: str
) -> None:
    a = await start_registry(**FAST)
    b = await start_registry(**FAST)
    reg_a = Reg(f"127.0.0.1:{a.port}", token, worker_token=worker_token)
    reg_b = Reg(f"127.0.0.1:{b.port}", token, worker_token=worker_token)
    r: Any = aioredis.Redis.from_url(redis_url)
    for m in MODELS:
        await reg_a.register(m)
    # No pool yet: neither replica contends, so Redis holds no leader key.
    await asyncio.sleep(0.5)
    assert leaders(a, b) == [] and await r.get(LEADER) is None
    workers = [SimWorker(reg_a if i % 2 else reg_b, f"w{i}") for i in range(3)]
    ids = [w.worker_id for w in workers]
    worst: dict[str, int] = {}
    leader_changes: list[float] = []
    stop = asyncio.Event()

    async def watch() -> None:
        """Samples every assignment key every 10 ms: no model may ever be on more workers than its target."""
        seen = ""
        while not stop.is_set():
            for m, n in (await assignment_counts(r, ids)).items():
                worst[m] = max(worst.get(m, 0), n)
            now = (await r.get(LEADER) or b"").decode()
            if now != seen:
                leader_changes.append(time.monotonic())
                seen = now
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    try:
        async with beating(*workers):
            await poll(lambda: _placed(reg_b, MODELS))
            assert len(leaders(a, b)) == 1
            first = leaders(a, b)[0]
            for client in (reg_a, reg_b):  # both replicas name the same leader
                assert (await client.call("ListPlacements", P.ListPlacementsRequest())).leader == first
            # Many ticks, then the leader stops cleanly: it gives the lease up, so the other leads at once.
            await asyncio.sleep(1.0)
            old, new = (a, b) if first == a.placements.id else (b, a)
            placed = {w.worker_id: list(w.assigned) for w in workers}
            assert sorted(m for ms in placed.values() for m in ms) == list(MODELS)
            t0 = time.monotonic()
            await old.placements.stop()
            await poll(lambda: _true(new.placements.leading), timeout_s=LEADER_TTL_S)
            took = time.monotonic() - t0
            assert took < LEADER_TTL_S, took
            await asyncio.sleep(1.0)  # the new leader's ticks over the same assignments
            await poll(lambda: _placed(reg_b if new is b else reg_a, MODELS))
            # Nothing moved: the successor carries on from the stored assignments.
            assert {w.worker_id: list(w.assigned) for w in workers} == placed
    finally:
        stop.set()
        await watcher
        await r.aclose()
        await reg_a.close()
        await reg_b.close()
    assert worst == {m: 1 for m in MODELS}, worst


async def test_a_leader_that_dies_is_replaced_within_the_lease(
    start_registry: StartRegistry, token: str, worker_token: str
) -> None:
    a = await start_registry(**FAST)
    b = await start_registry(**FAST)
    reg = Reg(f"127.0.0.1:{b.port}", token, worker_token=worker_token)
    await reg.register("m1")
    w = SimWorker(reg, "w1")
    async with beating(w):
        await poll(lambda: _true(len(leaders(a, b)) == 1))
        old, new = (a, b) if a.placements.leading else (b, a)
        # Fault injection: the leader's loop dies without giving the lease up (as a killed process would).
        task = old.placements._task
        assert task is not None
        old.placements._stopping = True  # (a cancel alone can be lost in Python 3.11's wait_for)
        task.cancel()
        await asyncio.wait({task}, timeout=5)
        assert task.done() and old.placements.leading  # it never gave the lease up
        t0 = time.monotonic()
        await poll(lambda: _true(new.placements.leading), timeout_s=LEADER_TTL_S + 2)
        took = time.monotonic() - t0
        assert took <= LEADER_TTL_S + 0.5, took
        await poll(lambda: _true(w.assigned == ["m1"]))
    await reg.close()


async def test_a_deposed_leaders_write_is_refused(
    start_registry: StartRegistry, token: str, worker_token: str, redis_url: str
) -> None:
    # placement_interval_s is long, so the test drives this replica's ticks by hand.
    server = await start_registry(placement_interval_s=60, leader_ttl_s=30)
    reg = Reg(f"127.0.0.1:{server.port}", token, worker_token=worker_token)
    r: Any = aioredis.Redis.from_url(redis_url)
    try:
        await reg.register("m1")
        w = SimWorker(reg, "w1")
        await w.beat()
        assert await server.placements.step()
        await w.beat()
        assert w.known and w.assigned == ["m1"]
        before = {k: await r.get(k) for k in (assign_key("w1"), redis_key("placement", "model", "m1"))}
        await reg.register("m2")  # a change the next tick would write
        # Fault injection: the lease passes to another replica behind this one's back (its lease ran out
        # while it was paused); it still believes it leads and runs a tick.
        await r.set(LEADER, "registry-successor")
        assert server.placements.leading
        assert await server.placements.tick() is False
        assert not server.placements.leading
        after = {k: await r.get(k) for k in before}
        assert after == before and await r.get(redis_key("placement", "model", "m2")) is None
        # And its next step does not take the lease back while the successor holds it.
        assert await server.placements.step() is False
        assert (await r.get(LEADER)) == b"registry-successor"
    finally:
        await r.aclose()
        await reg.close()


async def _true(value: object) -> object:
    return value


async def _placed(reg: Reg, models: tuple[str, ...]) -> bool:
    resp = await reg.call("ListPlacements", P.ListPlacementsRequest())
    states = {p.scale.model: p.state for p in resp.placements}
    return all(states.get(m) == P.PLACEMENT_STATE_READY for m in models)
