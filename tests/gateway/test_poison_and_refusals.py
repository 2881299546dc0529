"""Issue 18 on the gateway's one port, on both of its paths: malformed ModelInfer calls are refused by the gateway
itself (fix 1), and a call that kills its worker is not retried on another (fix 2). The front answers calls of
keys without rate limits itself ("native") and relays those of keys with rate limits to the Python server, which
routes them ("relayed"); each test runs on both, through the same port. Behind the gateway are fault-injection stand-ins
(tests/gateway/fault_worker.py), registered through the registry's real Heartbeat: a worker that dies on the
first call it receives, and a healthy one that records every call it receives."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
import numpy as np
import pytest
import redis

from fovea.cluster import Service
from fovea.redis_server import RedisServer
from fovea.registry_link import RegistryLink
from fovea.v1 import model_pb2
from gateway.config import GatewayConfig
from gateway.server import GatewayServer, build_server
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.gateway.conftest import Stack, auth, start_stack, status_of
from tests.gateway.fault_worker import CountingWorker, heartbeat_forever, status
from tests.tinymodels import identity_model


@pytest.fixture(scope="module")
def registry(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A registry with no real workers: only the stand-ins serve the models here."""
    url = redis_server.url.rsplit("/", 1)[0] + "/13"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    stack = start_stack(tmp_path_factory.mktemp("poison"), url, n_workers=0)
    yield stack
    stack.cluster.stop()


def register(stack: Stack, model: str) -> int:
    mv = stack.rc.register(identity_model(), model_pb2.ModelVersion(name=model))
    stack.rc.set_alias(model, "production", [(mv.version, 100)])
    return int(mv.version)


def start_dying_worker(stack: Stack) -> Service:
    """Fault injection: a process that os._exit()s on the first ModelInfer it receives."""
    return stack.cluster.start(
        "dying-worker", "tests.gateway.fault_worker", {}, argv=[sys.executable, "-m", "tests.gateway.fault_worker"]
    )


async def gateway_seeing(stack: Stack, model: str, workers: int, **overrides: Any) -> GatewayServer:
    gw = await build_server(
        GatewayConfig(
            port=0,
            registry_address=stack.registry.address,
            registry_token=stack.cluster.gateway_token,
            worker_token=stack.cluster.worker_call_token,
            log_json=True,
            **overrides,
        )
    )
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while loop.time() < deadline:
        listed = [ep for ep in gw.gateway.workers.endpoints.values() if any(m.name == model for m in ep.status.models)]
        if len(listed) == workers and gw.native is not None and len(gw.native.routes.workers_of(model)) == workers:
            if gw.native.routes.has_alias(model):
                return gw
        await asyncio.sleep(0.05)
    await gw.stop(0)
    raise AssertionError(f"the gateway never saw {workers} workers with {model}")


StandIns = Callable[[str, int, list[tuple[str, str, int]]], Awaitable[None]]
"""start(model, version, [(worker_id, address, queue_depth)]): heartbeats for stand-in workers."""


@pytest.fixture
async def stand_ins(registry: Stack) -> AsyncIterator[StandIns]:
    """start(model, [(worker_id, address, queue_depth)]) keeps the stand-ins listed until the test ends."""
    link = RegistryLink(registry.registry.address, registry.cluster.worker_token)
    beats: list[asyncio.Task[None]] = []

    async def start(model: str, version: int, workers: list[tuple[str, str, int]]) -> None:
        statuses = [status(wid, address, model, version, depth) for wid, address, depth in workers]
        for st in statuses:
            await link.heartbeat(st)
        beats.append(asyncio.create_task(heartbeat_forever(link, statuses)))

    yield start
    for beat in beats:
        beat.cancel()
    await asyncio.gather(*beats, return_exceptions=True)
    await link.close()


def tensor_request(model: str, k: int | None = None) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, id="r1")
    req.inputs.add(name="input", datatype="FP32", shape=[2, 4])
    req.raw_input_contents.append(np.arange(8, dtype=np.float32).tobytes())
    if k is not None:
        req.outputs.add(name="logits").parameters["classification"].int64_param = k
    return req


PATHS = ["native", "relayed"]


def stub_for(gw: GatewayServer) -> tuple[grpc.aio.Channel, pb_grpc.GRPCInferenceServiceStub]:
    """A client of the gateway's one public port."""
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}")
    return channel, pb_grpc.GRPCInferenceServiceStub(channel)


def key_for(stack: Stack, path: str) -> str:
    """A key whose calls take the path: no rate limits (the front routes them) or a limit never reached (the
    front relays them to the Python server, which charges and routes them)."""
    return stack.key() if path == "native" else stack.key(rate_limit_rps=10_000.0)


