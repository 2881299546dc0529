"""Batch buckets (pad_batches): one session per batch size, batches padded up and outputs cut back.

On the CUDA provider a session whose batch size changes between runs re-plans every convolution
(bench/gpu/shape_change.py); these tests run the same code on the CPU provider with pad_batches=always.
"""

from __future__ import annotations

import asyncio
import urllib.request

import numpy as np
from onnx import TensorProto, helper

from tests.worker.conftest import MD, LocalRegistry, StartWorker, busy_input, output_array, stub, tensor_request
from tests.worker.slowmodels import busy_model
from worker.config import WorkerConfig
from worker.runtime import bucket_sizes, buckets_for, describe


def test_bucket_sizes_follow_the_provider_and_the_settings() -> None:
    config = WorkerConfig(max_batch_size=32)
    assert bucket_sizes(config, "CUDAExecutionProvider") == [1, 2, 4, 8, 16, 32]
    assert bucket_sizes(config, "TensorrtExecutionProvider") == [1, 2, 4, 8, 16, 32]
    assert bucket_sizes(config, "CPUExecutionProvider") == []
    assert bucket_sizes(WorkerConfig(max_batch_size=12), "CUDAExecutionProvider") == [1, 2, 4, 8, 12]
    # as from the env; the field's before-validator splits the text, which __init__'s signature cannot say
    chosen = WorkerConfig(max_batch_size=10, pad_batches="always", batch_buckets="4,1,16")  # type: ignore[arg-type]
    assert bucket_sizes(chosen, "CPUExecutionProvider") == [1, 4, 10]
    assert bucket_sizes(WorkerConfig(pad_batches="never"), "CUDAExecutionProvider") == []


def test_only_a_model_whose_batch_axis_is_free_everywhere_is_padded() -> None:
    config = WorkerConfig(max_batch_size=8, pad_batches="always", batch_buckets=[1, 4])
    assert buckets_for(config, describe(busy_model(), "CPUExecutionProvider")) == [1, 4, 8]
    assert buckets_for(config.model_copy(update={"pad_batches": "never"}), describe(busy_model(), "CPU")) == []
    # a model whose batch axis is fixed only ever runs that size: one session
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])],
        "fixed",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [1, 4])],
    )
    fixed = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert buckets_for(config, describe(fixed.SerializeToString(), "CPUExecutionProvider")) == []
    # nor does one with an output that is not per sample: cutting it back would return the wrong rows
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["input", "axes"], ["output"], keepdims=0)],
        "total",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, [4])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [0])],
    )
    total = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert buckets_for(config, describe(total.SerializeToString(), "CPUExecutionProvider")) == []


async def test_a_padded_worker_answers_every_request_with_its_own_rows(
    registry: LocalRegistry, start_worker: StartWorker
) -> None:
    await registry.publish("busy", busy_model())
    ws = await start_worker(["busy"], metrics_port=0, max_batch_size=8, pad_batches="always", batch_buckets=[1, 4])
    lv = ws.manager.get("busy", "")
    assert ws.native is not None
    fast = ws.native.slots[lv.slot].sessions
    assert lv.sizes == [1, 4, 8] and fast and all(s.sizes == [1, 4, 8] for s in fast)
    # each batch size runs on the first bucket that holds it
    for n, bucket in [(1, 1), (2, 4), (3, 4), (4, 4), (5, 8), (8, 8)]:
        before = {size: fast[0].bucket_runs(size) for size in (1, 4, 8)}
        fast[0].run([busy_input(1, rows=n)])
        after = {size: fast[0].bucket_runs(size) for size in (1, 4, 8)}
        assert {size: after[size] - before[size] for size in after} == {s: int(s == bucket) for s in after}, n
    assert fast[0].bucket_runs(2) == -1
    ports = [ws.port, ws.native.port]
    for port in ports:
        channel, s = stub(port)
        # 1- to 3-row requests at once, so batches of many sizes form and most need padding
        xs = [busy_input(200, rows=1 + i % 3, tag=100 * i) for i in range(40)]
        replies = await asyncio.gather(*(s.ModelInfer(tensor_request("busy", x), metadata=MD, timeout=30) for x in xs))
        for x, reply in zip(xs, replies, strict=False):
            np.testing.assert_allclose(output_array(reply), x * 2)
        await channel.close()
    page = (
        await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{ws.metrics.port}/metrics", timeout=10).read()
        )
    ).decode()
    padding = [ln for ln in page.splitlines() if ln.startswith('fovea_worker_padding_samples_total{model="busy"')]
    assert padding and float(padding[0].split()[-1]) > 0, padding


def test_a_model_is_described_from_its_file_without_a_session() -> None:
    """runtime.describe reads names, types and batch axes from the file: a model whose operator ONNX Runtime's CPU
    provider has no kernel for (here one of a domain nobody implements; on a GPU worker, FP16 convolutions) is
    described all the same, and the C++ session then says what is wrong."""
    import onnxruntime as ort
    import pytest

    graph = helper.make_graph(
        [helper.make_node("Mystery", ["pixels", "ids"], ["scores"], domain="com.example")],
        "mystery",
        [
            helper.make_tensor_value_info("pixels", TensorProto.FLOAT16, ["N", 3, 8, 8]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"]),
        ],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 10])],
        [helper.make_tensor("unused", TensorProto.FLOAT, [1], [0.0])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)], ir_version=8
    ).SerializeToString()
    with pytest.raises(Exception, match="Mystery"):
        ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    info = describe(model, "CUDAExecutionProvider")
    assert info.provider == "CUDAExecutionProvider"
    assert info.input_names == ["pixels", "ids"] and info.output_names == ["scores"]
    assert info.input_dtypes == [np.float16, np.int64] and info.dynamic_batch and info.first_input_free
