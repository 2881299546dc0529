"""Calls the Python server hands to the native front to route (gateway/forward.py, fg_forward_send in
gateway/native/api.h): the front checks their bounds, sends them to a worker as it sends its own, and their end
comes back through an eventfd the event loop watches. The workers here are stand-ins in the test's process
(real gRPC servers on loopback) so that the test sees what reached them and when."""

from __future__ import annotations

import asyncio
import pathlib
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from fovea.redis_server import free_port
from fovea.v1 import image_pb2
from gateway.fast_port import CStrings, NativeGateway, RouteTable, WorkerRoute
from gateway.forward import ImageTensors
from inference import grpc_predict_v2_pb2 as pb
from tests.tinymodels import png


class StandIn:
    """A worker's one port that keeps what each ModelInfer brought (request, metadata) and answers after delay_s
    (the answer names the model and echoes the request id), or refuses the call as a draining worker does."""

    def __init__(self, delay_s: float = 0.0, refuse: bool = False, answer: bytes | None = None, port: int = 0) -> None:
        self.delay_s, self.refuse, self.answer = delay_s, refuse, answer
        self.calls: list[tuple[pb.ModelInferRequest, dict[str, str]]] = []
        self.cancelled = asyncio.Event()
        self.server = grpc.aio.server()
        handler = grpc.unary_unary_rpc_method_handler(self._infer)
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {"ModelInfer": handler}),)
        )
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        self.address = f"127.0.0.1:{self.port}"

    async def _infer(self, request: bytes, context: Any) -> bytes:
        req = pb.ModelInferRequest.FromString(request)
        self.calls.append((req, {k: v for k, v in context.invocation_metadata()}))
        if self.refuse:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "worker is draining", (("fovea-unserved", "1"),))
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:  # gRPC cancels the handler when its call is cancelled
            self.cancelled.set()
            raise
        if self.answer is not None:
            return self.answer
        return pb.ModelInferResponse(model_name=req.model_name, model_version=req.model_version).SerializeToString()


@pytest.fixture
async def front(tmp_path: pathlib.Path) -> AsyncIterator[NativeGateway]:
    gw = NativeGateway("127.0.0.1:0", 1 << 20, f"unix:{tmp_path}/none.sock", "token", 5000, 10000, 64, 3, 100)
    yield gw
    await asyncio.to_thread(gw.shutdown, 0.1)
    gw.close()


async def serving(front: NativeGateway, *workers: StandIn, model: str = "ident") -> None:
    for w in workers:
        await w.server.start()
    front.set_routes(RouteTable(workers=[WorkerRoute(model, 1, w.address, w.address, 0) for w in workers]))


def infer(model: str = "ident", version: int = 1) -> bytes:
    req = pb.ModelInferRequest(model_name=model, model_version=str(version))
    req.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    req.raw_input_contents.append(b"\0" * 16)
    return req.SerializeToString()


async def test_a_routed_call_reaches_the_worker_with_its_metadata_and_its_answer_comes_back(
    front: NativeGateway,
) -> None:
    worker = StandIn()
    await serving(front, worker)
    trace = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    routed = await front.forwards.send(
        "ident", 1, infer(), 5.0, tensors=True, request_id="rid-1", metadata=(("traceparent", trace),)
    )
    assert routed.code == 0 and not routed.unrouted and routed.worker == worker.address
    assert pb.ModelInferResponse.FromString(routed.data).model_name == "ident"
    ((req, md),) = worker.calls
    assert req.model_name == "ident" and md["x-request-id"] == "rid-1" and md["traceparent"] == trace
    assert md["authorization"] == "Bearer token"  # the worker token, never the caller's key
    await worker.server.stop(0)


async def test_no_worker_no_time_and_a_refusal_each_end_the_call_with_their_status(front: NativeGateway) -> None:
    refusing, steady = StandIn(refuse=True), StandIn()
    await serving(front, refusing)
    unrouted = await front.forwards.send("other", 1, infer("other"), 5.0)
    assert unrouted.unrouted and unrouted.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "no healthy worker has other v1 ready" in unrouted.message
    late = await front.forwards.send("ident", 1, infer(), 0.0)
    assert not late.unrouted and late.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0] and not refusing.calls
    # a call the only worker refused unrun: retried once, nowhere else to go
    before = front.counts()["retries"]
    refused = await front.forwards.send("ident", 1, infer(), 5.0)
    assert refused.code == grpc.StatusCode.UNAVAILABLE.value[0] and len(refusing.calls) == 1
    await serving(front, refusing, steady)
    for _ in range(20):  # whichever the front picks first, the call ends on the steady worker
        ok = await front.forwards.send("ident", 1, infer(), 5.0)
        assert ok.code == 0 and ok.worker == steady.address
    assert front.counts()["retries"] > before
    await refusing.server.stop(0)
    await steady.server.stop(0)