def retries(gw: GatewayServer, path: str) -> int:
    """Calls retried on another worker: the front retries on both paths (it routes what Python admits)."""
    return int(gw.native.counts()["retries"])  # type: ignore[union-attr]


def native_calls(gw: GatewayServer) -> int:
    return int(gw.native.counts()["native"])  # type: ignore[union-attr]


def python_calls(gw: GatewayServer) -> int:
    """Calls the front relayed to the Python server."""
    return int(gw.native.counts()["python"])  # type: ignore[union-attr]


async def stream_refusal(stub: pb_grpc.GRPCInferenceServiceStub, request: pb.ModelInferRequest, secret: str) -> str:
    """The error_message of the one answer a ModelStreamInfer of this request gets (the stream itself succeeds)."""
    call = stub.ModelStreamInfer(iter([request]), metadata=auth(secret), timeout=10)
    answers = [answer async for answer in call]
    assert len(answers) == 1 and not answers[0].HasField("infer_response"), answers
    return answers[0].error_message


@pytest.mark.parametrize("path", PATHS)
async def test_a_call_that_kills_its_worker_is_not_retried_on_another(
    registry: Stack, stand_ins: StandIns, path: str
) -> None:
    """The dying worker looks idle and the healthy one busy, so the gateway sends the call to the dying one
    first. Its connection drops with the call in flight: the caller gets UNAVAILABLE saying so, and the healthy
    worker never sees the call. The next call meets a refused connection (the dead worker is still listed as
    ready), which it may retry: the healthy worker answers it."""
    model = f"poison-{path}"
    version = await asyncio.to_thread(register, registry, model)
    dying = await asyncio.to_thread(start_dying_worker, registry)
    healthy = await CountingWorker().start()
    await stand_ins(
        model, version, [(f"dying-{path}", dying.address, 0), (f"healthy-{path}", f"127.0.0.1:{healthy.port}", 100)]
    )
    gw = await gateway_seeing(registry, model, 2)
    secret = await asyncio.to_thread(key_for, registry, path)
    channel, stub = stub_for(gw)
    try:
        code, msg = await status_of(stub.ModelInfer(tensor_request(model), metadata=auth(secret), timeout=10))
        assert code == grpc.StatusCode.UNAVAILABLE, (code, msg)
        assert f"worker at {dying.address} dropped the connection while running this call" in msg, msg
        assert "not retried because it may have caused the failure" in msg, msg
        assert await asyncio.to_thread(dying.proc.wait, 10) == 3  # it died of that call
        assert healthy.received == [], "the call that killed one worker was sent to a second"
        assert retries(gw, path) == 0
        resp = await stub.ModelInfer(tensor_request(model), metadata=auth(secret), timeout=10)
        assert resp.id == "r1" and len(healthy.received) == 1
        assert retries(gw, path) == 1  # the refused connection, retried on the healthy worker
        assert native_calls(gw) == (2 if path == "native" else 0)  # both ran in C++, or both in Python
    finally:
        await channel.close()
        await gw.stop(0)
        await healthy.stop()


@pytest.mark.parametrize("path", PATHS)
async def test_a_call_a_worker_refused_unserved_is_retried_on_another(
    registry: Stack, stand_ins: StandIns, path: str
) -> None:
    """A worker's deliberate UNAVAILABLE with `fovea-unserved: 1` (it never ran the call) may go to another."""
    model = f"refused-{path}"
    version = await asyncio.to_thread(register, registry, model)
    refusing, healthy = await CountingWorker(refuse=True).start(), await CountingWorker().start()
    await stand_ins(
        model,
        version,
        [(f"refusing-{path}", f"127.0.0.1:{refusing.port}", 0), (f"ok-{path}", f"127.0.0.1:{healthy.port}", 100)],
    )
    gw = await gateway_seeing(registry, model, 2)
    secret = await asyncio.to_thread(key_for, registry, path)
    channel, stub = stub_for(gw)
    try:
        resp = await stub.ModelInfer(tensor_request(model), metadata=auth(secret), timeout=10)
        assert resp.id == "r1"
        assert (len(refusing.received), len(healthy.received), retries(gw, path)) == (1, 1, 1)
        assert native_calls(gw) == (1 if path == "native" else 0)
    finally:
        await channel.close()
        await gw.stop(0)
        await refusing.stop()
        await healthy.stop()


