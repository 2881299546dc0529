"""Typed contents (fp32_contents and the like) are read into raw tensors by the worker's native front
(check.cc read_contents), for every call: the Python server reads none, and the refusals say what is wrong."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from inference import grpc_predict_v2_pb2 as pb
from tests.tinymodels import color_model
from tests.worker.conftest import (
    MD,
    LocalRegistry,
    StartWorker,
    colors,
    output_array,
    scrape,
    stub,
    tensor_request,
    typed_request,
)


async def test_typed_contents_are_answered_as_raw_tensors_without_the_python_server(
    registry: LocalRegistry, start_worker: StartWorker
) -> None:
    await registry.publish("colors", color_model())
    ws = await start_worker(["colors"], metrics_port=0)
    channel, s = stub(ws.port)
    x = colors(4)
    typed = await s.ModelInfer(typed_request(tensor_request("colors", x)), metadata=MD, timeout=10)
    raw = await s.ModelInfer(tensor_request("colors", x), metadata=MD, timeout=10)
    assert np.array_equal(output_array(typed), output_array(raw)) and output_array(typed).argmax(1).tolist() == [
        0,
        1,
        2,
        0,
    ]
    page = await scrape(ws.metrics.port)
    assert 'fovea_worker_fast_port_requests_total{code="OK"} 2.0' in page
    assert 'method="ModelInfer"' not in page, "the Python server answered no ModelInfer"
    await channel.close()


def _typed(datatype: str, shape: list[int], **contents: list[float]) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="colors")
    t = req.inputs.add(name="input", datatype=datatype, shape=shape)
    for field, values in contents.items():
        getattr(t.contents, field).extend(values)
    return req


@pytest.mark.parametrize(
    ("req", "why"),
    [
        (_typed("FP32", [1, 3, 8, 8], fp32_contents=[0.0] * 191), "191 values for shape [1, 3, 8, 8] (192 needed)"),
        (_typed("FP32", [1, 2**40, 2**40], fp32_contents=[0.0]), "(more than 2^40 needed)"),
        (_typed("INT8", [1, 2], int_contents=[1, 300]), "value 300 is out of range for INT8"),
        (_typed("UINT16", [1, 1], uint_contents=[70000]), "value 70000 is out of range for UINT16"),
        (_typed("FP16", [1, 1], fp32_contents=[1.0]), "FP16 data must be sent as raw_input_contents"),
        (_typed("INT32", [1, 192], int_contents=list(range(192))), "input 'input' must be FP32, got INT32"),
    ],
)
async def test_typed_contents_that_do_not_fit_are_refused_with_the_reason(
    registry: LocalRegistry, start_worker: StartWorker, req: pb.ModelInferRequest, why: str
) -> None:
    await registry.publish("colors", color_model())
    ws = await start_worker(["colors"])
    channel, s = stub(ws.port)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await s.ModelInfer(req, metadata=MD, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in (err.value.details() or ""), (
        err.value.details()
    )
    await channel.close()
