"""Acceptance of the worker tier against real processes (registry, worker) via fovea.cluster.Cluster:
batching limits, full queues, deadlines, bad inputs and bombs, and alias moves under load.

Every test calls the worker's one port: raw tensors are answered by its native front (C++), encoded images
are relayed to its Python server."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from fovea.client import RegistryClient
from fovea.cluster import Cluster
from fovea.redis_server import RedisServer, free_port
from fovea.v1 import model_pb2
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.tinymodels import color_model, png
from tests.worker.conftest import busy_input, output_array, poll, stub, tensor_request
from tests.worker.slowmodels import bomb_png, busy_model

MAX_BATCH = 8
MAX_QUEUE = 16


@dataclass
class Stack:
    cluster: Cluster
    rc: RegistryClient
    port: int
    metrics_url: str
    md: tuple[tuple[str, str], ...]

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    client.close()
    cluster = Cluster(tmp_path_factory.mktemp("worker-acceptance"), redis_url=redis_server.url)
    try:
        reg = cluster.start_registry()
        rc = RegistryClient(reg.address, cluster.admin_token, timeout_s=30)
        for name, model in (("busy", busy_model()), ("colors", color_model()), ("switch", busy_model(scale=1.0))):
            mv = rc.register(model, model_pb2.ModelVersion(name=name))
            rc.set_alias(name, "production", [(mv.version, 100)])
        metrics_port = free_port()
        worker = cluster.start_worker(
            reg.address,
            ["busy", "colors", "switch"],
            FOVEA_WORKER_PROVIDERS="CPUExecutionProvider",
            FOVEA_WORKER_INTRA_OP_THREADS="1",
            FOVEA_WORKER_MAX_BATCH_SIZE=str(MAX_BATCH),
            FOVEA_WORKER_MAX_QUEUE_LEN=str(MAX_QUEUE),
            FOVEA_WORKER_MAX_QUEUE_DELAY_US="2000",
            FOVEA_WORKER_METRICS_PORT=str(metrics_port),
            FOVEA_WORKER_UNLOAD_DELAY_S="1",
            FOVEA_WORKER_LOG_JSON="false",
        )
        port = int(worker.address.rsplit(":", 1)[1])
        md = (("authorization", f"Bearer {cluster.worker_call_token}"),)
        yield Stack(cluster, rc, port, f"http://127.0.0.1:{metrics_port}/metrics", md)
        rc.close()
    finally:
        cluster.stop()


async def _ok(s: Stack, stub_: pb_grpc.GRPCInferenceServiceStub) -> None:
    """The worker still serves: a plain request answers correctly."""
    resp = await stub_.ModelInfer(tensor_request("busy", busy_input(1, rows=2, tag=5)), metadata=s.md, timeout=30)
    np.testing.assert_allclose(output_array(resp)[:, 1], [10.0, 12.0])


async def test_batches_fill_up_to_max_batch_size_and_never_exceed_it(stack: Stack) -> None:
    before = stack.sample("fovea_worker_batch_size_count", model="busy", version="1")
    channel, s = stub(stack.port)

    async def one(i: int, rows: int) -> None:
        x = busy_input(300, rows=rows, tag=100 * i)
        resp = await s.ModelInfer(tensor_request("busy", x), metadata=stack.md, timeout=60)
        # Outputs come back split exactly: each request gets its own rows.
        np.testing.assert_allclose(output_array(resp)[:, 1], 2 * x[:, 1])

    # Waves of concurrent single-sample requests, then of 3-sample ones (8 // 3: batches of at most 6).
    for _ in range(3):
        await asyncio.gather(*(one(i, 1) for i in range(MAX_QUEUE)))
    for _ in range(2):
        await asyncio.gather(*(one(i, 3) for i in range(MAX_QUEUE // 2)))
    m = stack.metrics()

    def bucket(le: float) -> float:
        key = (
            "fovea_worker_batch_size_bucket",
            tuple(sorted({"le": str(float(le)), "model": "busy", "version": "1"}.items())),
        )
        return m[key]

    count = m[("fovea_worker_batch_size_count", (("model", "busy"), ("version", "1")))]
    assert count > before
    assert bucket(MAX_BATCH) == count, "a batch was larger than max_batch_size"
    assert bucket(MAX_BATCH - 1) < count, "no batch reached max_batch_size under concurrent load"
    await _ok(stack, s)
    await channel.close()


async def test_full_queue_answers_resource_exhausted_at_once(stack: Stack) -> None:
    channel, s = stub(stack.port)
    # Hold the single model instance busy with real compute, then overflow its queue.
    blocker = asyncio.ensure_future(
        s.ModelInfer(tensor_request("busy", busy_input(40_000)), metadata=stack.md, timeout=60)
    )
    await poll(lambda: _depth_or_compute(stack), timeout_s=20, every_s=0.01)
    calls = [
        s.ModelInfer(tensor_request("busy", busy_input(1, tag=i)), metadata=stack.md, timeout=60)
        for i in range(3 * MAX_QUEUE)
    ]
    t0 = time.perf_counter()
    results = await asyncio.gather(*calls, return_exceptions=True)
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert refused and all(r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for r in refused)
    assert "queue" in refused[0].details() and "full" in refused[0].details()
    assert len(refused) >= MAX_QUEUE  # at most MAX_QUEUE (+1 being collected) could wait
    assert not blocker.done() or time.perf_counter() - t0 < 60
    await blocker
    await _ok(stack, s)
    await channel.close()


async def _depth_or_compute(stack: Stack) -> bool:
    """True once the busy model's instance has taken the blocker (queue empty, a batch running)."""
    return await asyncio.to_thread(lambda: stack.sample("fovea_worker_in_flight") >= 1)


