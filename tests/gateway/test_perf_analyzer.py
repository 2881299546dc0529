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
    through_gw = await asyncio.to_thread(
        perf_analyzer.run,
        f"127.0.0.1:{gw.port}",
        "ident",
        secret,
        concurrency=2,
        window_ms=500,
        batch=2,
        extra=LOOSE,
        timeout_s=120,
    )
    streaming = await asyncio.to_thread(
        perf_analyzer.run,
        f"127.0.0.1:{gw.port}",
        "ident",
        secret,
        concurrency=2,
        window_ms=500,
        extra=("--streaming", *LOOSE),
        timeout_s=120,
    )
    worker = stack.workers[0].address
    direct = await asyncio.to_thread(
        perf_analyzer.run,
        worker,
        "ident",
        stack.cluster.worker_call_token,
        concurrency=2,
        window_ms=500,
        extra=LOOSE,
        timeout_s=120,
    )
    # and against a worker's native fast port, which answers the metadata, config and statistics calls it makes
    fast_address = next(
        w.fast_address for w in await asyncio.to_thread(stack.rc.list_workers, "ident") if w.address == worker
    )
    fast = await asyncio.to_thread(
        perf_analyzer.run,
        fast_address,
        "ident",
        stack.cluster.worker_call_token,
        concurrency=2,
        window_ms=500,
        batch=2,
        extra=LOOSE,
        timeout_s=120,
    )
    for r in (through_gw, streaming, direct, fast):
        assert r.requests > 0 and r.infer_per_s > 0 and 0 < r.p50_us <= r.p99_us, r.output[-1500:]
    assert "Batch size: 2" in through_gw.output
    # it also prints the server side's split of a request (Triton's ModelStatistics): a worker's own,
    # or through a gateway the sum over the workers
    for r in (direct, through_gw, fast):
        assert "Server:" in r.output and "Inference count:" in r.output, r.output[-1500:]

    # the --streaming run really went over Triton's ModelStreamInfer call (counted when a stream ends,
    # which the gateway may see a moment after perf_analyzer has exited)
    def streams() -> float:
        return sum(
            sample.value
            for metric in gw.metrics.registry.collect()
            for sample in metric.samples
            if sample.name == "fovea_gateway_requests_total" and sample.labels["method"] == "ModelStreamInfer"
        )

    for _ in range(100):
        if streams() >= 1:
            break
        await asyncio.sleep(0.05)
    assert streams() >= 1


async def test_model_config_reports_what_the_worker_runs(stack: Stack) -> None:
    md = (("authorization", f"Bearer {stack.cluster.worker_call_token}"),)
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


async def test_gateway_statistics_sum_the_workers_and_follow_the_key(stack: Stack, gateways: GatewayFactory) -> None:
    """ModelStatistics through the gateway adds up every worker's figures for the model."""
    gw = await gateways()
    md = (("authorization", f"Bearer {stack.cluster.worker_call_token}"),)
    req = pb.ModelStatisticsRequest(name="ident")

    async def per_worker() -> list[pb.ModelStatistics]:
        out = []
        for w in stack.workers:
            async with grpc.aio.insecure_channel(w.address) as channel:
                resp = await pb_grpc.GRPCInferenceServiceStub(channel).ModelStatistics(req, metadata=md, timeout=10)
                out += list(resp.model_stats)
        return out

    secret = await asyncio.to_thread(stack.key)
    only_colors = await asyncio.to_thread(stack.key, model_patterns=["colors"])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gw.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        infer = pb.ModelInferRequest(model_name="ident")
        infer.inputs.add(name="input", datatype="FP32", shape=[1, 4])
        infer.raw_input_contents.append(bytes(16))
        for _ in range(20):  # spread over both workers by the gateway's routing
            await stub.ModelInfer(infer, metadata=(("authorization", f"Bearer {secret}"),), timeout=10)
        before = await per_worker()
        total = await stub.ModelStatistics(req, metadata=(("authorization", f"Bearer {secret}"),), timeout=10)
        after = await per_worker()
        everything = await stub.ModelStatistics(
            pb.ModelStatisticsRequest(), metadata=(("authorization", f"Bearer {only_colors}"),), timeout=10
        )
        try:
            await stub.ModelStatistics(req, metadata=(("authorization", f"Bearer {only_colors}"),), timeout=10)
            raise AssertionError("a key limited to colors read ident's statistics")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.PERMISSION_DENIED
    (st,) = total.model_stats
    assert len(before) == 2 and before == after  # nothing ran in between
    assert st.inference_count == sum(w.inference_count for w in before)
    assert st.inference_stats.success.count == sum(w.inference_stats.success.count for w in before) >= 20
    assert st.inference_stats.queue.ns == sum(w.inference_stats.queue.ns for w in before)
    assert sum(b.compute_infer.count for b in st.batch_stats) == st.execution_count
    assert {m.name for m in everything.model_stats} == {"colors"}
