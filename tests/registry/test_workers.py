"""Worker health: heartbeats, expiry within TTL + 1 s, the worker watch stream; and a real worker process."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TypedDict

import grpc

from fovea.client import RegistryClient
from fovea.cluster import Cluster
from fovea.v1 import model_pb2, registry_pb2
from tests.registry.conftest import StartRegistry
from tests.registry.helpers import Reg, Watch, poll, status_of
from tests.tinymodels import color_model

TTL_S = 1.0


async def _beat_forever(reg: Reg, worker_id: str, models: tuple[tuple[str, int], ...], every_s: float) -> None:
    while True:
        await reg.heartbeat(worker_id, models)
        await asyncio.sleep(every_s)


async def test_worker_whose_heartbeats_stop_leaves_within_ttl_plus_one_second(
    start_registry: StartRegistry, token: str, worker_token: str
) -> None:
    """Acceptance 5, with heartbeats sent over the real RPC."""
    server = await start_registry(heartbeat_ttl_s=TTL_S)
    reg = Reg(f"127.0.0.1:{server.port}", token, worker_token=worker_token)
    assert await reg.heartbeat("w-stops", (("colors", 1),)) == TTL_S
    keeper = asyncio.create_task(_beat_forever(reg, "w-keeps", (("colors", 1),), 0.3))
    # Wait for both: the keeper's first beat may land after w-stops is already listed.
    await poll(lambda: _both_listed(reg), timeout_s=5)
    watch = Watch(reg.stub.WatchWorkers(registry_pb2.WatchWorkersRequest(), metadata=reg.md))
    _, snap = await watch.next()
    assert snap.snapshot and sorted(w.worker_id for w in snap.workers) == ["w-keeps", "w-stops"]
    assert all(w.device.kind == "CPU" and w.updated_at.seconds > 0 for w in snap.workers)

    sent = time.monotonic()
    await reg.heartbeat("w-stops", (("colors", 1),))
    answered = time.monotonic()
    gone_from_list = await poll(lambda: _gone(reg, "w-stops"), timeout_s=TTL_S + 5, every_s=0.02)
    told_at, event = await watch.until(lambda e: "w-stops" in e.removed_worker_ids, timeout_s=TTL_S + 5)
    assert gone_from_list - sent <= TTL_S + 1.0, gone_from_list - sent
    assert told_at - sent <= TTL_S + 1.0, told_at - sent
    assert gone_from_list - answered >= TTL_S - 0.1  # and not before its TTL ran out
    assert await _ids(reg, "colors") == ["w-keeps"]  # the live worker stayed
    keeper.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await keeper
    watch.close()
    await reg.close()


async def _both_listed(reg: Reg) -> bool:
    return sorted(await _ids(reg, "colors")) == ["w-keeps", "w-stops"]


async def _ids(reg: Reg, model: str = "", ready_only: bool = True) -> list[str]:
    resp = await reg.call("ListWorkers", registry_pb2.ListWorkersRequest(model=model, ready_only=ready_only))
    return [w.worker_id for w in resp.workers]


async def _gone(reg: Reg, worker_id: str) -> float:
    return 0.0 if worker_id in await _ids(reg, "colors") else time.monotonic()


async def test_list_workers_filters_by_model_version_and_readiness(reg: Reg) -> None:
    await reg.heartbeat("a", (("colors", 1),))
    await reg.heartbeat("b", (("colors", 2), ("digits", 1)))
    await reg.heartbeat("c", (("colors", 1),), state=registry_pb2.WORKER_STATE_DRAINING)
    status = registry_pb2.WorkerStatus(
        worker_id="d",
        address="127.0.0.1:7",
        state=registry_pb2.WORKER_STATE_READY,
        models=[registry_pb2.LoadedModel(name="colors", version=1, ready=False)],
    )
    await reg.call("Heartbeat", registry_pb2.HeartbeatRequest(status=status))
    assert await _ids(reg, ready_only=False) == ["a", "b", "c", "d"]
    assert await _ids(reg, ready_only=True) == ["a", "b", "d"]
    assert await _ids(reg, "colors", ready_only=True) == ["a", "b"]
    assert await _ids(reg, "colors", ready_only=False) == ["a", "b", "c", "d"]
    resp = await reg.call("ListWorkers", registry_pb2.ListWorkersRequest(model="colors", version=2, ready_only=True))
    assert [w.worker_id for w in resp.workers] == ["b"]
    assert await _ids(reg, "digits") == ["b"]


async def test_watch_workers_reports_joins_and_state_changes(reg: Reg) -> None:
    watch = Watch(reg.stub.WatchWorkers(registry_pb2.WatchWorkersRequest(), metadata=reg.md))
    _, snap = await watch.next()
    assert snap.snapshot and not snap.workers
    t0 = time.monotonic()
    await reg.heartbeat("w1", (("colors", 1),), state=registry_pb2.WORKER_STATE_STARTING)
    at, event = await watch.until(lambda e: bool(e.workers))
    assert event.workers[0].state == registry_pb2.WORKER_STATE_STARTING and at - t0 < 1.0
    await reg.heartbeat("w1", (("colors", 1),))  # now ready
    _, event = await watch.until(lambda e: bool(e.workers))
    assert event.workers[0].state == registry_pb2.WORKER_STATE_READY
    watch.close()


class _StatusFields(TypedDict, total=False):
    """Some of a WorkerStatus's fields, as keyword arguments."""

    worker_id: str
    address: str
    state: registry_pb2.WorkerState
    models: list[registry_pb2.LoadedModel]
    device: registry_pb2.Device


