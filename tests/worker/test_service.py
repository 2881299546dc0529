"""The worker's gRPC faces against an in-process worker and registry: auth, health, readiness, inputs, outputs,
metrics."""

from __future__ import annotations

import urllib.request

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto

from inference import grpc_predict_v2_pb2 as pb
from tests.tinymodels import color_model, pixel_mean_model, png
from tests.worker.conftest import (
    ADMIN_TOKEN,
    MD,
    REGISTRY_TOKEN,
    LocalRegistry,
    StartWorker,
    output_array,
    stub,
    tensor_request,
)
from tests.worker.slowmodels import cast_model


async def test_direct_call_without_internal_token_is_unauthenticated(
    registry: LocalRegistry, start_worker: StartWorker
) -> None:
    await registry.publish("colors", color_model())
    ws = await start_worker(["colors"])
    channel, s = stub(ws.port)
    req = tensor_request("colors", np.zeros((1, 3, 8, 8), np.float32))
    # Nor the worker's own registry token or an admin token: only the gateways' token opens a worker.
    wrong = ("not-the-token", REGISTRY_TOKEN, ADMIN_TOKEN)
    for md in [(), *((("authorization", f"Bearer {t}"),) for t in wrong), (("authorization", "Basic abc"),)]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.ModelInfer(req, metadata=md, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Calls the front relays to the worker's Python server are checked by the relay (worker/native/auth.cc),
    # the only check: unary, streaming, with no token or a wrong one.
    for md in [(), (("authorization", f"Bearer {REGISTRY_TOKEN}"),)]:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.ServerReady(pb.ServerReadyRequest(), metadata=md, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "credentials" in (err.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.ModelStatistics(pb.ModelStatisticsRequest(), metadata=md, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stream = s.ModelStreamInfer(iter([]), metadata=md, timeout=10)  # refused from its headers alone
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in stream:
                pass
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert (await s.ServerReady(pb.ServerReadyRequest(), metadata=MD, timeout=10)).ready
    # Health stays open for Kubernetes probes; the real call works with the token.
    health = health_pb2_grpc.HealthStub(channel)
    assert (
        await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
    ).status == health_pb2.HealthCheckResponse.SERVING
    resp = await s.ModelInfer(req, metadata=MD, timeout=10)
    assert resp.model_name == "colors" and resp.model_version == "1"
    await channel.close()


async def test_health_live_ready_and_model_ready(registry: LocalRegistry, start_worker: StartWorker) -> None:
    await registry.publish("colors", color_model())
    ws = await start_worker(["colors", "absent"])
    channel, s = stub(ws.port)
    assert (await s.ServerLive(pb.ServerLiveRequest(), metadata=MD, timeout=10)).live
    assert (await s.ServerReady(pb.ServerReadyRequest(), metadata=MD, timeout=10)).ready
    assert (await s.ModelReady(pb.ModelReadyRequest(name="colors"), metadata=MD, timeout=10)).ready
    assert (await s.ModelReady(pb.ModelReadyRequest(name="colors", version="1"), metadata=MD, timeout=10)).ready
    assert not (await s.ModelReady(pb.ModelReadyRequest(name="colors", version="2"), metadata=MD, timeout=10)).ready
    assert not (await s.ModelReady(pb.ModelReadyRequest(name="absent"), metadata=MD, timeout=10)).ready
    meta = await s.ModelMetadata(pb.ModelMetadataRequest(name="colors"), metadata=MD, timeout=10)
    assert meta.inputs[0].name == "input" and meta.inputs[0].datatype == "FP32"
    server_meta = await s.ServerMetadata(pb.ServerMetadataRequest(), metadata=MD, timeout=10)
    assert "classification" in server_meta.extensions
    # The heartbeat reports the provider ONNX Runtime really gave.
    workers = await __import__("asyncio").to_thread(registry.client.list_workers, "colors")
    assert workers and workers[0].models[0].provider == "CPUExecutionProvider"
    await channel.close()


async def test_fp16_and_uint8_inputs_raw_and_typed(registry: LocalRegistry, start_worker: StartWorker) -> None:
    await registry.publish("half", cast_model(TensorProto.FLOAT16))
    await registry.publish("bytes8", cast_model(TensorProto.UINT8))
    await registry.publish("colors", color_model())
    ws = await start_worker(["half", "bytes8", "colors"])
    channel, s = stub(ws.port)
    x16 = np.array([[1.5, -2.0, 0.25, 8.0]], np.float16)
    resp = await s.ModelInfer(tensor_request("half", x16, "FP16"), metadata=MD, timeout=10)
    np.testing.assert_allclose(output_array(resp), x16.astype(np.float32) * 2)
    x8 = np.array([[0, 7, 200, 255], [1, 2, 3, 4]], np.uint8)
    resp = await s.ModelInfer(tensor_request("bytes8", x8, "UINT8"), metadata=MD, timeout=10)
    np.testing.assert_allclose(output_array(resp), x8.astype(np.float32) * 2)
    # Typed contents instead of raw bytes.
    req = pb.ModelInferRequest(model_name="bytes8")
    req.inputs.add(name="input", datatype="UINT8", shape=[2, 4]).contents.uint_contents.extend(x8.ravel().tolist())
    np.testing.assert_allclose(output_array(await s.ModelInfer(req, metadata=MD, timeout=10)), x8 * 2.0)
    pixels = np.zeros((1, 3, 8, 8), np.float32)
    pixels[0, 1] = 1.0
    req = pb.ModelInferRequest(model_name="colors")
    req.inputs.add(name="input", datatype="FP32", shape=[1, 3, 8, 8]).contents.fp32_contents.extend(pixels.ravel())
    assert output_array(await s.ModelInfer(req, metadata=MD, timeout=10)).argmax() == 1
    # A typed tensor with the wrong count, and FP16 sent typed, are refused before allocation.
    bad = pb.ModelInferRequest(model_name="bytes8")
    bad.inputs.add(name="input", datatype="UINT8", shape=[2, 4]).contents.uint_contents.extend([1, 2, 3])
    half_typed = pb.ModelInferRequest(model_name="half")
    half_typed.inputs.add(name="input", datatype="FP16", shape=[1, 4]).contents.fp32_contents.extend([1, 2, 3, 4])
    for req in (bad, half_typed):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await s.ModelInfer(req, metadata=MD, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    await channel.close()


async def test_encoded_images_with_classification_extension(registry: LocalRegistry, start_worker: StartWorker) -> None:
    await registry.publish("colors", color_model())
    ws = await start_worker(["colors"])
    channel, s = stub(ws.port)
    req = pb.ModelInferRequest(model_name="colors")
    req.inputs.add(name="input", datatype="BYTES", shape=[3]).contents.bytes_contents.extend(
        [png((10, 10, 230)), png((230, 10, 10), size=40), png((10, 230, 10))]
    )
    req.outputs.add(name="logits").parameters["classification"].int64_param = 2
    resp = await s.ModelInfer(req, metadata=MD, timeout=10)
    assert resp.outputs[0].datatype == "BYTES" and list(resp.outputs[0].shape) == [3, 2]
    from fovea.oip import decode_bytes

    items = [b.decode() for b in decode_bytes(resp.raw_output_contents[0], 6)]
    assert [items[i].split(":")[2] for i in (0, 2, 4)] == ["blue", "red", "green"]
    assert float(items[0].split(":")[0]) > 0.9
    await channel.close()


async def test_metrics_endpoint(registry: LocalRegistry, start_worker: StartWorker) -> None:
    await registry.publish("colors", color_model())
    ws = await start_worker(["colors"], metrics_port=0)
    channel, s = stub(ws.port)
    await s.ModelInfer(tensor_request("colors", np.zeros((2, 3, 8, 8), np.float32)), metadata=MD, timeout=10)
    with pytest.raises(grpc.aio.AioRpcError):
        await s.ModelInfer(tensor_request("colors", np.zeros((2, 3, 8, 9), np.float32)), metadata=MD, timeout=10)
    import asyncio

    text = (
        await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{ws.metrics.port}/metrics", timeout=10).read()
        )
    ).decode()
    for name in (
        "fovea_worker_queue_seconds_bucket",
        "fovea_worker_compute_seconds_bucket",
        "fovea_worker_request_seconds_bucket",
        "fovea_worker_batch_size_bucket",
        "fovea_worker_queue_depth",
        "fovea_worker_preprocess_seconds",
    ):
        assert name in text, name
    # Raw tensors are answered by the native front (worker/native), which counts its own calls.
    assert 'fovea_worker_fast_port_requests_total{code="OK"} 1.0' in text
    assert 'fovea_worker_fast_port_requests_total{code="INVALID_ARGUMENT"} 1.0' in text
    assert 'fovea_worker_provider{model="colors",provider="CPUExecutionProvider",version="1"} 1.0' in text
    await channel.close()


def image_request(model: str, data: bytes) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="input", datatype="BYTES", shape=[1])
    req.raw_input_contents.append(len(data).to_bytes(4, "little") + data)
    return req


async def test_images_feed_uint8_and_nhwc_models_as_they_expect(
    registry: LocalRegistry, start_worker: StartWorker
) -> None:
    """A UINT8 input gets the pixels as they are; NHWC inputs get channels last. Before, every image
    model was fed normalised NCHW floats, which a cast turned into garbage for UINT8 models."""
    await registry.publish("u8hwc", pixel_mean_model(TensorProto.UINT8, "NHWC"))
    await registry.publish("u8chw", pixel_mean_model(TensorProto.UINT8, "NCHW"))
    await registry.publish("f32hwc", pixel_mean_model(TensorProto.FLOAT, "NHWC", mean=0.5, std=0.25))
    ws = await start_worker(["u8hwc", "u8chw", "f32hwc"])
    channel, s = stub(ws.port)
    meta = await s.ModelMetadata(pb.ModelMetadataRequest(name="u8hwc"), metadata=MD, timeout=10)
    assert (meta.inputs[0].datatype, list(meta.inputs[0].shape)) == ("UINT8", [-1, 8, 8, 3])
    photo = png((20, 100, 240))
    for name in ("u8hwc", "u8chw"):
        resp = await s.ModelInfer(image_request(name, photo), metadata=MD, timeout=10)
        np.testing.assert_allclose(output_array(resp), [[20, 100, 240]], atol=0.5)
    resp = await s.ModelInfer(image_request("f32hwc", photo), metadata=MD, timeout=10)
    np.testing.assert_allclose(output_array(resp), [[(c / 255 - 0.5) / 0.25 for c in (20, 100, 240)]], atol=1e-3)
    await channel.close()


async def test_uint8_model_with_normalisation_is_refused_at_registration(registry: LocalRegistry) -> None:
    with pytest.raises(grpc.RpcError) as err:
        await registry.publish("bad8", pixel_mean_model(TensorProto.UINT8, "NHWC", mean=0.5))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "UINT8 pixels" in err.value.details()


async def test_model_statistics_count_requests_samples_batches_and_failures(
    registry: LocalRegistry, start_worker: StartWorker
) -> None:
    """Triton's ModelStatistics (perf_analyzer reads it for the server-side split of a request)."""
    await registry.publish("colors", color_model())
    ws = await start_worker(["colors"])
    channel, s = stub(ws.port)
    for _ in range(5):
        await s.ModelInfer(tensor_request("colors", np.zeros((2, 3, 8, 8), np.float32)), metadata=MD, timeout=10)
    with pytest.raises(grpc.aio.AioRpcError):
        await s.ModelInfer(tensor_request("colors", np.zeros((1, 3, 4, 4), np.float32)), metadata=MD, timeout=10)
    resp = await s.ModelStatistics(pb.ModelStatisticsRequest(name="colors"), metadata=MD, timeout=10)
    (st,) = resp.model_stats
    stats = st.inference_stats
    # the warm-up batch counts as an execution too, as Triton counts its own warm-up
    assert (st.name, st.version) == ("colors", "1") and st.inference_count >= 10 and st.last_inference > 0
    assert (stats.success.count, stats.fail.count) == (5, 1)
    assert stats.queue.count >= 5 and stats.compute_infer.count == st.execution_count
    # counted per batch, as Triton does (perf_analyzer refuses unequal counts)
    assert stats.compute_input.count == stats.compute_output.count == st.execution_count
    assert sum(b.compute_infer.count for b in st.batch_stats) == st.execution_count
    assert sum(b.batch_size * b.compute_infer.count for b in st.batch_stats) == st.inference_count
    assert stats.success.ns >= stats.compute_input.ns + stats.compute_output.ns > 0
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.ModelStatistics(pb.ModelStatisticsRequest(name="nope"), metadata=MD, timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    everything = await s.ModelStatistics(pb.ModelStatisticsRequest(), metadata=MD, timeout=10)
    assert [m.name for m in everything.model_stats] == ["colors"]
    await channel.close()
