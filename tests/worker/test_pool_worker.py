"""Pool workers (issue #22): the models placement assigns are loaded, served, and unloaded when taken away,
on real in-process workers against a real in-process registry.

Most tests apply assignments by hand (Assignments.apply, as a heartbeat answer does) on a registry whose
placement loop is off, so that nothing else assigns; the end-to-end tests (placing=True) let the registry's
placement loop decide, with an in-process gateway in front where calls must not fail."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from pydantic import ValidationError

from fovea.client import RegistryClient
from fovea.v1 import registry_pb2
from gateway.config import GatewayConfig
from gateway.server import build_server as build_gateway
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from registry.config import RegistryConfig
from registry.server import build_server as build_registry
from tests.tinymodels import color_model
from tests.worker.conftest import (
    ADMIN_TOKEN,
    MD,
    REGISTRY_TOKEN,
    TOKEN,
    LocalRegistry,
    StartWorker,
    poll,
    stub,
    tensor_request,
    typed_request,
)
from worker.assignments import Assignments
from worker.config import WorkerConfig
from worker.memory import device_budget, host_budget, machine_bytes, rss_bytes
from worker.server import WorkerServer

POOL = {"unload_delay_s": 1.5}
GATEWAY_TOKEN = "worker-tests-gateway-registry-token"  # the gateway's own, at the registry
placing = pytest.mark.parametrize("registry", [True], indirect=True)
"""Run the registry's placement loop (every 0.2 s) for this test."""


@pytest.fixture
async def registry(
    request: pytest.FixtureRequest, redis_url: str, tmp_path: pathlib.Path
) -> AsyncIterator[LocalRegistry]:
    """The worker tests' registry (it replaces conftest's here), with a gateway token, and its placement
    loop off unless the test is marked `placing`."""
    config = RegistryConfig(
        port=0,
        redis_url=redis_url,
        artifact_dir=tmp_path / "artifacts",
        log_json=False,
        admin_tokens=ADMIN_TOKEN,
        worker_tokens=REGISTRY_TOKEN,
        gateway_tokens=GATEWAY_TOKEN,
        placement=getattr(request, "param", False),
        placement_interval_s=0.2,
    )
    server = await build_registry(config)
    address = f"127.0.0.1:{server.port}"
    client = RegistryClient(address, ADMIN_TOKEN, timeout_s=20)
    yield LocalRegistry(address, client)
    client.close()
    await server.stop(1.0)


def test_pool_is_the_default_exactly_without_models() -> None:
    assert WorkerConfig().pooled
    assert not WorkerConfig(models=["colors"]).pooled
    assert WorkerConfig(models=["colors"], join_pool=True).pooled
    assert not WorkerConfig(join_pool=False).pooled


def test_labels_parse_and_refuse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FOVEA_WORKER_LABELS", " gpu=h100, zone=eu-1 ,")
    config = WorkerConfig()
    assert config.labels == {"gpu": "h100", "zone": "eu-1"}
    assert config.label_map(gpu=False) == {"gpu": "h100", "zone": "eu-1", "device": "cpu"}
    assert config.label_map(gpu=True)["device"] == "gpu"
    bad = {
        "gpu": "KEY=VALUE",
        "Gpu=h100": "invalid name",
        "gpu=H100": "invalid value",
        "device=gpu": "set by the worker",
        ",".join(f"k{i}=v" for i in range(16)): "at most 15",
    }
    for text, message in bad.items():
        monkeypatch.setenv("FOVEA_WORKER_LABELS", text)
        with pytest.raises(ValidationError, match=message):
            WorkerConfig()


def test_budgets(tmp_path: pathlib.Path) -> None:
    cgroup, meminfo = tmp_path / "memory.max", tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       8000000 kB\nMemFree:        100 kB\n")
    cgroup.write_text("max\n")
    assert machine_bytes(cgroup, meminfo) == 8_000_000 * 1024
    cgroup.write_text("4000000000\n")
    assert machine_bytes(cgroup, meminfo) == 4_000_000_000
    assert machine_bytes(tmp_path / "absent", tmp_path / "absent") == 0
    assert host_budget(0, machine=4_000_000_000, rss=200_000_000) == 3_000_000_000
    assert host_budget(0, machine=100, rss=200_000_000) == 0
    assert host_budget(123, machine=4_000_000_000, rss=1) == 123
    assert rss_bytes() > 10_000_000  # this interpreter, with numpy and ONNX Runtime imported
    assert device_budget(0, gpu=False, device_total=10**10) == 0
    assert device_budget(0, gpu=True, device_total=10**10) == 9 * 10**9
    assert device_budget(5, gpu=True, device_total=10**10) == 5


