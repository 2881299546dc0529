"""Requests a hostile or broken client sends, against the worker's one port (its native front, which checks
raw tensors itself and relays the rest to the worker's Python server): every number in a request is bounded
before it is used, a bad call gets INVALID_ARGUMENT and the worker goes on serving; a call the worker refuses
without running it says so (trailing `fovea-unserved: 1`)."""

from __future__ import annotations

import os

import grpc
import numpy as np
import pytest
from onnx import TensorProto, helper

from inference import grpc_predict_v2_pb2 as pb
from tests.tinymodels import color_model
from tests.worker.conftest import MD, LocalRegistry, StartWorker, output_array, stub, tensor_request
from worker.server import WorkerServer

WIDTH = 3  # color_model's logits: red, green, blue
INVALID = grpc.StatusCode.INVALID_ARGUMENT


def _colors(n: int) -> np.ndarray:
    x = np.zeros((n, 3, 8, 8), np.float32)
    for i in range(n):
        x[i, i % 3] = 1.0
    return x


def _model(name: str, out_type: int, out_shape: list[str | int]) -> bytes:
    """Cast of an FP32 [N, W] input to out_type, declared as out_shape."""
    graph = helper.make_graph(
        [helper.make_node("Cast", ["input"], ["output"], to=out_type)],
        name,
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", "W"])],
        [helper.make_tensor_value_info("output", out_type, out_shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


async def _worker(registry: LocalRegistry, start_worker: StartWorker, *models: tuple[str, bytes]) -> WorkerServer:
    for name, data in models:
        await registry.publish(name, data)
    ws = await start_worker([name for name, _ in models], max_batch_size=4)
    assert ws.native is not None
    return ws


def _top(model: str, x: np.ndarray, k: pb.InferParameter | int, output: str = "logits") -> pb.ModelInferRequest:
    req = tensor_request(model, x)
    param = req.outputs.add(name=output).parameters["classification"]
    if isinstance(k, int):
        param.int64_param = k
    else:
        param.CopyFrom(k)
    return req


async def _refused(call: object, req: pb.ModelInferRequest) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(req, metadata=MD, timeout=10)  # type: ignore[operator]
    return err.value


async def _computed(f: object, model: str) -> int:
    """Batches this worker computed for the model, on both ports."""
    stats = await f.ModelStatistics(pb.ModelStatisticsRequest(name=model), metadata=MD, timeout=10)  # type: ignore[attr-defined]
    return sum(s.execution_count for s in stats.model_stats)


async def test_classification_k_out_of_range_is_refused_and_the_worker_keeps_serving(
    registry: LocalRegistry, start_worker: StartWorker
) -> None:
    """k = 2^31 crashed the fast port (int(k) went negative in top_k and partial_sort wrote out of bounds)."""
    ws = await _worker(registry, start_worker, ("colors", color_model()))
    channel, f = stub(ws.port)
    pid = os.getpid()  # the worker runs in this process: it died with it
    before = await _computed(f, "colors")
    for k in (2**31, 2**63 - 1, 0, -1, -(2**63), WIDTH + 1, 2**32 + 2):
        err = await _refused(f.ModelInfer, _top("colors", _colors(2), k))
        assert err.code() == INVALID, (k, err.code(), err.details())
        assert "classification" in err.details() and str(k) in err.details(), err.details()
        if k > WIDTH:
            assert f"at most {WIDTH}" in err.details(), err.details()
        # the next call is answered as usual, by the same process
        plain = await f.ModelInfer(tensor_request("colors", _colors(1)), metadata=MD, timeout=10)
        assert output_array(plain).argmax() == 0 and os.getpid() == pid
    assert await _computed(f, "colors") == before + 7, "the refused calls were never computed"
    await channel.close()


async def test_classification_k_equal_to_the_width_answers_every_class(
    registry: LocalRegistry, start_worker: StartWorker
) -> None:
    ws = await _worker(registry, start_worker, ("colors", color_model()))
    channel, f = stub(ws.port)
    resp = await f.ModelInfer(_top("colors", _colors(2), WIDTH), metadata=MD, timeout=10)
    assert (resp.outputs[0].datatype, list(resp.outputs[0].shape)) == ("BYTES", [2, WIDTH])
    raw = resp.raw_output_contents[0]
    items, pos = [], 0
    while pos < len(raw):
        size = int.from_bytes(raw[pos : pos + 4], "little")
        items.append(raw[pos + 4 : pos + 4 + size].decode())
        pos += 4 + size
    assert [i.split(":")[2] for i in items] == ["red", "green", "blue", "green", "red", "blue"], items
    await channel.close()


async def test_k_past_a_dynamic_output_width_is_refused_after_compute(
    registry: LocalRegistry, start_worker: StartWorker
) -> None:
    """An output declared [N, W] has no width before compute: k is checked against the computed one."""
    ws = await _worker(registry, start_worker, ("wide", _model("wide", TensorProto.FLOAT, ["N", "W"])))
    channel, f = stub(ws.port)
    x = np.arange(10, dtype=np.float32).reshape(2, 5)
    for k in (6, 2**31, 2**63 - 1):
        err = await _refused(f.ModelInfer, _top("wide", x, k, output="output"))
        assert err.code() == INVALID and "at most 5" in err.details(), (k, err.details())
    resp = await f.ModelInfer(_top("wide", x, 5, output="output"), metadata=MD, timeout=10)
    assert list(resp.outputs[0].shape) == [2, 5]
    await channel.close()


async def test_classification_needs_an_int64_on_a_floating_point_output(
    registry: LocalRegistry, start_worker: StartWorker
) -> None:
    ws = await _worker(
        registry,
        start_worker,
        ("colors", color_model()),
        ("ints", _model("ints", TensorProto.INT64, ["N", 4])),
    )
    channel, f = stub(ws.port)
    before = await _computed(f, "ints")
    cases = [
        (_top("colors", _colors(1), pb.InferParameter(string_param="2")), "int64_param"),
        (_top("colors", _colors(1), pb.InferParameter(double_param=1e300)), "int64_param"),
        (_top("colors", _colors(1), pb.InferParameter(double_param=float("nan"))), "int64_param"),
        (_top("colors", _colors(1), pb.InferParameter(bool_param=True)), "int64_param"),
        (_top("ints", np.ones((1, 4), np.float32), 2, output="output"), "INT64"),
    ]
    for req, words in cases:
        err = await _refused(f.ModelInfer, req)
        assert err.code() == INVALID and words in err.details(), (words, err.details())
    assert await _computed(f, "ints") == before, "refused before compute"
    await channel.close()


async def test_outputs_are_requested_at_most_once(registry: LocalRegistry, start_worker: StartWorker) -> None:
    """A request cannot make the answer bigger than the model's outputs (each copies a whole output)."""
    ws = await _worker(registry, start_worker, ("colors", color_model()))
    channel, f = stub(ws.port)
    before = await _computed(f, "colors")
    twice = tensor_request("colors", _colors(1))
    twice.outputs.add(name="logits")
    twice.outputs.add(name="logits")
    many = tensor_request("colors", _colors(1))
    for _ in range(1000):
        many.outputs.add(name="logits")
    for req, words in ((twice, "2 requested"), (many, "1000 requested")):
        err = await _refused(f.ModelInfer, req)
        assert err.code() == INVALID and words in err.details(), (words, err.details())
    assert await _computed(f, "colors") == before
    await channel.close()


def _unserved(err: grpc.aio.AioRpcError) -> bool:
    return ("fovea-unserved", "1") in tuple(err.trailing_metadata() or ())


async def test_deliberate_refusals_are_marked_unserved(registry: LocalRegistry, start_worker: StartWorker) -> None:
    """A gateway may retry elsewhere what a worker never ran, not what dropped while it ran."""
    ws = await _worker(registry, start_worker, ("colors", color_model()))
    assert ws.native is not None
    channel, f = stub(ws.port)
    # Answers that are not refusals of that kind carry no mark.
    for req in (_top("colors", _colors(1), 0), tensor_request("nope", _colors(1))):
        err = await _refused(f.ModelInfer, req)
        assert err.code() in (INVALID, grpc.StatusCode.NOT_FOUND) and not _unserved(err), err
    # A version that failed to load, answered by the Python server (a version the front does not hold is
    # relayed there; the failure is set here, not caused): its mark survives the relay.
    ws.manager.errors[("colors", 9)] = "a load failure set by the test"
    err = await _refused(f.ModelInfer, tensor_request("colors", _colors(1), version="9"))
    assert err.code() == grpc.StatusCode.UNAVAILABLE and _unserved(err), (err.code(), err.trailing_metadata())
    del ws.manager.errors[("colors", 9)]
    # Draining: the worker takes no new calls.
    ws.servicer.accepting = False
    ws.native.set_accepting(False)
    err = await _refused(f.ModelInfer, tensor_request("colors", _colors(1)))
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "draining" in err.details(), err
    assert _unserved(err), err.trailing_metadata()
    ws.servicer.accepting = True
    ws.native.set_accepting(True)
    await f.ModelInfer(tensor_request("colors", _colors(1)), metadata=MD, timeout=10)
    await channel.close()


async def test_a_shape_of_a_million_dimensions_gets_a_short_answer(
    registry: LocalRegistry, start_worker: StartWorker
) -> None:
    """The refusal quotes the start of the shape, not all of it (a status message has to fit in a header)."""
    ws = await _worker(registry, start_worker, ("colors", color_model()))
    channel, f = stub(ws.port)
    req = tensor_request("colors", _colors(1))
    req.inputs[0].shape[:] = [1] * 1_000_000
    err = await _refused(f.ModelInfer, req)
    assert err.code() == INVALID and "must have shape" in err.details() and len(err.details()) < 200, err.details()
    await channel.close()


NOT_A_REQUEST = "the request is not a valid protobuf message for this method"


def _raw_infer(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable:
    """ModelInfer on bytes as they are (no serializer): what a client with another schema, or none, sends."""
    return channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")


async def test_bytes_that_are_no_request_get_invalid_argument(
    registry: LocalRegistry, start_worker: StartWorker
) -> None:
    """The fast port answered bytes that do not parse (0x0a: a field with no length) with a bare UNIMPLEMENTED,
    gRPC C++'s answer; both ports say INVALID_ARGUMENT in the same words, after authentication."""
    ws = await _worker(registry, start_worker, ("colors", color_model()))
    channel, f = stub(ws.port)
    infer = _raw_infer(channel)
    valid = tensor_request("colors", _colors(1)).SerializeToString()
    for data in (b"\x0a", b"\xb9", b"\xff" * 16, b"\x0a\x05col", valid[:-1], valid + b"\x0a"):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await infer(data, metadata=MD, timeout=10)
        assert (err.value.code(), err.value.details()) == (INVALID, NOT_A_REQUEST), (data[:8], err.value)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await infer(data, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (data[:8], err.value)
    resp = pb.ModelInferResponse.FromString(await infer(valid, metadata=MD, timeout=10))
    assert output_array(resp).argmax() == 0, "the worker goes on serving"
    await channel.close()


async def test_invalid_utf8_names_do_not_flood_the_log(
    registry: LocalRegistry, start_worker: StartWorker, capfd: pytest.CaptureFixture[str]
) -> None:
    """libprotobuf logged an ERROR line to stderr for every request with a name that is not UTF-8 (the worker runs
    in this process, so its stderr is this test's): any caller could flood the worker's log. Each such call is
    still refused (the bytes do not parse as the proto3 message)."""
    ws = await _worker(registry, start_worker, ("colors", color_model()))
    channel, f = stub(ws.port)
    infer = _raw_infer(channel)
    nameless = tensor_request("", _colors(1)).SerializeToString()
    bad_name = b"\x0a\x07col\xffors" + nameless  # field 1 (model_name): "col\xffors"
    capfd.readouterr()
    answers = set()
    for _ in range(200):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await infer(bad_name, metadata=MD, timeout=10)
        answers.add((err.value.code(), err.value.details()))
    logged = [line for line in capfd.readouterr().err.splitlines() if "UTF-8" in line]
    assert len(logged) <= 2, f"{len(logged)} lines, the first: {logged[:1]}"
    assert answers == {(INVALID, NOT_A_REQUEST)}, answers
    await f.ModelInfer(tensor_request("colors", _colors(1)), metadata=MD, timeout=10)
    await channel.close()