async def test_a_worker_back_in_a_new_table_is_dialled_at_once_not_after_its_reconnect_wait(
    tmp_path: pathlib.Path,
) -> None:
    """A worker that could not be reached (it restarted) is dialled again as soon as a table lists it (Python
    sends one on each registry event: the restarted worker's registration, its heartbeats), rather than when the
    channel's reconnect wait ends; but at most once a second, since tables come with every heartbeat. The wait
    here is a minute, so only a new table can bring the worker back."""
    front = NativeGateway(
        "127.0.0.1:0", 1 << 20, f"unix:{tmp_path}/none.sock", "token", 5000, 10000, 64, 3, 100, reconnect_s=(60, 60)
    )
    address = f"127.0.0.1:{free_port()}"
    table = RouteTable(workers=[WorkerRoute("ident", 1, address, address, 0)])
    unavailable = grpc.StatusCode.UNAVAILABLE.value[0]

    async def first_answer_within(seconds: float) -> int:
        end = time.monotonic() + seconds
        while True:
            routed = await front.forwards.send("ident", 1, infer(), 5.0)
            if routed.code == 0 or time.monotonic() > end:
                return routed.code
            await asyncio.sleep(0.02)

    front.set_routes(table)
    down = await front.forwards.send("ident", 1, infer(), 5.0)
    assert down.code == unavailable, down.message
    front.set_routes(table)  # dials again at once: nobody listens yet, so it waits a minute again
    redialed = time.monotonic()
    await asyncio.sleep(0.2)
    worker = StandIn(port=int(address.rsplit(":", 1)[1]))
    await worker.server.start()
    front.set_routes(table)  # within the second: no dial
    assert await first_answer_within(redialed + 0.7 - time.monotonic()) == unavailable and not worker.calls
    await asyncio.sleep(max(0.0, redialed + 1.1 - time.monotonic()))
    front.set_routes(table)
    assert await first_answer_within(5.0) == 0 and len(worker.calls) >= 1
    await worker.server.stop(0)
    await asyncio.to_thread(front.shutdown, 0.1)
    front.close()


async def test_a_worker_that_leaves_the_table_while_ejected_comes_back_clean(front: NativeGateway) -> None:
    """An ejected worker that leaves the table (the registry forgot it: Python's probe of it stopped) is not still
    set aside when it registers again, even when a call held it here meanwhile, which kept its state alive."""
    a, b = StandIn(refuse=True), StandIn()
    await serving(front, a, b)
    only_a = RouteTable(workers=[WorkerRoute("ident", 1, a.address, a.address, 0)])
    front.set_routes(only_a)
    for _ in range(3):  # three refusals in a row (eject_after): set aside
        assert (await front.forwards.send("ident", 1, infer(), 5.0)).code != 0
    a.refuse, a.delay_s = False, 30.0
    held = asyncio.create_task(front.forwards.send("ident", 1, infer(), 60.0))  # the only worker, set aside or not
    while len(a.calls) < 4:
        await asyncio.sleep(0.01)
    front.set_routes(RouteTable(workers=[WorkerRoute("ident", 1, b.address, b.address, 0)]))  # a left
    held.cancel()
    await asyncio.gather(held, return_exceptions=True)
    a.delay_s = 0.0
    both = RouteTable(workers=[WorkerRoute("ident", 1, w.address, w.address, 0) for w in (a, b)])
    front.set_routes(both)  # a registered again
    ends = [(await front.forwards.send("ident", 1, infer(), 5.0)).worker for _ in range(40)]
    assert ends.count(a.address) > 5 and ends.count(b.address) > 5, ends
    for w in (a, b):
        await w.server.stop(0)


async def test_a_worker_is_chosen_by_this_gateways_calls_on_it_plus_what_others_had_at_its_heartbeat(
    front: NativeGateway,
) -> None:
    """The worker's heartbeat counts this gateway's calls too: A reports the 2 calls this gateway has on it, B
    reported before this gateway's 3 calls reached it. A holds 2 calls, B 3, so the next call goes to A; adding
    the two figures would make A 4 and send it to B. Then A reports 2 calls of other gateways beside this one's
    3: 5 against B's 3, so the next goes to B."""
    a, b = StandIn(delay_s=30), StandIn(delay_s=30)
    for w in (a, b):
        await w.server.start()

    def table(depth_a: int, depth_b: int) -> RouteTable:
        return RouteTable(
            workers=[WorkerRoute("ident", 1, w.address, w.address, d) for w, d in ((a, depth_a), (b, depth_b))]
        )

    async def hold(n: int) -> list[asyncio.Task[Any]]:  # n more calls, until they reach a worker
        tasks, reached = [], len(a.calls) + len(b.calls) + n
        for _ in range(n):
            tasks.append(asyncio.create_task(front.forwards.send("ident", 1, infer(), 60.0)))
            await asyncio.sleep(0.05)
        while len(a.calls) + len(b.calls) < reached:
            await asyncio.sleep(0.01)
        return tasks

    front.set_routes(table(0, 100))
    held = await hold(2)
    front.set_routes(table(100, 0))
    held += await hold(3)
    assert (len(a.calls), len(b.calls)) == (2, 3)
    front.set_routes(table(2, 0))
    held += await hold(1)
    assert (len(a.calls), len(b.calls)) == (3, 3)
    front.set_routes(table(5, 3))
    held += await hold(1)
    assert (len(a.calls), len(b.calls)) == (3, 4)
    for task in held:
        task.cancel()
    await asyncio.gather(*held, return_exceptions=True)
    for w in (a, b):
        await w.server.stop(0)