async def test_heartbeat_fields_of_pool_and_fixed_workers(registry: LocalRegistry, start_worker: StartWorker) -> None:
    await registry.publish("colors", color_model())
    fixed = await start_worker(["colors"])
    pool = await start_worker([], labels={"zone": "a"}, memory_budget_bytes=300_000_000)
    assert fixed.assignments is None and pool.assignments is not None
    s = fixed.status()
    assert not s.pooled and dict(s.labels) == {"device": "cpu"} and s.memory_budget_bytes > 0
    [m] = s.models
    assert m.ready and m.memory_bytes >= len(color_model()) and m.requests == 0 and m.queue_depth == 0
    s = pool.status()
    assert s.pooled and dict(s.labels) == {"zone": "a", "device": "cpu"}
    assert s.memory_budget_bytes == 300_000_000 and s.device_memory_budget_bytes == 0 and not s.models


async def follow(ws: WorkerServer, names: list[str]) -> Assignments:
    """Apply an assignment the way a heartbeat answer does."""
    assert ws.assignments is not None
    ws.assignments.apply(names)
    return ws.assignments


async def test_assigned_model_loads_serves_and_counts_calls(registry: LocalRegistry, start_worker: StartWorker) -> None:
    await registry.publish("colors", color_model())
    ws = await start_worker([], **POOL)
    ws.config.heartbeat_interval_s = 60.0  # from the next beat on: only the extra heartbeat can tell the registry
    await asyncio.sleep(0.8)  # past the beat already scheduled (0.5 s apart)
    channel, s = stub(ws.port)
    req = tensor_request("colors", np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.ModelInfer(req, metadata=MD, timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    await follow(ws, ["colors"])
    await poll(lambda: _ready(ws, "colors"), 30)
    for _ in range(5):
        assert (await s.ModelInfer(req, metadata=MD, timeout=10)).model_version == "1"
    [m] = ws.status().models
    assert m.requests == 5 and m.idle_s < 5 and m.memory_bytes >= len(color_model())
    # The registry hears of the new version at once (the extra heartbeat), not only every interval.
    await poll(lambda: _registry_ready(registry, ws, "colors"), 20)
    await channel.close()


async def test_native_and_relayed_calls_count_too(registry: LocalRegistry, start_worker: StartWorker) -> None:
    await registry.publish("colors", color_model())
    ws = await start_worker([], unload_delay_s=1.5)
    await follow(ws, ["colors"])
    await poll(lambda: _ready(ws, "colors"), 30)
    req = tensor_request("colors", np.zeros((1, 3, 8, 8), np.float32))
    channel, s = stub(ws.port)
    for _ in range(4):
        await s.ModelInfer(req, metadata=MD, timeout=10)  # raw tensors: the native front's batcher
    for _ in range(3):
        await s.ModelInfer(typed_request(req), metadata=MD, timeout=10)  # relayed to Python's
    [m] = ws.status().models
    assert m.requests == 7 and m.idle_s < 5 and m.queue_depth == 0
    await channel.close()


async def test_unassigned_model_reports_not_ready_at_once_answers_then_unloads(
    registry: LocalRegistry, start_worker: StartWorker
) -> None:
    await registry.publish("colors", color_model())
    ws = await start_worker([], **POOL)
    await follow(ws, ["colors"])
    await poll(lambda: _ready(ws, "colors"), 30)
    channel, s = stub(ws.port)
    req = tensor_request("colors", np.zeros((1, 3, 8, 8), np.float32))
    failures: list[str] = []
    answered = 0
    stop = asyncio.Event()

    async def client() -> None:
        nonlocal answered
        while not stop.is_set():
            try:
                await s.ModelInfer(req, metadata=MD, timeout=10)
                answered += 1
            except grpc.aio.AioRpcError as exc:
                failures.append(f"{exc.code().name}: {exc.details()}")

    task = asyncio.create_task(client())
    await asyncio.sleep(0.2)
    await follow(ws, [])
    # Not ready in the very next heartbeat (gateways stop routing here), yet still loaded and answering.
    [m] = ws.status().models
    assert not m.ready and ("colors", 1) in ws.manager.loaded
    before = answered
    await asyncio.sleep(0.5)  # well inside unload_delay_s
    stop.set()
    await task
    assert answered > before and not failures
    await poll(lambda: _gone(ws, "colors"), 20)
    assert "colors" not in ws.manager.followed and not ws.status().models
    await channel.close()


async def test_model_assigned_again_while_leaving_is_kept(registry: LocalRegistry, start_worker: StartWorker) -> None:
    await registry.publish("colors", color_model())
    ws = await start_worker([], **POOL)
    await follow(ws, ["colors"])
    await poll(lambda: _ready(ws, "colors"), 30)
    lv = ws.manager.loaded[("colors", 1)]
    await follow(ws, [])
    assert not ws.status().models[0].ready
    await follow(ws, ["colors"])
    await poll(lambda: _ready(ws, "colors"), 10)
    await asyncio.sleep(POOL["unload_delay_s"] + 0.6)  # past the unload it was headed for
    assert ws.manager.loaded.get(("colors", 1)) is lv and ws.status().models[0].ready


async def test_assigned_model_follows_its_production_alias(registry: LocalRegistry, start_worker: StartWorker) -> None:
    await registry.publish("colors", color_model())
    v2 = await registry.publish("colors", color_model(bias=1.0), alias="")
    ws = await start_worker([], **POOL)
    await follow(ws, ["colors"])
    await poll(lambda: _ready(ws, "colors"), 30)
    assert [k for k in ws.manager.loaded] == [("colors", 1)]
    await registry.set_alias("colors", [(v2, 100)])
    await poll(lambda: _gone_version(ws, "colors", 1), 30)
    assert list(ws.manager.loaded) == [("colors", v2)] and ws.status().models[0].ready


async def test_model_that_fails_to_load_backs_off(registry: LocalRegistry, start_worker: StartWorker) -> None:
    ws = await start_worker([], **POOL, load_retry_s=60.0)
    a = await follow(ws, ["absent"])
    await poll(lambda: _async(lambda: "absent" in a.errors), 20)
    assert "absent" in a.errors["absent"] or "not found" in a.errors["absent"].lower()
    a.apply(["absent"])  # the next heartbeat answer: no new try before the back-off ends
    assert "absent" not in a._tasks
    a.apply([])
    assert not a.errors and "absent" not in ws.manager.followed


async def test_fixed_models_are_never_taken_away(registry: LocalRegistry, start_worker: StartWorker) -> None:
    await registry.publish("colors", color_model())
    ws = await start_worker(["colors"], join_pool=True, **POOL)
    assert ws.status().pooled and ws.assignments is not None
    await follow(ws, [])
    await asyncio.sleep(0.3)
    assert ws.status().models[0].ready and not ws.manager.loaded[("colors", 1)].leaving


async def _async(check: object) -> bool:
    assert callable(check)
    return bool(check())


async def _ready(ws: WorkerServer, name: str) -> bool:
    return any(m.name == name and m.ready for m in ws.status().models)


async def _gone(ws: WorkerServer, name: str) -> bool:
    return not any(k[0] == name for k in ws.manager.loaded)


async def _gone_version(ws: WorkerServer, name: str, version: int) -> bool:
    return (name, version) not in ws.manager.loaded


async def _registry_ready(registry: LocalRegistry, ws: WorkerServer, name: str) -> bool:
    workers = await asyncio.to_thread(registry.client.list_workers)
    return any(
        w.worker_id == ws.config.worker_id and any(m.name == name and m.ready for m in w.models) for w in workers
    )


# ---- end to end: the registry's placement loop assigns ----------------------------------------------


@placing
async def test_published_model_is_served_by_a_pool_worker_without_restart(
    registry: LocalRegistry, start_worker: StartWorker
) -> None:
    ws = await start_worker([], **POOL)
    await registry.publish("colors", color_model())
    channel, s = stub(ws.port)
    req = tensor_request("colors", np.zeros((1, 3, 8, 8), np.float32))

    async def answers() -> bool:
        try:
            return (await s.ModelInfer(req, metadata=MD, timeout=10)).model_version == "1"
        except grpc.aio.AioRpcError:
            return False

    await poll(answers, 30, 0.1)
    placements, _ = await asyncio.to_thread(registry.client.list_placements, "colors")
    [p] = placements
    assert list(p.worker_ids) == [ws.config.worker_id]
    await poll(lambda: _placement_ready(registry, "colors", [ws.config.worker_id]), 20)
    # Scaled to zero with a short idle time: unassigned once idle, then unloaded.
    scale = registry_pb2.ModelScale(model="colors", replicas=0, min_replicas=0, max_replicas=1, idle_unload_s=1.0)
    await asyncio.to_thread(registry.client.scale, scale)
    await poll(lambda: _gone(ws, "colors"), 30)
    placements, _ = await asyncio.to_thread(registry.client.list_placements, "colors")
    [p] = placements
    assert p.target_replicas == 0 and not p.worker_ids
    await channel.close()


@placing
async def test_model_moved_between_workers_loses_no_call(registry: LocalRegistry, start_worker: StartWorker) -> None:
    """`colors` sits on pool zone=a; moved to zone=b while a client calls it through a gateway in a loop, the
    old worker reports it not ready at once but answers for unload_delay_s: no call fails."""
    # Two workers in one process: the default id (host-pid) would be the same.
    a = await start_worker([], labels={"zone": "a"}, worker_id="pool-a", **POOL)
    b = await start_worker([], labels={"zone": "b"}, worker_id="pool-b", **POOL)
    await registry.publish("colors", color_model())
    scale = registry_pb2.ModelScale(model="colors", replicas=1, pool={"zone": "a"})
    await asyncio.to_thread(registry.client.scale, scale)
    await poll(lambda: _ready(a, "colors"), 30)
    _, secret = await asyncio.to_thread(registry.client.create_key, "infer")
    gw = await build_gateway(
        GatewayConfig(
            port=0,
            registry_address=registry.address,
            registry_token=GATEWAY_TOKEN,
            worker_token=TOKEN,
            log_json=False,
        )
    )
    channel, s = stub(gw.port)
    md = (("authorization", f"Bearer {secret}"),)
    req = tensor_request("colors", np.zeros((1, 3, 8, 8), np.float32))
    answered: dict[str, int] = {}
    failures: list[str] = []
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            try:
                await s.ModelInfer(req, metadata=md, timeout=30)
                answered["calls"] = answered.get("calls", 0) + 1
            except grpc.aio.AioRpcError as exc:
                failures.append(f"{exc.code().name}: {exc.details()}")
                await asyncio.sleep(0.05)

    try:
        await poll(lambda: _one_call(s, req, md), 30, 0.1)  # the gateway has heard of worker a
        tasks = [asyncio.create_task(client()) for _ in range(2)]
        await poll(lambda: _async(lambda: answered.get("calls", 0) > 20), 30)
        scale = registry_pb2.ModelScale(model="colors", replicas=1, pool={"zone": "b"})
        await asyncio.to_thread(registry.client.scale, scale)
        await poll(lambda: _ready(b, "colors"), 30)
        await poll(lambda: _gone(a, "colors"), 30)
        before = answered["calls"]
        await poll(lambda: _async(lambda: answered["calls"] > before + 20), 30)  # now all on b
        stop.set()
        await asyncio.gather(*tasks)
    finally:
        stop.set()
        await channel.close()
        await gw.stop(0)
    assert not failures, failures[:5]
    assert b.status().models[0].requests > 20  # the calls after the move went to b


async def _one_call(
    s: pb_grpc.GRPCInferenceServiceStub, req: pb.ModelInferRequest, md: tuple[tuple[str, str], ...]
) -> bool:
    try:
        await s.ModelInfer(req, metadata=md, timeout=10)
    except grpc.aio.AioRpcError:
        return False
    return True


async def _placement_ready(registry: LocalRegistry, name: str, workers: list[str]) -> bool:
    placements, _ = await asyncio.to_thread(registry.client.list_placements, name)
    [p] = placements
    return sorted(p.ready_worker_ids) == sorted(workers) and p.state == registry_pb2.PLACEMENT_STATE_READY
