"""Cold starts (issue 22): a call whose model version has no ready worker waits, within its deadline, for a worker
to load it, and a call that cannot be served says the true reason. A real registry and workers (processes) and
in-process gateways.

The promote tests use a fixed-list worker following an alias: the new version warms up for seconds (slow_model,
warmed at several batch sizes), and calls for it wait instead of failing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
import redis

from fovea.client import RegistryClient
from fovea.cluster import Cluster, Service
from fovea.redis_server import RedisServer
from fovea.v1 import model_pb2, registry_pb2
from gateway.config import GatewayConfig
from gateway.server import GatewayServer, build_server
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.gateway.conftest import _next_db, auth, classify_request, image_stub, status_of
from tests.tinymodels import color_model, png, slow_model

SLOW_WARMUP = "1,2,3,4,5,6"  # batch sizes run before a version is ready: seconds, with the promote tests' 3072-wide v2


@dataclass
class Slow:
    cluster: Cluster
    registry: Service
    rc: RegistryClient
    secret: str


@pytest.fixture(scope="module")
def slow(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slow]:
    url = redis_server.url.rsplit("/", 1)[0] + f"/{next(_next_db)}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    cluster = Cluster(tmp_path_factory.mktemp("coldstart"), redis_url=url)
    try:
        reg = cluster.start_registry(port=0)
        rc = RegistryClient(reg.address, cluster.admin_token, timeout_s=30)
        mv = rc.register(slow_model(2048), model_pb2.ModelVersion(name="slow"))
        rc.set_alias("slow", "production", [(mv.version, 100)])
        cluster.start_worker(
            reg.address,
            ["slow"],
            name="fixed",
            FOVEA_WORKER_INTRA_OP_THREADS="1",
            FOVEA_WORKER_HEARTBEAT_INTERVAL_S="0.2",
            FOVEA_WORKER_WARMUP_BATCH_SIZES=SLOW_WARMUP,
        )
        yield Slow(cluster, reg, rc, rc.create_key("infer")[1])
    finally:
        cluster.stop()


@pytest.fixture
async def gateways(slow: Slow) -> AsyncIterator[Any]:
    started: list[GatewayServer] = []

    async def start(**overrides: Any) -> GatewayServer:
        fields: dict[str, Any] = dict(
            port=0,
            registry_address=slow.registry.address,
            registry_token=slow.cluster.gateway_token,
            worker_token=slow.cluster.worker_call_token,
        )
        fields.update(overrides)
        srv = await build_server(GatewayConfig(**fields))
        started.append(srv)
        return srv

    yield start
    for srv in started:
        await srv.stop(0)


def slow_request(version: str = "") -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="slow", model_version=version)
    req.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    req.raw_input_contents.append(np.full(4, 0.25, np.float32).tobytes())
    return req


def stub(gw: GatewayServer) -> tuple[grpc.aio.Channel, pb_grpc.GRPCInferenceServiceStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}")
    return channel, pb_grpc.GRPCInferenceServiceStub(channel)


async def until(check: Any, timeout_s: float = 60.0, what: str = "") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def ready_in_view(gw: GatewayServer, model: str, version: int) -> bool:
    return any(ep.serves(model, version) for ep in gw.gateway.workers.endpoints.values())


def production(gw: GatewayServer, model: str) -> int:
    alias = gw.gateway.versions.aliases.get((model, "production"))
    return alias.targets[0].version if alias is not None else 0


def cold_count(gw: GatewayServer, model: str, outcome: str) -> float:
    for metric in gw.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == "fovea_gateway_cold_start_wait_seconds_count" and sample.labels == {
                "model": model,
                "outcome": outcome,
            }:
                return float(sample.value)
    return 0.0


async def test_calls_after_a_promote_wait_for_the_new_version(
    slow: Slow, gateways: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Promote v2: while the worker warms it up, a call with a long deadline waits and gets v2's answer; one
    with a short deadline gets UNAVAILABLE saying the version is loading; past max_cold_waiters, a call gets
    RESOURCE_EXHAUSTED. Before issue 22 each got 'no healthy worker has slow v2 ready; retry shortly'."""
    caplog.set_level(logging.INFO, logger="gateway.placement")
    gw = await gateways()
    tight = await gateways(max_cold_waiters=1)
    await until(lambda: ready_in_view(gw, "slow", 1) and ready_in_view(tight, "slow", 1), what="slow v1 ready")
    channel, api = stub(gw)
    tight_channel, tight_api = stub(tight)
    md = auth(slow.secret)
    first = await api.ModelInfer(slow_request(), metadata=md, timeout=60)
    assert first.model_version == "1"

    mv = await asyncio.to_thread(slow.rc.register, slow_model(3072), model_pb2.ModelVersion(name="slow"))
    assert mv.version == 2
    await asyncio.to_thread(slow.rc.set_alias, "slow", "production", [(2, 100)])
    await until(lambda: production(gw, "slow") == 2 and production(tight, "slow") == 2, what="the alias move")
    assert not ready_in_view(gw, "slow", 2), "v2 warmed up too fast for this test to mean anything"

    waiting = asyncio.ensure_future(api.ModelInfer(slow_request(), metadata=md, timeout=120))
    held = asyncio.ensure_future(tight_api.ModelInfer(slow_request(), metadata=md, timeout=120))
    await until(lambda: tight.gateway.cold_starts.waiting == 1, 10, "a waiting call on the tight gateway")
    code, msg = await status_of(tight_api.ModelInfer(slow_request(), metadata=md, timeout=60))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_cold_waiters" in msg, (code, msg)

    messages = []
    while True:  # the first may end before the worker's heartbeat listed v2; it warms up for seconds after
        code, msg = await status_of(api.ModelInfer(slow_request(), metadata=md, timeout=2.0))
        assert code == grpc.StatusCode.UNAVAILABLE and "slow v2 " in msg, (code, msg)
        assert msg.endswith("the call's deadline ran out first"), msg
        messages.append(msg)
        if "is loading on fixed-" in msg or len(messages) == 10:
            break
    assert messages[-1].startswith("slow v2 is loading on fixed-") and "(cold start)" in messages[-1], messages

    answer = await waiting
    assert answer.model_version == "2"
    assert (await held).model_version == "2"
    assert cold_count(gw, "slow", "ready") == 1 and cold_count(gw, "slow", "deadline") == len(messages)
    assert any("cold start: slow v2 ready on fixed-" in r.getMessage() for r in caplog.records), caplog.text
    assert gw.gateway.cold_starts.waiting == 0 and not gw.gateway.workers._awaited
    await channel.close()
    await tight_channel.close()