K_RANGE = "expected 1 to 100"
# (case, change to a valid request, the gateway's message): one table for every way a ModelInfer reaches the one
# port, whose answers must be the same word for word: the front refuses the calls of a key it admits itself, the
# Python server a limited key's calls and every stream's, both with the front's checks (fg_check_infer).
REFUSALS: list[tuple[str, Callable[[pb.ModelInferRequest], object], str]] = [
    ("k = 2^31", lambda r: _k(r, 2**31), f"output 'logits': classification asks for 2147483648 classes; {K_RANGE}"),
    ("k = 2^63-1", lambda r: _k(r, 2**63 - 1), f"classification asks for 9223372036854775807 classes; {K_RANGE}"),
    ("k = 0", lambda r: _k(r, 0), f"output 'logits': classification asks for 0 classes; {K_RANGE}"),
    ("k = -1", lambda r: _k(r, -1), f"output 'logits': classification asks for -1 classes; {K_RANGE}"),
    ("k = 101", lambda r: _k(r, 101), f"classification asks for 101 classes; {K_RANGE}"),
    (
        "k as a string",
        lambda r: _k_text(r),
        "the classification parameter must be an int64_param",
    ),
    ("negative dimension", lambda r: _shape(r, [-1, 4]), "input 'input' has a negative dimension in its shape [-1, 4]"),
    ("rank 9", lambda r: _shape(r, [1] * 9), "input 'input' has 9 dimensions; expected 1 to 8"),
    ("rank 0", lambda r: _shape(r, []), "input 'input' has 0 dimensions; expected 1 to 8"),
    ("overflowing shape", lambda r: _shape(r, [2**40, 2**40]), "input 'input' has too many elements in its shape"),
    ("unknown datatype", lambda r: setattr(r.inputs[0], "datatype", "FP128"), "unknown datatype 'FP128'"),
    (
        "raw size",
        lambda r: _shape(r, [3, 4]),
        "input 'input' has 32 bytes of raw contents; shape [3, 4] of FP32 needs 48",
    ),
    ("raw count", lambda r: r.raw_input_contents.append(b"\0" * 4), "2 raw_input_contents for 1 inputs"),
    ("no inputs", lambda r: (r.ClearField("inputs"), r.ClearField("raw_input_contents")), "no inputs"),
    ("17 inputs", lambda r: _inputs(r, 17), "17 inputs; the limit is 16"),
    ("model name", lambda r: setattr(r, "model_name", "Bad Name"), "invalid model name 'Bad Name'"),
    ("version text", lambda r: setattr(r, "model_version", "1x"), "model_version must be a positive number, got '1x'"),
    ("version 0", lambda r: setattr(r, "model_version", "0"), "model_version must be a positive number, got '0'"),
    (  # names are shown as Python's ascii() shows them: repr's quotes, non-ASCII and control characters escaped
        "odd input name",
        lambda r: _odd_name(r),
        """input "it's \\xe9\\n\\U0001f600" has a negative dimension in its shape [-1, 4]""",
    ),
    ("non-ASCII version", lambda r: setattr(r, "model_version", "\u00b2"), "a positive number, got '\\xb2'"),
]


def _k(r: pb.ModelInferRequest, k: int) -> None:
    r.outputs.add(name="logits").parameters["classification"].int64_param = k


def _k_text(r: pb.ModelInferRequest) -> None:
    r.outputs.add(name="logits").parameters["classification"].string_param = "5"


def _shape(r: pb.ModelInferRequest, shape: list[int]) -> None:
    r.inputs[0].ClearField("shape")
    r.inputs[0].shape.extend(shape)


def _odd_name(r: pb.ModelInferRequest) -> None:
    r.inputs[0].name = "it's \u00e9\n\U0001f600"
    _shape(r, [-1, 4])


def _inputs(r: pb.ModelInferRequest, n: int) -> None:
    r.ClearField("inputs")
    r.ClearField("raw_input_contents")
    for i in range(n):
        r.inputs.add(name=f"in{i}", datatype="FP32", shape=[1])
        r.raw_input_contents.append(b"\0" * 4)


async def test_malformed_calls_are_refused_by_the_gateway_on_both_paths(registry: Stack, stand_ins: StandIns) -> None:
    """Each case gets INVALID_ARGUMENT with the same message on both paths of the one port, and the worker never
    sees it; the same call without the fault goes through (so the worker is reachable and the test can fail)."""
    model = "refusals"
    version = await asyncio.to_thread(register, registry, model)
    worker = await CountingWorker().start()
    await stand_ins(model, version, [("counting-refusals", f"127.0.0.1:{worker.port}", 0)])
    gw = await gateway_seeing(registry, model, 1)
    secrets = {path: await asyncio.to_thread(key_for, registry, path) for path in PATHS}
    channel, stub = stub_for(gw)
    try:
        for secret in secrets.values():  # each path takes a good call (and the key is cached)
            await stub.ModelInfer(tensor_request(model, k=3), metadata=auth(secret), timeout=10)
        assert len(worker.received) == 2
        native_before = native_calls(gw)
        assert native_before == 1  # the unlimited key's call ran in C++, the limited key's in Python
        for case, fault, expected in REFUSALS:
            req = tensor_request(model)
            fault(req)
            answers = {}
            for path, secret in secrets.items():
                relayed_before = python_calls(gw)
                code, msg = await status_of(stub.ModelInfer(req, metadata=auth(secret), timeout=10))
                assert (code, expected in msg) == (grpc.StatusCode.INVALID_ARGUMENT, True), (case, path, code, msg)
                # the front answers the calls of a key it admits itself; a limited key's go to the Python server
                assert python_calls(gw) - relayed_before == (0 if path == "native" else 1), (case, path)
                answers[path] = msg
            stream = await stream_refusal(stub, req, secrets["native"])
            assert answers["native"] == answers["relayed"], case
            assert stream == f"INVALID_ARGUMENT: {answers['native']}", (case, stream)
        assert len(worker.received) == 2, "a malformed call reached the worker"
        assert native_calls(gw) == native_before
    finally:
        await channel.close()
        await gw.stop(0)
        await worker.stop()


