"""ClassifyStream: answers in order, an error per failed item without ending the stream,
and at most stream_window requests of one stream in flight at once (the gateway stops reading
the stream while its window is full, which is what lets HTTP/2 flow control push back)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2

from fovea.client import Client
from fovea.v1 import image_pb2
from tests.gateway.conftest import GatewayFactory, Stack, auth, classify_request, image_stub, status_of
from tests.tinymodels import png

COLORS = {"red": (240, 20, 20), "green": (20, 240, 20), "blue": (20, 20, 240)}


async def test_stream_answers_in_order_with_errors_per_item(stack: Stack, gateways: GatewayFactory) -> None:
    window = 3
    gw = await gateways(stream_window=window)
    secret = await asyncio.to_thread(stack.key)
    channel, stub = image_stub(gw)
    names = list(COLORS) * 10
    bad = {5: "corrupt", 11: "unknown model", 17: "no images"}

    async def requests() -> AsyncIterator[image_pb2.ClassifyStreamRequest]:
        for seq, name in enumerate(names):
            req = classify_request(png(COLORS[name]))
            if bad.get(seq) == "corrupt":
                req = classify_request(b"\x89PNG not really")
            elif bad.get(seq) == "unknown model":
                req.model = "no-such-model"
            elif bad.get(seq) == "no images":
                del req.images[:]
            yield image_pb2.ClassifyStreamRequest(request=req, sequence=1000 + seq)

    peak = 0
    front = gw.gateway.front
    assert front is not None
    ep_in_flight = lambda: len(front.waiting)  # noqa: E731 - the stream's calls the front is routing
    call = stub.ClassifyStream(requests(), metadata=auth(secret), timeout=60)
    answers = []
    async for resp in call:
        peak = max(peak, ep_in_flight())
        answers.append(resp)
    assert [a.sequence for a in answers] == [1000 + i for i in range(len(names))]
    for seq, answer in enumerate(answers):
        if seq in bad:
            expected = grpc.StatusCode.NOT_FOUND if bad[seq] == "unknown model" else grpc.StatusCode.INVALID_ARGUMENT
            assert answer.error_code == expected.value[0] and answer.error_message, (seq, answer)
        else:
            assert answer.error_code == 0, answer.error_message
            assert answer.response.results[0].labels[0].label == names[seq]
    assert peak <= window
    assert (await call.code()) == grpc.StatusCode.OK
    await channel.close()


async def test_python_client_stream(stack: Stack, gateways: GatewayFactory) -> None:
    gw = await gateways()
    secret = await asyncio.to_thread(stack.key)
    names = list(COLORS) * 4

    def run() -> list[tuple[int, str]]:  # the blocking client runs in a thread; the gateway in this loop
        with Client(f"127.0.0.1:{gw.port}", secret, timeout_s=30) as c:
            answers = c.classify_stream(classify_request(png(COLORS[n])) for n in names)
            return [(a.sequence, a.response.results[0].labels[0].label) for a in answers]

    assert await asyncio.to_thread(run) == list(enumerate(names))


async def test_one_keys_idle_streams_cannot_lock_out_other_keys(stack: Stack, gateways: GatewayFactory) -> None:
    """A key's calls in progress are capped (max_calls_per_key), streams included: streams that send nothing
    and set no deadline stay open, and without the cap one key could hold every pending-call slot of the
    gateway. Past the cap that key gets RESOURCE_EXHAUSTED saying why; another key is served, and a closed
    stream gives its slot back."""
    gw = await gateways(max_calls_per_key=3)
    hog, other = await asyncio.to_thread(stack.key), await asyncio.to_thread(stack.key)
    channel, stub = image_stub(gw)

    async def nothing() -> AsyncIterator[image_pb2.ClassifyStreamRequest]:
        await asyncio.Event().wait()
        yield image_pb2.ClassifyStreamRequest()

    streams = [stub.ClassifyStream(nothing(), metadata=auth(hog)) for _ in range(3)]
    try:
        for stream in streams:
            await stream.wait_for_connection()
        refused = stub.Classify(classify_request(png(COLORS["red"])), metadata=auth(hog), timeout=10)
        code, message = await status_of(refused)
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, message)
        assert "3 calls in progress" in message and "MAX_CALLS_PER_KEY" in message, message
        answer = await stub.Classify(classify_request(png(COLORS["red"])), metadata=auth(other), timeout=10)
        assert answer.results[0].labels[0].label == "red"
        streams.pop().cancel()
        for _ in range(50):  # the slot comes back once the front has seen the cancellation
            code, message = await status_of(
                stub.Classify(classify_request(png(COLORS["blue"])), metadata=auth(hog), timeout=10)
            )
            if code != grpc.StatusCode.RESOURCE_EXHAUSTED:
                break
            await asyncio.sleep(0.05)
        assert code == grpc.StatusCode.OK, (code, message)
    finally:
        for stream in streams:
            stream.cancel()
        await channel.close()


async def test_keyless_health_watches_share_one_keys_limit(stack: Stack, gateways: GatewayFactory) -> None:
    """Health and reflection take no key, and a health Watch never ends: without a limit, callers with no key at
    all could hold every pending-call slot of the gateway with them. Keyless calls count as one key under
    max_calls_per_key: past it they get RESOURCE_EXHAUSTED, and calls with a key are still served."""
    gw = await gateways(max_calls_per_key=3)
    secret = await asyncio.to_thread(stack.key)
    channel, stub = image_stub(gw)
    watch = channel.unary_stream(
        "/grpc.health.v1.Health/Watch",
        request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
        response_deserializer=health_pb2.HealthCheckResponse.FromString,
    )
    watches = [watch(health_pb2.HealthCheckRequest()) for _ in range(3)]
    try:
        for w in watches:
            assert (await w.read()).status == health_pb2.HealthCheckResponse.SERVING
        code, message = await status_of(watch(health_pb2.HealthCheckRequest()).read())
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "3 calls in progress" in message, (code, message)
        answer = await stub.Classify(classify_request(png(COLORS["red"])), metadata=auth(secret), timeout=10)
        assert answer.results[0].labels[0].label == "red"
    finally:
        for w in watches:
            w.cancel()
        await channel.close()
