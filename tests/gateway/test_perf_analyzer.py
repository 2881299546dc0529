"""Triton's own load tool, perf_analyzer (C++), runs unchanged against a gateway (unary and
--streaming) and a worker.

It asks for the model's configuration (Triton's ModelConfig call) before it sends anything, so
this also checks the configuration Fovea reports: batch dimension, data types, batcher, instances.
"""

from __future__ import annotations

import asyncio

import grpc

from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from inference import model_config_pb2 as mc
from loadtest import perf_analyzer
from tests.gateway.conftest import GatewayFactory, Stack


# This checks compatibility, not speed: a noisy machine must not fail it on perf_analyzer's
# stability rule (3 windows within 10% of each other by default).
LOOSE = ("--stability-percentage", "1000", "--max-trials", "20")


async def test_perf_analyzer_through_gateway_and_worker(stack: Stack, gateways: GatewayFactory) -> None:
    perf_analyzer.check()  # fails, naming the missing library, when set-up did not install it
    gw = await gateways()
    secret = await asyncio.to_thread(stack.key)
    # the gateway runs in this event loop, so perf_analyzer runs on a thread
    through_gw = await asyncio.to_thread(perf_analyzer.run, f"127.0.0.1:{gw.port}", "ident", secret,
                                         concurrency=2, window_ms=500, batch=2, extra=LOOSE, timeout_s=120)
    streaming = await asyncio.to_thread(perf_analyzer.run, f"127.0.0.1:{gw.port}", "ident", secret,
                                        concurrency=2, window_ms=500, extra=("--streaming", *LOOSE), timeout_s=120)
    worker = stack.workers[0].address
    direct = await asyncio.to_thread(perf_analyzer.run, worker, "ident", stack.cluster.internal_token,
                                     concurrency=2, window_ms=500, extra=LOOSE, timeout_s=120)
    for r in (through_gw, streaming, direct):
        assert r.requests > 0 and r.infer_per_s > 0 and 0 < r.p50_us <= r.p99_us, r.output[-1500:]
    assert "Batch size: 2" in through_gw.output
    # against a worker it also prints the worker's own split of a request (Triton's ModelStatistics)
    assert "Server:" in direct.output and "Inference count:" in direct.output, direct.output[-1500:]
    # the --streaming run really went over Triton's ModelStreamInfer call (counted when a stream ends,
    # which the gateway may see a moment after perf_analyzer has exited)
    def streams() -> float:
        return sum(sample.value for metric in gw.metrics.registry.collect() for sample in metric.samples
                   if sample.name == "fovea_gateway_requests_total" and sample.labels["method"] == "ModelStreamInfer")

    for _ in range(100):
        if streams() >= 1:
            break
        await asyncio.sleep(0.05)
    assert streams() >= 1


async def test_model_config_reports_what_the_worker_runs(stack: Stack) -> None:
    md = (("authorization", f"Bearer {stack.cluster.internal_token}"),)
    async with grpc.aio.insecure_channel(stack.workers[0].address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        cfg = (await stub.ModelConfig(pb.ModelConfigRequest(name="ident"), metadata=md, timeout=10)).config
        with_no_token = stub.ModelConfig(pb.ModelConfigRequest(name="ident"), timeout=10)
        try:
            await with_no_token
            raise AssertionError("a worker answered ModelConfig without the internal token")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAUTHENTICATED
        try:
            await stub.ModelConfig(pb.ModelConfigRequest(name="nope"), metadata=md, timeout=10)
            raise AssertionError("ModelConfig answered for a model the worker does not serve")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
    assert cfg.name == "ident" and cfg.backend == "onnxruntime"
    assert cfg.max_batch_size == 32  # the worker's default max_batch_size
    assert [(t.name, t.data_type, list(t.dims)) for t in cfg.input] == [("input", mc.TYPE_FP32, [4])]
    assert cfg.HasField("dynamic_batching")
    assert [(g.count, g.kind) for g in cfg.instance_group] == [(1, mc.ModelInstanceGroup.KIND_CPU)]