async def test_bad_heartbeats_are_invalid_argument(reg: Reg) -> None:
    base: _StatusFields = dict(worker_id="w", address="127.0.0.1:1", state=registry_pb2.WORKER_STATE_READY)
    bad: list[tuple[_StatusFields, str]] = [
        ({"address": ""}, "host:port address"),
        ({"state": registry_pb2.WORKER_STATE_UNSPECIFIED}, "needs a state"),
        ({"models": [registry_pb2.LoadedModel(name="colors", version=0)]}, "needs a version"),
        ({"device": registry_pb2.Device(kind="x" * 65)}, "device kind"),
    ]
    for change, expected in bad:
        fields: _StatusFields = {**base, **change}
        code, msg = await status_of(
            reg.call("Heartbeat", registry_pb2.HeartbeatRequest(status=registry_pb2.WorkerStatus(**fields)))
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and expected in msg, (change, msg)
    assert await _ids(reg, ready_only=False) == []


def test_killed_worker_process_leaves_the_healthy_list(cluster: Cluster) -> None:
    """Acceptance 5 with a real worker process, killed with SIGKILL so it cannot say goodbye."""
    registry = cluster.start_registry(FOVEA_REGISTRY_HEARTBEAT_TTL_S=str(TTL_S))
    rc = RegistryClient(registry.address, cluster.admin_token, timeout_s=10)
    mv = rc.register(color_model(), model_pb2.ModelVersion(name="colors"))
    rc.set_alias("colors", "production", [(mv.version, 100)])
    worker = cluster.start_worker(registry.address, ["colors"], FOVEA_WORKER_HEARTBEAT_INTERVAL_S="0.2")
    deadline = time.monotonic() + 60
    while not rc.list_workers("colors", ready_only=True):
        assert time.monotonic() < deadline, worker.log_path.read_text()[-2000:]
        time.sleep(0.05)
    worker.kill()
    killed = time.monotonic()
    # Its last heartbeat was at most one interval (0.2 s) before the kill, so TTL + 0.8 s after
    # the kill is within TTL + 1 s of the last heartbeat.
    while rc.list_workers("colors", ready_only=True):
        assert time.monotonic() - killed <= TTL_S + 0.8, "worker still listed TTL + 1 s after its last heartbeat"
        time.sleep(0.02)
    rc.close()