async def test_a_version_no_worker_will_load_fails_at_once(slow: Slow, gateways: Any) -> None:
    """A version no alias points at, on a model only fixed-list workers serve: nobody will load it, so the call
    fails at once with the old message rather than waiting out its deadline (behaviour before issue 22)."""
    gw = await gateways()
    mv = await asyncio.to_thread(slow.rc.register, slow_model(3073), model_pb2.ModelVersion(name="slow"))
    await until(lambda: ready_in_view(gw, "slow", production(gw, "slow") or -1), what="slow ready")
    channel, api = stub(gw)
    code, msg = await status_of(api.ModelInfer(slow_request(str(mv.version)), metadata=auth(slow.secret), timeout=60))
    assert code == grpc.StatusCode.UNAVAILABLE, (code, msg)
    assert msg == f"no healthy worker has slow v{mv.version} ready; retry shortly", msg
    assert gw.gateway.cold_starts.waiting == 0 and cold_count(gw, "slow", "ready") == 0
    await channel.close()


# ---- pool workers and placement ---------------------------------------------------------------------------


@dataclass
class Pool:
    cluster: Cluster
    registry: Service
    rc: RegistryClient
    secret: str


@pytest.fixture(scope="module")
def pool(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    """A registry whose placement loop ticks every 0.2 s and one pool worker (no fixed models) with a small
    memory budget. Models: `cold` and `lazy` (a warm-up of seconds) scaled to zero, `huge` on a pool no worker
    is in; each test adds what it needs."""
    url = redis_server.url.rsplit("/", 1)[0] + f"/{next(_next_db)}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    cluster = Cluster(tmp_path_factory.mktemp("coldpool"), redis_url=url)
    try:
        reg = cluster.start_registry(
            port=0, FOVEA_REGISTRY_PLACEMENT_INTERVAL_S="0.2", FOVEA_REGISTRY_DEFAULT_IDLE_UNLOAD_S="600"
        )
        rc = RegistryClient(reg.address, cluster.admin_token, timeout_s=30)
        for name, artifact in (("cold", color_model()), ("lazy", slow_model(3072)), ("huge", color_model())):
            mv = rc.register(artifact, model_pb2.ModelVersion(name=name))
            rc.set_alias(name, "production", [(mv.version, 100)])
            pool_labels = {"gpu": "h100"} if name == "huge" else {}
            rc.scale(registry_pb2.ModelScale(model=name, replicas=0, min_replicas=0, max_replicas=1, pool=pool_labels))
        cluster.start_worker(
            reg.address,
            [],
            name="pool",
            FOVEA_WORKER_INTRA_OP_THREADS="1",
            FOVEA_WORKER_HEARTBEAT_INTERVAL_S="0.2",
            FOVEA_WORKER_WARMUP_BATCH_SIZES=SLOW_WARMUP,
        )
        yield Pool(cluster, reg, rc, rc.create_key("infer")[1])
    finally:
        cluster.stop()


async def pool_gateway(pool: Pool, gateways: Any, **overrides: Any) -> GatewayServer:
    gw: GatewayServer = await gateways(
        registry_address=pool.registry.address,
        registry_token=pool.cluster.gateway_token,
        worker_token=pool.cluster.worker_call_token,
        **overrides,
    )
    await until(lambda: any(ep.status.pooled for ep in gw.gateway.workers.endpoints.values()), what="the pool")
    return gw


async def test_first_calls_of_a_model_scaled_to_zero_wait_for_its_cold_start(
    pool: Pool, gateways: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """`cold` has no replica; 20 calls at once make one DemandModel (the refresh is set beyond the test), wait
    while the pool worker loads it, and are all answered; the cold start is logged and counted."""
    caplog.set_level(logging.INFO, logger="gateway.placement")
    gw = await pool_gateway(pool, gateways, demand_refresh_s=60)
    assert not ready_in_view(gw, "cold", 1)
    channel, images = image_stub(gw)
    calls = [
        images.Classify(classify_request(png((20, 240, 20)), model="cold"), metadata=auth(pool.secret), timeout=60)
        for _ in range(20)
    ]
    answers = await asyncio.gather(*calls)
    assert {a.results[0].labels[0].label for a in answers} == {"green"}
    assert gw.gateway.cold_starts.demands_sent == 1
    assert cold_count(gw, "cold", "ready") == 20
    assert any("cold start: cold v1 ready on pool-" in r.getMessage() for r in caplog.records), caplog.text
    placements, _ = await asyncio.to_thread(pool.rc.list_placements, "cold")
    assert placements[0].target_replicas == 1 and placements[0].worker_ids, placements  # the demand raised it
    await channel.close()


async def test_a_short_deadline_ends_with_the_model_loading(pool: Pool, gateways: Any) -> None:
    """`lazy` warms up for seconds: a call with a 2 s deadline gets UNAVAILABLE saying why, a patient one its
    answer."""
    gw = await pool_gateway(pool, gateways)
    channel, api = stub(gw)
    md = auth(pool.secret)
    request = slow_request()
    request.model_name = "lazy"
    messages = []
    while True:  # the first may end before the worker listed the version; it is loading for seconds after
        code, msg = await status_of(api.ModelInfer(request, metadata=md, timeout=2.0))
        assert code == grpc.StatusCode.UNAVAILABLE and "lazy v1 " in msg, (code, msg)
        assert msg.endswith("the call's deadline ran out first"), msg
        messages.append(msg)
        if "is loading on pool-" in msg or len(messages) == 10:
            break
    assert messages[-1].startswith("lazy v1 is loading on pool-") and "(cold start)" in messages[-1], messages
    answer = await api.ModelInfer(request, metadata=md, timeout=120)
    assert answer.model_name == "lazy" and answer.model_version == "1"
    await channel.close()


async def test_an_unplaceable_model_fails_at_once_with_the_reason(pool: Pool, gateways: Any) -> None:
    """`huge` belongs on gpu=h100, which no worker carries: FAILED_PRECONDITION with the planner's reason, long
    before the call's deadline."""
    gw = await pool_gateway(pool, gateways)
    channel, images = image_stub(gw)
    call = images.Classify(classify_request(png((20, 240, 20)), model="huge"), metadata=auth(pool.secret), timeout=300)
    code, msg = await asyncio.wait_for(status_of(call), 60)
    assert code == grpc.StatusCode.FAILED_PRECONDITION, (code, msg)
    assert msg.startswith("huge has no replicas and none can be placed: ") and "gpu=h100" in msg, msg
    assert cold_count(gw, "huge", "deadline") == 0 and cold_count(gw, "huge", "unplaceable") == 1
    await channel.close()


async def test_a_version_pool_workers_do_not_load_is_refused_at_once(pool: Pool, gateways: Any) -> None:
    """Pool workers load a model's production alias: a call pinned to another version would wait in vain, so it
    gets FAILED_PRECONDITION saying so."""
    mv = await asyncio.to_thread(pool.rc.register, color_model(bias=0.5), model_pb2.ModelVersion(name="cold"))
    gw = await pool_gateway(pool, gateways)
    channel, images = image_stub(gw)
    request = classify_request(png((20, 240, 20)), model="cold")
    request.version = mv.version
    code, msg = await asyncio.wait_for(status_of(images.Classify(request, metadata=auth(pool.secret), timeout=300)), 60)
    assert code == grpc.StatusCode.FAILED_PRECONDITION, (code, msg)
    assert (
        msg == f"cold v{mv.version} is not served: pool workers load its production alias (v1); promote v2 to serve it"
    )
    assert gw.gateway.cold_starts.waiting == 0 and cold_count(gw, "cold", "deadline") == 0
    await channel.close()


async def test_a_wait_ends_when_the_model_becomes_unplaceable(pool: Pool, gateways: Any) -> None:
    """While a call waits for `drifting` to load, its scale moves it to a pool no worker is in: the renewed demand
    says UNPLACEABLE and the call gets FAILED_PRECONDITION with the reason, long before its deadline."""
    mv = await asyncio.to_thread(pool.rc.register, slow_model(2051), model_pb2.ModelVersion(name="drifting"))
    await asyncio.to_thread(pool.rc.set_alias, "drifting", "production", [(mv.version, 100)])
    await asyncio.to_thread(pool.rc.scale, registry_pb2.ModelScale(model="drifting", replicas=0, max_replicas=1))
    gw = await pool_gateway(pool, gateways)
    channel, api = stub(gw)
    request = slow_request()
    request.model_name = "drifting"
    call = asyncio.ensure_future(status_of(api.ModelInfer(request, metadata=auth(pool.secret), timeout=300)))
    await until(lambda: gw.gateway.cold_starts.waiting == 1, 30, "the call waiting")
    moved = registry_pb2.ModelScale(model="drifting", replicas=0, max_replicas=1, pool={"gpu": "h100"})
    await asyncio.to_thread(pool.rc.scale, moved)
    code, msg = await asyncio.wait_for(call, 60)
    assert code == grpc.StatusCode.FAILED_PRECONDITION, (code, msg)
    assert msg.startswith("drifting has no replicas and none can be placed: ") and "gpu=h100" in msg, msg
    assert cold_count(gw, "drifting", "unplaceable") == 1
    await channel.close()