async def test_expired_deadline_is_dropped_before_compute(stack: Stack) -> None:
    channel, s = stub(stack.port)
    batches = stack.sample("fovea_worker_batch_size_count", model="busy", version="1")
    expired = sum(
        stack.sample("fovea_worker_dropped_total", model="busy", version="1", reason=r)
        for r in ("expired", "cancelled")
    )
    blocker = asyncio.ensure_future(
        s.ModelInfer(tensor_request("busy", busy_input(40_000)), metadata=stack.md, timeout=60)
    )
    await poll(lambda: _depth_or_compute(stack), timeout_s=20, every_s=0.01)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.ModelInfer(tensor_request("busy", busy_input(1, tag=7)), metadata=stack.md, timeout=0.05)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await blocker
    await poll(
        lambda: asyncio.to_thread(
            lambda: (
                sum(
                    stack.sample("fovea_worker_dropped_total", model="busy", version="1", reason=r)
                    for r in ("expired", "cancelled")
                )
                == expired + 1
            )
        ),
        timeout_s=20,
    )
    # Only the blocker was computed.
    assert stack.sample("fovea_worker_batch_size_count", model="busy", version="1") == batches + 1
    await _ok(stack, s)
    await channel.close()


async def test_bad_tensors_and_images_are_invalid_argument(stack: Stack) -> None:
    channel, s = stub(stack.port)
    good = busy_input(1)
    wrong_shape = tensor_request("busy", np.zeros((1, 5), np.float32))
    wrong_rank = tensor_request("busy", np.zeros((4,), np.float32))
    wrong_dtype = tensor_request("busy", good.astype(np.float64), datatype="FP64")
    short_bytes = tensor_request("busy", good)
    short_bytes.raw_input_contents[0] = short_bytes.raw_input_contents[0][:-4]
    huge_claim = tensor_request("busy", good)
    huge_claim.inputs[0].shape[:] = [1 << 40, 4]  # refused before anything is allocated
    bomb = pb.ModelInferRequest(model_name="colors")
    bomb.inputs.add(name="input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(bomb_png())
    garbage = pb.ModelInferRequest(model_name="colors")
    garbage.inputs.add(name="input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"\x89PNG nope")
    cases = {
        "shape": wrong_shape,
        "rank": wrong_rank,
        "dtype": wrong_dtype,
        "bytes": short_bytes,
        "batch": huge_claim,
        "pixels": bomb,
        "image": garbage,
    }
    for what, req in cases.items():
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.ModelInfer(req, metadata=stack.md, timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (what, err.value.details())
        await _ok(stack, s)
    image = pb.ModelInferRequest(model_name="colors")
    image.inputs.add(name="input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(png((200, 0, 0)))
    assert output_array(await s.ModelInfer(image, metadata=stack.md, timeout=30)).argmax() == 0
    await channel.close()


async def test_moving_production_under_load_fails_nothing_and_switches_within_2s(stack: Stack) -> None:
    v2 = (
        await asyncio.to_thread(stack.rc.register, busy_model(scale=2.0), model_pb2.ModelVersion(name="switch"))
    ).version
    channel, s = stub(stack.port)
    seen: list[tuple[float, str, float]] = []  # (time answered, version, output scale)
    errors: list[grpc.aio.AioRpcError] = []
    stop = asyncio.Event()

    async def client(i: int) -> None:
        while not stop.is_set():
            try:
                resp = await s.ModelInfer(
                    tensor_request("switch", busy_input(50, tag=1.0)), metadata=stack.md, timeout=30
                )
                seen.append((time.monotonic(), resp.model_version, float(output_array(resp)[0, 1])))
            except grpc.aio.AioRpcError as exc:
                errors.append(exc)

    clients = [asyncio.ensure_future(client(i)) for i in range(4)]
    await asyncio.sleep(1.0)
    moved = time.monotonic()
    await asyncio.to_thread(stack.rc.set_alias, "switch", "production", [(v2, 100)])
    await asyncio.sleep(3.5)  # past the 2 s target and past the old version's unload
    stop.set()
    await asyncio.gather(*clients)
    assert not errors, [e.details() for e in errors[:3]]
    assert any(v == "1" for t, v, _ in seen if t < moved)
    late = [(v, scale) for t, v, scale in seen if t > moved + 2.0]
    assert late and all(v == str(v2) and scale == 2.0 for v, scale in late)
    # Canary: two targets; both versions answer.
    await asyncio.to_thread(stack.rc.set_alias, "switch", "production", [(1, 50), (v2, 50)])
    versions: set[str] = set()

    async def canary_seen() -> bool:
        resp = await s.ModelInfer(tensor_request("switch", busy_input(1)), metadata=stack.md, timeout=30)
        versions.add(resp.model_version)
        return versions == {"1", str(v2)}

    await poll(canary_seen, timeout_s=30, every_s=0.01)
    await channel.close()
