"""Routing: balance over equal workers (acceptance 3), ejection and re-admission after a probe,
deadline propagation with default and maximum, and the request limits."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2

from fovea.redis_server import free_port
from fovea.v1 import registry_pb2
from gateway.routing import Workers
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.gateway.conftest import GatewayFactory, Stack, auth, classify_request, image_stub, status_of, wait_routable
from tests.tinymodels import png

RED = png((240, 20, 20))


async def test_two_equal_workers_share_the_load(stack: Stack, gateways: GatewayFactory) -> None:
    gw = await gateways()
    secret = await asyncio.to_thread(stack.key)
    channel, stub = image_stub(gw)
    req = classify_request(RED)
    n_clients, per_client = 6, 40

    async def client() -> None:
        for _ in range(per_client):
            resp = await stub.Classify(req, metadata=auth(secret), timeout=30)
            assert resp.results[0].labels[0].label == "red"

    await asyncio.gather(*(client() for _ in range(n_clients)))
    for _ in range(50):  # the native front's records reach the counter every 0.2 s
        if sum(gw.metrics.served_by_worker().values()) >= n_clients * per_client:
            break
        await asyncio.sleep(0.05)
    served = gw.metrics.served_by_worker()  # the gateway's per-worker counter (also on /metrics)
    total = sum(served.values())
    print(f"served per worker: {served}")
    assert total == n_clients * per_client and len(served) == 2
    for count in served.values():
        assert 0.4 <= count / total <= 0.6, served
    await channel.close()


def _status(worker_id: str, address: str) -> registry_pb2.WorkerStatus:
    return registry_pb2.WorkerStatus(
        worker_id=worker_id,
        address=address,
        state=registry_pb2.WORKER_STATE_READY,
        models=[registry_pb2.LoadedModel(name="colors", version=1, ready=True)],
    )


async def _health_only_server(port: int) -> grpc.aio.Server:
    """Fault-injection stand-in for a worker: it answers only grpc.health.v1, as a worker would when healthy."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    from grpc_health.v1 import health_pb2_grpc

    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    await servicer.set("inference.GRPCInferenceService", health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


async def test_an_ejected_worker_is_probed_until_it_answers_then_readmitted() -> None:
    """The front counts the failures and ejects (test_fast_port.py); Python's part is the probe: an ejected
    worker stays out while its health check fails, and comes back once it answers SERVING."""
    down_port, up_port = free_port(), free_port()
    up = await _health_only_server(up_port)
    changes: list[tuple[str, bool]] = []
    workers = Workers(4 * 1024 * 1024, eject_s=0.3)
    workers.on_change = lambda ep: changes.append((ep.status.worker_id, ep.ejected))
    workers.on_event(
        registry_pb2.WatchWorkersResponse(
            snapshot=True,
            workers=[_status("flaky", f"127.0.0.1:{down_port}"), _status("steady", f"127.0.0.1:{up_port}")],
        )
    )
    flaky = workers.endpoints["flaky"]
    workers.eject(flaky, "failures the front counted")  # nothing listens on the flaky worker's port
    assert flaky.ejected and changes == [("flaky", True)]
    assert sorted(workers.ready_on("colors", 1)) == ["flaky", "steady"]  # the front still tries it as a last resort
    await asyncio.sleep(1.0)  # probes keep failing while the port is closed
    assert flaky.ejected
    revived = await _health_only_server(down_port)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while flaky.ejected and loop.time() < deadline:
        await asyncio.sleep(0.05)
    assert not flaky.ejected, "the probe did not re-admit the worker"
    assert changes == [("flaky", True), ("flaky", False)]  # the front's table follows (gateway/server.py)
    await workers.close()
    await up.stop(0)
    await revived.stop(0)


async def test_deadline_default_and_maximum(stack: Stack, gateways: GatewayFactory) -> None:
    secret = await asyncio.to_thread(stack.key)
    many = classify_request(*[png((240, 20, 20), size=64)] * 32)  # decoding 32 images takes well over 1 ms
    capped = await gateways(max_deadline_ms=1)
    channel, stub = image_stub(capped)
    code, _ = await status_of(stub.Classify(many, metadata=auth(secret), timeout=60))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED  # a 60 s deadline was cut to 1 ms
    await channel.close()
    short_default = await gateways(default_deadline_ms=1)
    channel, stub = image_stub(short_default)
    code, _ = await status_of(stub.Classify(many, metadata=auth(secret)))
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED  # no deadline from the caller: the default applies
    resp = await stub.Classify(many, metadata=auth(secret), timeout=60)  # the caller's own deadline wins
    assert len(resp.results) == 32
    await channel.close()


async def test_limits(stack: Stack, gateways: GatewayFactory) -> None:
    secret = await asyncio.to_thread(stack.key)
    gw = await gateways(max_message_bytes=200_000, max_images_per_call=2, max_image_pixels=32 * 32)
    channel, stub = image_stub(gw)
    md = auth(secret)
    code, message = await status_of(stub.Classify(classify_request(RED, RED, RED), metadata=md, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "limit is 2" in message
    code, message = await status_of(stub.Classify(classify_request(png((1, 2, 3), size=33)), metadata=md, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "pixels" in message
    noise = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, format="PNG")
    assert len(buf.getvalue()) > 200_000
    code, _ = await status_of(stub.Classify(classify_request(buf.getvalue()), metadata=md, timeout=10))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED  # gRPC refuses the oversized message itself
    infer = pb_grpc.GRPCInferenceServiceStub(channel)
    big = pb.ModelInferRequest(model_name="ident")
    big.inputs.add(name="input", datatype="FP32", shape=[3, 4])
    big.raw_input_contents.append(np.zeros((3, 4), np.float32).tobytes())
    code, message = await status_of(infer.ModelInfer(big, metadata=md, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "batch of 3" in message
    ok = pb.ModelInferRequest(model_name="ident")
    ok.inputs.add(name="input", datatype="FP32", shape=[2, 4])
    ok.raw_input_contents.append(np.arange(8, dtype=np.float32).tobytes())
    resp = await infer.ModelInfer(ok, metadata=md, timeout=10)
    assert np.frombuffer(resp.raw_output_contents[0], np.float32).tolist() == list(range(8))
    garbage = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes in, bytes out
    code, message = await status_of(garbage(b"\xff\xff\xff not a protobuf", metadata=md, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "ModelInferRequest" in message
    assert (await stub.Classify(classify_request(RED), metadata=md, timeout=10)).results[0].labels[0].label == "red"
    await channel.close()


async def _fast_port_successes(stack: Stack, model: str) -> int:
    """Calls each worker answered for a model, from its own ModelStatistics (on its one port: raw tensors its
    native front answered, and the calls it relayed to its Python server)."""
    total = 0
    md = (("authorization", f"Bearer {stack.cluster.worker_call_token}"),)
    for w in await asyncio.to_thread(lambda: stack.rc.list_workers(model, ready_only=True)):
        assert w.fast_address, "workers advertise their fast port"
        async with grpc.aio.insecure_channel(w.fast_address) as ch:
            st = await pb_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(
                pb.ModelStatisticsRequest(name=model), metadata=md, timeout=10
            )
            total += sum(s.inference_stats.success.count for s in st.model_stats)
    return total


async def test_raw_tensors_go_to_the_fast_port_and_images_to_the_main_port(
    stack: Stack, gateways: GatewayFactory
) -> None:
    gw = await gateways()
    await wait_routable(gw, "ident")
    secret = await asyncio.to_thread(stack.key)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}")
    infer = pb_grpc.GRPCInferenceServiceStub(channel)
    ident_before = await _fast_port_successes(stack, "ident")
    colors_before = await _fast_port_successes(stack, "colors")
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    for i in range(10):
        req = pb.ModelInferRequest(model_name="ident", id=f"r{i}")
        req.inputs.add(name="input", datatype="FP32", shape=[2, 4])
        req.raw_input_contents.append((x + i).tobytes())
        resp = await infer.ModelInfer(req, metadata=auth(secret), timeout=10)
        assert resp.id == f"r{i}" and resp.model_version == "1"
        np.testing.assert_array_equal(np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(2, 4), x + i)
    image = pb.ModelInferRequest(model_name="colors")
    image.inputs.add(name="input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(RED)
    image.outputs.add(name="logits").parameters["classification"].int64_param = 1
    resp = await infer.ModelInfer(image, metadata=auth(secret), timeout=10)
    assert resp.outputs[0].datatype == "BYTES" and b"red" in resp.raw_output_contents[0]
    assert await _fast_port_successes(stack, "ident") == ident_before + 10
    # the image went to the worker's address (its one port), which relayed it to its Python server
    assert await _fast_port_successes(stack, "colors") == colors_before + 1
    await channel.close()
