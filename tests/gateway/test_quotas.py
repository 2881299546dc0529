"""Issue #18, fixes 4 and 8: quotas count what the workers compute.

A BYTES tensor holds one encoded image per element, so the gateway charges its element count (as
Classify charges its images), refuses a call over the per-call image limit before any worker decodes
it, and charges the calls that fan out to the registry or to every worker against the key's
requests/s limit. All through the gateway's one port: its native front relays calls of keys with limits to the
Python server, which charges them, and answers an unlimited key's ModelInfer itself, so the per-call image limit
is tested with both kinds of key."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest

from fovea.v1 import image_pb2, image_pb2_grpc
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.gateway.conftest import GatewayFactory, Stack, auth, status_of, wait_routable
from tests.gateway.test_routing import RED


def images_request(rows: int, per_row: int) -> pb.ModelInferRequest:
    """A ModelInfer of rows x per_row encoded images, as a BYTES tensor of that shape."""
    req = pb.ModelInferRequest(model_name="colors")
    tensor = req.inputs.add(name="input", datatype="BYTES", shape=[rows, per_row])
    tensor.contents.bytes_contents.extend([RED] * (rows * per_row))
    req.outputs.add(name="logits").parameters["classification"].int64_param = 1
    return req


def infer_stub(gw: Any) -> tuple[grpc.aio.Channel, pb_grpc.GRPCInferenceServiceStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}")
    return channel, pb_grpc.GRPCInferenceServiceStub(channel)


async def worker_calls(stack: Stack, model: str) -> int:
    """Calls the workers' main ports have seen for a model (answered or failed), from their own statistics."""
    total = 0
    md = auth(stack.cluster.worker_call_token)
    for w in await asyncio.to_thread(lambda: stack.rc.list_workers(model, ready_only=True)):
        async with grpc.aio.insecure_channel(w.address) as ch:
            st = await pb_grpc.GRPCInferenceServiceStub(ch).ModelStatistics(
                pb.ModelStatisticsRequest(name=model), metadata=md, timeout=10
            )
            total += sum(s.inference_stats.success.count + s.inference_stats.fail.count for s in st.model_stats)
    return total


async def test_bytes_tensor_of_shape_1x4_is_charged_four_images(stack: Stack, gateways: GatewayFactory) -> None:
    gw = await gateways(redis_url=stack.redis_url)
    _, secret = await asyncio.to_thread(lambda: stack.rc.create_key("infer", rate_limit_ips=4, rate_burst=4))
    channel, stub = infer_stub(gw)
    resp = await stub.ModelInfer(images_request(1, 4), metadata=auth(secret), timeout=10)
    assert resp.outputs[0].shape[0] == 4, resp.outputs[0].shape  # the worker decoded four images
    # the bucket (4 images, 4 a second) is empty now: a one-image call must wait about 250 ms
    code, message = await status_of(stub.ModelInfer(images_request(1, 1), metadata=auth(secret), timeout=10))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "images/s" in message, (code, message)
    await channel.close()


async def test_sixteen_images_in_a_third_of_a_second_are_refused(stack: Stack, gateways: GatewayFactory) -> None:
    """The attack of the issue: a key limited to 4 images/s sends four [1,4] BYTES calls at once."""
    gw = await gateways(redis_url=stack.redis_url)
    _, secret = await asyncio.to_thread(lambda: stack.rc.create_key("infer", rate_limit_ips=4, rate_burst=4))
    channel, stub = infer_stub(gw)
    start = time.monotonic()
    results = [
        await status_of(stub.ModelInfer(images_request(1, 4), metadata=auth(secret), timeout=10)) for _ in "abcd"
    ]
    elapsed = time.monotonic() - start
    accepted = sum(4 for code, _ in results if code == grpc.StatusCode.OK)
    # a full bucket of 4, plus what 4 images/s refills while the calls ran
    assert accepted <= 4 + 4 * elapsed, (accepted, elapsed, results)
    assert any(code == grpc.StatusCode.RESOURCE_EXHAUSTED for code, _ in results), results
    await channel.close()