async def test_a_key_sent_twice_counts_as_the_last_one_on_both_paths(registry: Stack, stand_ins: StandIns) -> None:
    """With two authorization headers the last one counts, for the front and for the Python server behind it (which
    reads metadata into a dict; the front once read the first, so a known key first and garbage last was served
    natively)."""
    model = "twice"
    version = await asyncio.to_thread(register, registry, model)
    worker = await CountingWorker().start()
    await stand_ins(model, version, [("counting-twice", f"127.0.0.1:{worker.port}", 0)])
    gw = await gateway_seeing(registry, model, 1)
    channel, stub = stub_for(gw)
    try:
        for path in PATHS:
            secret = await asyncio.to_thread(key_for, registry, path)
            valid, garbage = ("authorization", f"Bearer {secret}"), ("authorization", "Bearer fv_garbage_0123456789")
            await stub.ModelInfer(tensor_request(model), metadata=(valid,), timeout=10)  # the key is known now
            code, _ = await status_of(stub.ModelInfer(tensor_request(model), metadata=(valid, garbage), timeout=10))
            assert code == grpc.StatusCode.UNAUTHENTICATED, (path, code)
            code, msg = await status_of(stub.ModelInfer(tensor_request(model), metadata=(garbage, valid), timeout=10))
            assert code == grpc.StatusCode.OK, (path, code, msg)
        assert len(worker.received) == 4
        assert native_calls(gw) == 2  # the unlimited key's two good calls; the limited key's went to Python
    finally:
        await channel.close()
        await gw.stop(0)
        await worker.stop()


async def test_a_call_whose_message_never_comes_ends_at_the_gateways_deadline(
    registry: Stack, stand_ins: StandIns
) -> None:
    """A caller that sends a call's headers and never its message, with no deadline or one of years, gets
    DEADLINE_EXCEEDED at the deadline the gateway would give the call (the default, or the longest), on both paths:
    otherwise each such call held one of the front's pending-call slots for ever, and a few thousand of them
    locked every caller out. The next call is served."""
    model = "bodiless"
    version = await asyncio.to_thread(register, registry, model)
    worker = await CountingWorker().start()
    await stand_ins(model, version, [("counting-bodiless", f"127.0.0.1:{worker.port}", 0)])
    gw = await gateway_seeing(registry, model, 1, default_deadline_ms=1000, max_deadline_ms=2000)
    channel, stub = stub_for(gw)
    infer = channel.stream_unary("/inference.GRPCInferenceService/ModelInfer")

    async def nothing() -> AsyncIterator[bytes]:
        await asyncio.Event().wait()  # headers sent; the message never comes
        yield b""

    loop = asyncio.get_running_loop()
    try:
        for path in PATHS:
            secret = await asyncio.to_thread(key_for, registry, path)
            await stub.ModelInfer(tensor_request(model), metadata=auth(secret), timeout=10)  # the key is known now
            for timeout, limit in ((None, "1000 ms"), (3e7, "2000 ms")):
                start = loop.time()
                call = infer(nothing(), metadata=auth(secret), timeout=timeout)
                code, msg = await asyncio.wait_for(status_of(call), 10)
                assert code == grpc.StatusCode.DEADLINE_EXCEEDED, (path, timeout, code, msg)
                assert f"did not arrive within {limit}" in msg, (path, msg)
                assert loop.time() - start < 5, (path, timeout)
            await stub.ModelInfer(tensor_request(model), metadata=auth(secret), timeout=10)
        assert gw.native is not None
        # A call's slot is given back when the front frees it, just after its answer is written: wait for that.
        for _ in range(200):
            if gw.native.counts()["in_progress"] == 0:
                break
            await asyncio.sleep(0.01)
        assert gw.native.counts()["in_progress"] == 0
    finally:
        await channel.close()
        await gw.stop(0)
        await worker.stop()