async def test_a_cancelled_routed_call_cancels_the_worker_call(front: NativeGateway) -> None:
    slow = StandIn(delay_s=30)
    await serving(front, slow)
    task = asyncio.create_task(front.forwards.send("ident", 1, infer(), 60.0))
    while not slow.calls:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(slow.cancelled.wait(), 5)  # the worker saw its call end, 29 s early
    for _ in range(100):  # and the front's end of it was taken and freed
        if not front.forwards.waiting:
            break
        await asyncio.sleep(0.01)
    assert not front.forwards.waiting
    await slow.server.stop(0)


async def test_a_routed_classify_becomes_one_bytes_call_and_its_answer_a_classify_response(
    front: NativeGateway,
) -> None:
    answer = pb.ModelInferResponse(model_name="colors", model_version="1")
    answer.outputs.add(name="logits", datatype="BYTES", shape=[2, 1])
    items = [b"0.9:2:blue", b"0.8:0:red"]
    answer.raw_output_contents.append(b"".join(len(i).to_bytes(4, "little") + i for i in items))
    worker = StandIn(answer=answer.SerializeToString())
    await serving(front, worker, model="colors")
    images = [image_pb2.Image(id="sky", data=png((20, 20, 240))), image_pb2.Image(id="rose", data=png((240, 20, 20)))]
    routed = await front.forwards.send(
        "colors",
        1,
        image_pb2.ClassifyRequest(images=images).SerializeToString(),
        5.0,
        images=ImageTensors("input", "logits", 3, 5),
    )
    assert routed.code == 0, routed.message
    resp = image_pb2.ClassifyResponse.FromString(routed.data)
    assert resp.model == "colors" and resp.version == 1
    assert [(r.image_id, r.labels[0].label, r.labels[0].index) for r in resp.results] == [
        ("sky", "blue", 2),
        ("rose", "red", 0),
    ]
    ((req, _),) = worker.calls
    assert req.inputs[0].name == "input" and req.inputs[0].datatype == "BYTES" and list(req.inputs[0].shape) == [2]
    assert req.outputs[0].parameters["classification"].int64_param == 3  # top 5 asked, the output is 3 wide
    await worker.server.stop(0)


async def test_routed_calls_past_their_bounds_are_refused(front: NativeGateway) -> None:
    lib, ffi = front.lib, front.ffi
    text = CStrings(ffi)
    body = infer()
    base: dict[str, Any] = {
        "id": 1,
        "model": text(b"ident"),
        "version": 1,
        "request": ffi.from_buffer(body),
        "request_bytes": len(body),
        "timeout_ms": 1000,
    }

    def send(**fields: Any) -> int:
        return int(lib.fg_forward_send(front.handle, ffi.new("struct fg_forward*", {**base, **fields})))

    def pairs(*names: bytes) -> dict[str, Any]:
        md = ffi.new("char*[]", [text(s) for n in names for s in (n, b"v")])
        text.owned.append(md)
        return {"metadata": md, "n_metadata": len(names)}

    assert send(model=text(b"../etc")) == -1
    assert send(model=ffi.NULL) == -1
    assert send(version=0) == -1
    assert send(timeout_ms=-1) == -1
    assert send(request_bytes=(1 << 20) + 1) == -1
    assert send(request=ffi.NULL) == -1
    assert send(kind=7) == -1
    assert send(request_id=text(b"r" * (lib.FG_TEXT_MAX + 1))) == -1
    for bad in (b"Upper", b"grpc-timeout", b"authorization", b"x-request-id", b"", b"sp ace"):
        assert send(**pairs(bad)) == -1, bad
    assert send(**pairs(*[b"k"] * (lib.FG_MAX_METADATA + 1))) == -1
    assert send(metadata=ffi.NULL, n_metadata=1) == -1
    classify = {"kind": lib.FG_FORWARD_CLASSIFY, "input": text(b"input"), "output": text(b"logits"), "top_k": 1}
    assert send(**classify) == -1  # a ModelInferRequest is not a ClassifyRequest with images
    assert send(**{**classify, "top_k": 0}) == -1
    assert send(id=9) == 0  # within bounds: no worker, so it ends at once as unrouted
    await asyncio.to_thread(front.shutdown, 0.1)
    assert send(id=10) == -2
    results = ffi.new("struct fg_forward_result[]", 4)
    assert lib.fg_forward_take(front.handle, results, 4) == 1 and results[0].id == 9 and results[0].unrouted
    lib.fg_forward_release(front.handle, results, 1)