@pytest.mark.parametrize("path", ["native", "relayed"])
async def test_bytes_tensor_over_the_per_call_limit_is_refused_before_a_worker(
    stack: Stack, gateways: GatewayFactory, path: str
) -> None:
    gw = await gateways(max_images_per_call=4)
    # no limits: the front answers this key itself; a limit never reached: the front relays it to Python
    rps = 0.0 if path == "native" else 10_000.0
    secret = await asyncio.to_thread(lambda: stack.key(rate_limit_rps=rps))
    channel, stub = infer_stub(gw)
    for _ in range(2):  # the second call finds the key in the front's own table
        resp = await stub.ModelInfer(images_request(2, 2), metadata=auth(secret), timeout=10)
        assert resp.outputs[0].shape[0] == 4, resp.outputs[0].shape
    assert gw.native is not None
    # the front answered the unlimited key's images itself, so its own count is what is tested
    assert (gw.native.counts()["native"] >= 1) == (path == "native"), gw.native.counts()
    before = await worker_calls(stack, "colors")
    for rows, per_row in ((1, 5), (5, 1), (3, 2)):
        code, message = await status_of(
            stub.ModelInfer(images_request(rows, per_row), metadata=auth(secret), timeout=10)
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (rows, per_row, code, message)
        assert f"{rows * per_row} images" in message and "limit is 4" in message, message
    assert await worker_calls(stack, "colors") == before, "a worker saw a call over the limit"
    await channel.close()


FANOUT_CALLS = [
    pytest.param("ImageService", "ListModels", image_pb2.ImageServiceListModelsRequest(), id="ListModels"),
    pytest.param("ImageService", "GetModel", image_pb2.GetModelRequest(model="colors"), id="GetModel"),
    pytest.param("GRPCInferenceService", "ModelStatistics", pb.ModelStatisticsRequest(), id="ModelStatistics-all"),
    pytest.param(
        "GRPCInferenceService", "ModelStatistics", pb.ModelStatisticsRequest(name="colors"), id="ModelStatistics-one"
    ),
    pytest.param("GRPCInferenceService", "ModelMetadata", pb.ModelMetadataRequest(name="colors"), id="ModelMetadata"),
    pytest.param("GRPCInferenceService", "ModelConfig", pb.ModelConfigRequest(name="colors"), id="ModelConfig"),
    pytest.param("GRPCInferenceService", "ModelReady", pb.ModelReadyRequest(name="colors"), id="ModelReady"),
]


@pytest.mark.parametrize(("service", "method", "request_message"), FANOUT_CALLS)
async def test_calls_that_fan_out_are_charged_to_the_key(
    stack: Stack, gateways: GatewayFactory, service: str, method: str, request_message: Any
) -> None:
    gw = await gateways(redis_url=stack.redis_url)
    await wait_routable(gw, "colors")
    _, secret = await asyncio.to_thread(lambda: stack.rc.create_key("infer", rate_limit_rps=2, rate_burst=2))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}")
    stub_class = image_pb2_grpc.ImageServiceStub if service == "ImageService" else pb_grpc.GRPCInferenceServiceStub
    call = getattr(stub_class(channel), method)
    codes = []
    for _ in range(8):
        code, message = await status_of(call(request_message, metadata=auth(secret), timeout=10))
        codes.append(code)
        if code != grpc.StatusCode.OK:
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "rate limit" in message, (code, message)
    # a burst of 2 and 2 a second: 8 quick calls cannot all pass
    assert codes[:2] == [grpc.StatusCode.OK] * 2 and codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) >= 3, codes
    await channel.close()


BAD_VERSIONS = ["99999999999999999999", "\u00b2", "-1", "abc", "0"]
BAD_NAMES = ["col\x00ors", "\u00ff", "m" * 100_000]
VERSIONED_CALLS = [
    pytest.param("ModelMetadata", pb.ModelMetadataRequest, id="ModelMetadata"),
    pytest.param("ModelConfig", pb.ModelConfigRequest, id="ModelConfig"),
    pytest.param("ModelStatistics", pb.ModelStatisticsRequest, id="ModelStatistics"),
    pytest.param("ModelReady", pb.ModelReadyRequest, id="ModelReady"),
]


@pytest.mark.parametrize(("method", "message_class"), VERSIONED_CALLS)
async def test_a_bad_version_or_model_name_is_refused(
    stack: Stack, gateways: GatewayFactory, method: str, message_class: Any
) -> None:
    """Item 4 of the brief: every number the gateway parses from a request is bounded, with a clear
    INVALID_ARGUMENT (a version past uint64 used to end as INTERNAL, '\u00b2' too). A name that cannot be a
    model's is INVALID_ARGUMENT on every call (ModelReady answered it 'not ready')."""
    gw = await gateways()
    secret = await asyncio.to_thread(stack.key)
    channel, stub = infer_stub(gw)
    for version in BAD_VERSIONS:
        request = message_class(name="colors", version=version)
        code, message = await status_of(getattr(stub, method)(request, metadata=auth(secret), timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "version" in message, (version, code, message)
    for name in BAD_NAMES:
        request = message_class(name=name)
        code, message = await status_of(getattr(stub, method)(request, metadata=auth(secret), timeout=10))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "invalid model name" in message, (name[:9], code)
    await channel.close()


CLASSIFY_BOUNDS = [
    pytest.param({"top_k": 101}, "top_k", id="top_k-over-max"),
    pytest.param({"top_k": 2**32 - 1}, "top_k", id="top_k-uint32-max"),
    pytest.param({"images": 65}, "images in one call", id="images-over-max"),
    pytest.param({"images": 0}, "no images", id="no-images"),
]


@pytest.mark.parametrize(("fields", "words"), CLASSIFY_BOUNDS)
async def test_classify_numbers_out_of_bounds_are_refused(
    stack: Stack, gateways: GatewayFactory, fields: dict[str, int], words: str
) -> None:
    gw = await gateways()
    secret = await asyncio.to_thread(stack.key)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}")
    stub = image_pb2_grpc.ImageServiceStub(channel)
    images = [image_pb2.Image(data=RED, id=str(i)) for i in range(fields.get("images", 1))]
    request = image_pb2.ClassifyRequest(model="colors", top_k=fields.get("top_k", 1), images=images)
    code, message = await status_of(stub.Classify(request, metadata=auth(secret), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and words in message, (code, message)
    # the same item in a stream is answered with the same code, and the stream goes on
    items = [image_pb2.ClassifyStreamRequest(sequence=1, request=request)]
    answers = [a async for a in stub.ClassifyStream(iter(items), metadata=auth(secret), timeout=10)]
    assert [a.error_code for a in answers] == [grpc.StatusCode.INVALID_ARGUMENT.value[0]], answers
    await channel.close()
