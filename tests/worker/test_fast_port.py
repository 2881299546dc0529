"""The worker's one port, its native front (worker/native/front.cc), against in-process workers: raw tensors
answered in C++ get exactly the answers the same calls get as typed contents (which the front reads itself),
refusals carry the right status, and its calls show in ModelStatistics and metrics."""

from __future__ import annotations

import asyncio
import pathlib
import urllib.request

import grpc
import numpy as np
import pytest

from inference import grpc_predict_v2_pb2 as pb
from tests.tinymodels import color_model
from tests.worker.conftest import (
    MD,
    LocalRegistry,
    StartWorker,
    busy_input,
    output_array,
    stub,
    tensor_request,
    typed_request,
)
from tests.worker.slowmodels import busy_model
from worker.server import WorkerServer


def _colors(n: int) -> np.ndarray:
    """n 8x8 images, each dominated by channel i % 3."""
    x = np.zeros((n, 3, 8, 8), np.float32)
    for i in range(n):
        x[i, i % 3] = 1.0 + 0.1 * i
    return x


async def _colors_worker(
    start_worker: StartWorker, registry: LocalRegistry, **fields: object
) -> tuple[WorkerServer, int]:
    await registry.publish("colors", color_model())
    ws = await start_worker(["colors"], metrics_port=0, **fields)
    assert ws.native.port == ws.port, "the native front is the worker's one port"
    return ws, ws.port


async def test_raw_tensors_and_typed_contents_get_the_same_answers(
    registry: LocalRegistry, start_worker: StartWorker
) -> None:
    ws, port = await _colors_worker(start_worker, registry)
    cf, f = stub(port)
    x = _colors(5)
    plain = tensor_request("colors", x)
    plain.id = "req-7"
    top2 = tensor_request("colors", x)
    top2.outputs.add(name="logits").parameters["classification"].int64_param = 2
    for req in (plain, top2):
        native_before = sum(ws.native.codes())
        a = await f.ModelInfer(typed_request(req), metadata=MD, timeout=10)  # typed: the front reads the contents
        b = await f.ModelInfer(req, metadata=MD, timeout=10)  # answered in C++
        assert sum(ws.native.codes()) == native_before + 2, "both went through the one native queue"
        assert (b.model_name, b.model_version, b.id) == (a.model_name, a.model_version, a.id)
        assert [(o.name, o.datatype, list(o.shape)) for o in b.outputs] == [
            (o.name, o.datatype, list(o.shape)) for o in a.outputs
        ]
        if req is plain:
            np.testing.assert_allclose(output_array(b), output_array(a), rtol=1e-6)
            assert b.id == "req-7"
        else:
            assert list(b.raw_output_contents) == list(a.raw_output_contents)  # "score:index:label", byte for byte
            assert b"red" in b.raw_output_contents[0]
    # A pinned version is served too; the metadata and config calls Triton's tools make before loading
    # (relayed to Python, which made them).
    v = await f.ModelInfer(tensor_request("colors", x, version="1"), metadata=MD, timeout=10)
    assert v.model_version == "1"
    meta = await f.ModelMetadata(pb.ModelMetadataRequest(name="colors"), metadata=MD, timeout=10)
    assert meta.name == "colors" and [t.name for t in meta.inputs] == ["input"]
    config = await f.ModelConfig(pb.ModelConfigRequest(name="colors"), metadata=MD, timeout=10)
    assert config.config.name == "colors"
    assert (await f.ModelReady(pb.ModelReadyRequest(name="colors"), metadata=MD, timeout=10)).ready
    assert not (await f.ModelReady(pb.ModelReadyRequest(name="nope"), metadata=MD, timeout=10)).ready
    assert (await f.ServerReady(pb.ServerReadyRequest(), metadata=MD, timeout=10)).ready
    assert (await f.ServerLive(pb.ServerLiveRequest(), metadata=MD, timeout=10)).live
    assert (await f.ServerMetadata(pb.ServerMetadataRequest(), metadata=MD, timeout=10)).name
    await cf.close()


async def test_refusals_carry_the_right_status(registry: LocalRegistry, start_worker: StartWorker) -> None:
    ws, port = await _colors_worker(start_worker, registry, max_batch_size=4)
    channel, f = stub(port)
    x = _colors(1)
    no_output = tensor_request("colors", x)
    no_output.outputs.add(name="probs")
    bad_k = tensor_request("colors", x)
    bad_k.outputs.add(name="logits").parameters["classification"].int64_param = 0
    cases = [
        ((), tensor_request("colors", x), grpc.StatusCode.UNAUTHENTICATED, "missing credentials"),
        (
            (("authorization", "Bearer wrong"),),
            tensor_request("colors", x),
            grpc.StatusCode.UNAUTHENTICATED,
            "invalid internal credentials",
        ),
        ((("authorization", "Basic abc"),), tensor_request("colors", x), grpc.StatusCode.UNAUTHENTICATED, "malformed"),
        (MD, tensor_request("nope", x), grpc.StatusCode.NOT_FOUND, "not served"),
        (MD, tensor_request("colors", x, version="9"), grpc.StatusCode.NOT_FOUND, "v9 is not loaded"),
        (MD, tensor_request("colors", np.zeros((1, 3, 4, 4), np.float32)), grpc.StatusCode.INVALID_ARGUMENT, "shape"),
        (
            MD,
            tensor_request("colors", x.astype(np.float16), datatype="FP16"),
            grpc.StatusCode.INVALID_ARGUMENT,
            "must be FP32",
        ),
        (MD, tensor_request("colors", x, name="pixels"), grpc.StatusCode.INVALID_ARGUMENT, "missing input 'input'"),
        (MD, tensor_request("colors", _colors(5)), grpc.StatusCode.INVALID_ARGUMENT, "exceeds max_batch_size 4"),
        (MD, no_output, grpc.StatusCode.INVALID_ARGUMENT, "no output 'probs'"),
        (MD, bad_k, grpc.StatusCode.INVALID_ARGUMENT, "positive integer"),
    ]
    short = tensor_request("colors", x)
    short.raw_input_contents[0] = short.raw_input_contents[0][:-1]
    cases.append((MD, short, grpc.StatusCode.INVALID_ARGUMENT, "needs 768"))
    for md, req, code, words in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await f.ModelInfer(req, metadata=md, timeout=10)
        assert err.value.code() == code and words in err.value.details(), (words, err.value.details())
    # Every call needs the internal token, relayed ones too.
    for call, req in (
        (f.ModelMetadata, pb.ModelMetadataRequest(name="colors")),
        (f.ModelConfig, pb.ModelConfigRequest(name="colors")),
        (f.ModelStatistics, pb.ModelStatisticsRequest()),
        (f.ModelReady, pb.ModelReadyRequest(name="colors")),
        (f.ServerReady, pb.ServerReadyRequest()),
        (f.ServerLive, pb.ServerLiveRequest()),
        (f.ServerMetadata, pb.ServerMetadataRequest()),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call(req, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, call
    # Still serving after all of it.
    assert output_array(await f.ModelInfer(tensor_request("colors", x), metadata=MD, timeout=10)).argmax() == 0
    await channel.close()


async def test_calls_show_in_statistics_and_metrics(registry: LocalRegistry, start_worker: StartWorker) -> None:
    ws, port = await _colors_worker(start_worker, registry)
    cf, f = stub(port)
    for _ in range(3):
        await f.ModelInfer(tensor_request("colors", _colors(2)), metadata=MD, timeout=10)
    await f.ModelInfer(typed_request(tensor_request("colors", _colors(1))), metadata=MD, timeout=10)
    with pytest.raises(grpc.aio.AioRpcError):
        await f.ModelInfer(tensor_request("colors", _colors(1)), timeout=10)
    lv = ws.manager.loaded[("colors", 1)]
    queued = ws.manager.fast_statistics(lv)  # the one native queue: raw tensors and the call Python decoded
    assert queued.inference_stats.success.count == 4 and queued.inference_count == 7
    assert queued.execution_count == queued.inference_stats.compute_infer.count == 4
    assert {b.batch_size for b in queued.batch_stats} == {1, 2}
    # ModelStatistics (answered by Python) reports them once.
    both = (await f.ModelStatistics(pb.ModelStatisticsRequest(name="colors"), metadata=MD, timeout=10)).model_stats[0]
    assert both.inference_stats.success.count == 3 + 1
    assert both.inference_count == 6 + 1
    page = await asyncio.to_thread(
        lambda: urllib.request.urlopen(f"http://127.0.0.1:{ws.metrics.port}/metrics", timeout=10).read().decode()
    )
    assert 'fovea_worker_fast_port_requests_total{code="OK"} 4.0' in page
    assert 'fovea_worker_fast_port_requests_total{code="UNAUTHENTICATED"} 1.0' in page
    # the native queue's OK calls by total time, in the buckets of Python's fovea_worker_request_seconds
    assert 'fovea_worker_fast_port_request_seconds_count{model="colors",version="1"} 4.0' in page
    assert 'fovea_worker_fast_port_request_seconds_bucket{le="10.0",model="colors",version="1"} 4.0' in page
    main_les = {
        ln.split('le="')[1].split('"')[0]
        for ln in page.splitlines()
        if ln.startswith("fovea_worker_request_seconds_bucket")
    }
    fast_les = {
        ln.split('le="')[1].split('"')[0]
        for ln in page.splitlines()
        if ln.startswith("fovea_worker_fast_port_request_seconds_bucket")
    }
    assert fast_les == main_les and len(main_les) == 17
    total = float(
        next(ln.split()[-1] for ln in page.splitlines() if ln.startswith("fovea_worker_fast_port_request_seconds_sum"))
    )
    assert 0 < total < 3 * 10

    # The native queue's three batches of 2 are in the batch-size histogram at once (its metrics are
    # recorded off the answer path and flushed before every scrape).
    def bucket(le: str) -> float:
        return float(
            next(
                ln.split()[-1]
                for ln in page.splitlines()
                if ln.startswith(f'fovea_worker_batch_size_bucket{{le="{le}",model="colors",version="1"}}')
            )
        )

    assert bucket("2.0") - bucket("1.0") == 3
    # Heartbeats advertise the one port, as fast_address too (for gateways built before the ports merged).
    status = ws.status()
    assert status.fast_address == status.address == f"127.0.0.1:{port}"
    await cf.close()


async def test_fast_port_batches_concurrent_calls_up_to_max_batch_size(
    registry: LocalRegistry, start_worker: StartWorker
) -> None:
    await registry.publish("busy", busy_model())
    ws = await start_worker(["busy"], max_batch_size=4, max_queue_delay_us=20_000)
    channel, f = stub(ws.native.port)

    async def one(i: int) -> None:
        x = busy_input(200, rows=1 + i % 2, tag=10 * i)
        resp = await f.ModelInfer(tensor_request("busy", x), metadata=MD, timeout=30)
        np.testing.assert_allclose(output_array(resp)[:, 1], 2 * x[:, 1])  # each call gets its own rows back

    await asyncio.gather(*(one(i) for i in range(24)))
    st = ws.manager.fast_statistics(ws.manager.loaded[("busy", 1)])  # the native front's batches alone
    sizes = {b.batch_size for b in st.batch_stats}
    assert max(sizes) <= 4 and 4 in sizes, sizes  # the queue delay lets batches fill, never past the limit
    assert st.inference_count == 36
    await channel.close()


async def test_model_settings_give_a_model_its_own_instances(
    registry: LocalRegistry, start_worker: StartWorker
) -> None:
    await registry.publish("colors", color_model())
    ws = await start_worker(["colors"], model_settings={"colors": {"instances": 2, "intra_op_threads": 1}})
    channel, f = stub(ws.native.port)
    config = (await f.ModelConfig(pb.ModelConfigRequest(name="colors"), metadata=MD, timeout=10)).config
    assert [g.count for g in config.instance_group] == [2]
    assert len(ws.native.slots[ws.manager.loaded[("colors", 1)].slot].threads) == 2  # one batch loop each
    results = await asyncio.gather(
        *(f.ModelInfer(tensor_request("colors", _colors(1)), metadata=MD, timeout=10) for _ in range(16))
    )
    assert all(output_array(r).argmax() == 0 for r in results)
    await channel.close()


def _any_width_model() -> bytes:
    """Identity on [N, W] with W free, so that a request chooses every dimension but the batch's bound."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])],
        "anywidth",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", "W"])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", "W"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


async def test_shapes_whose_size_wraps_around_are_refused(registry: LocalRegistry, start_worker: StartWorker) -> None:
    """Dimensions whose product wraps a 64-bit integer around to the bytes actually sent: refused, never
    computed. (4 bytes x 2 x 2^63 wraps to 0, and this request sends 0 bytes.)"""
    await registry.publish("wide", _any_width_model())
    ws = await start_worker(["wide"], max_batch_size=4)
    channel, f = stub(ws.native.port)
    ok = tensor_request("wide", np.ones((2, 5), np.float32))
    assert output_array(await f.ModelInfer(ok, metadata=MD, timeout=10)).shape == (2, 5)
    for shape, raw in (([2, 1 << 62], b""), ([2, 1 << 61], b""), ([1 << 33, 1], b"\0" * 4), ([2, -2], b"")):
        req = pb.ModelInferRequest(model_name="wide")
        req.inputs.add(name="input", datatype="FP32", shape=shape)
        req.raw_input_contents.append(raw)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await f.ModelInfer(req, metadata=MD, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (shape, err.value.details())
    st = ws.manager.fast_statistics(ws.manager.loaded[("wide", 1)])  # the native front's batches alone
    assert st.execution_count == 1  # only the good request was computed
    await channel.close()


async def test_a_lone_batch_runs_on_the_alone_session_and_batches_under_load_on_the_instances(
    registry: LocalRegistry, start_worker: StartWorker
) -> None:
    await registry.publish("busy", busy_model())
    ws = await start_worker(
        ["busy"], max_batch_size=2, model_settings={"busy": {"instances": 2, "intra_op_threads": 1, "alone_threads": 2}}
    )
    lv = ws.manager.loaded[("busy", 1)]
    native = ws.native.slots[lv.slot].sessions  # the C++ loops' sessions: two instances, then the alone one
    assert len(native) == 3
    before = [s.runs for s in native]

    def ran() -> list[str]:
        return [f"instance{i}" for i, s in enumerate(native[:2]) if s.runs > before[i]]

    channel, f = stub(ws.native.port)
    for _ in range(3):  # one at a time: every batch is alone
        await f.ModelInfer(tensor_request("busy", busy_input(100)), metadata=MD, timeout=30)
    assert ran() == [], "a lone batch runs on the alone session, not on an instance"
    assert native[2].runs == before[2] + 3
    await asyncio.gather(
        *(f.ModelInfer(tensor_request("busy", busy_input(3000, tag=i)), metadata=MD, timeout=60) for i in range(12))
    )
    assert {"instance0", "instance1"} <= set(ran()), ran()  # under load both one-thread instances compute
    await channel.close()


def _lookup_model() -> bytes:
    """output = table[int(input)] on [N, 4], table = 0..9: ONNX Runtime fails on an index past 9 (a bad
    batch that passes every check made before compute)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["input"], ["index"], to=TensorProto.INT64),
            helper.make_node("Gather", ["table", "index"], ["output"], axis=0),
        ],
        "lookup",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor("table", TensorProto.FLOAT, [10], [float(i) for i in range(10)])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


async def test_a_batch_that_fails_in_onnx_runtime_fails_only_its_calls(
    registry: LocalRegistry, start_worker: StartWorker, caplog: pytest.LogCaptureFixture
) -> None:
    await registry.publish("lookup", _lookup_model())
    ws = await start_worker(["lookup"], max_batch_size=4)
    channel, f = stub(ws.native.port)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await f.ModelInfer(tensor_request("lookup", np.full((2, 4), 12, np.float32)), metadata=MD, timeout=10)
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "model failed on this batch" in err.value.details() and "12" in err.value.details(), err.value.details()
    ok = await f.ModelInfer(tensor_request("lookup", np.full((1, 4), 3, np.float32)), metadata=MD, timeout=10)
    np.testing.assert_array_equal(output_array(ok), np.full((1, 4), 3, np.float32))
    ws.native.flush_metrics()  # the C++ loop's failures are logged from there
    assert any("failed on the fast port" in r.getMessage() for r in caplog.records)
    await channel.close()


async def test_without_onnx_runtimes_c_library_the_worker_refuses_to_start(
    registry: LocalRegistry, start_worker: StartWorker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No silent second path: without ONNX Runtime's C library there is no C++ batch loop, so no worker (it
    used to run the batches in Python instead)."""
    import worker.fast_port

    monkeypatch.setattr(worker.fast_port, "ort_library", lambda: None)  # as with a build that ships none
    with pytest.raises(RuntimeError) as err:
        await start_worker([])
    assert "cannot run models on ONNX Runtime's C API" in str(err.value), err.value
    assert "ships no libonnxruntime.so" in str(err.value), err.value


async def test_c_api_sessions_take_the_workers_session_options(
    registry: LocalRegistry, start_worker: StartWorker
) -> None:
    """The options that are not the defaults reach the C++ loop's sessions, which still answer right."""
    ws, port = await _colors_worker(
        start_worker,
        registry,
        cpu_mem_arena=False,
        graph_optimization="disable",
        thread_spinning=False,
        spin_only_in_run=False,
    )
    lv = ws.manager.loaded[("colors", 1)]
    assert len(ws.native.slots[lv.slot].sessions) == 1
    cf, f = stub(port)
    req = tensor_request("colors", _colors(3))
    a = await f.ModelInfer(typed_request(req), metadata=MD, timeout=10)  # decoded by Python
    b = await f.ModelInfer(req, metadata=MD, timeout=10)
    np.testing.assert_allclose(output_array(b), output_array(a), rtol=1e-6)
    assert list(output_array(b).argmax(axis=1)) == [0, 1, 2]
    await cf.close()


async def test_batch_metrics_flush_past_a_failing_hook(
    registry: LocalRegistry, start_worker: StartWorker, caplog: pytest.LogCaptureFixture
) -> None:
    """The C++ loops only keep their batches' figures; a hook that raises is logged and the batches after it
    still get recorded, so the records cannot pile up."""
    await registry.publish("busy", busy_model())
    ws = await start_worker(["busy"], max_batch_size=1)
    slot = ws.native.slots[ws.manager.loaded[("busy", 1)].slot]
    ws.native.flush_metrics()  # the warm-up's records, if any
    seen: list[tuple[int, int]] = []

    def hook(samples: int, waits_s: list[float], compute_s: float, run_samples: int) -> None:
        seen.append((samples, run_samples))
        if len(seen) == 1:
            raise RuntimeError("metric backend gone")

    slot.on_batch = hook
    channel, f = stub(ws.native.port)
    for _ in range(2):
        await f.ModelInfer(tensor_request("busy", busy_input(10)), metadata=MD, timeout=30)
    ws.native.flush_metrics()
    assert seen == [(1, 1), (1, 1)]
    assert any("batch metrics could not be recorded" in r.getMessage() for r in caplog.records)
    await channel.close()


async def test_a_worker_without_its_native_library_refuses_to_start(
    registry: LocalRegistry, start_worker: StartWorker, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    """No silent Python-only fallback: the native front is the worker's port, so without it there is no worker."""
    import worker.fast_port

    # a binding that was never built, as before scripts/native.sh ran
    monkeypatch.setattr(worker.fast_port, "MODULE", "_fovea_worker_not_built")
    assert not worker.fast_port.available()
    with pytest.raises(RuntimeError) as err:
        await start_worker([])
    assert "cannot start its port" in str(err.value) and "scripts/native.sh" in str(err.value), err.value


async def test_calls_python_submits_share_a_batch_and_its_times(
    registry: LocalRegistry, start_worker: StartWorker
) -> None:
    """Calls the Python server hands to the native queue (calls it traces) are batched with each
    other and with raw tensors; each traced call gets its batch's times and number (worker/servicer.py)."""
    from worker.fast_port import Timing

    ws, _ = await _colors_worker(start_worker, registry, max_queue_delay_us=200_000)
    lv = ws.manager.loaded[("colors", 1)]
    timings = [Timing(), Timing(), Timing()]
    bodies = await asyncio.gather(
        *(
            asyncio.to_thread(
                ws.manager.submit, lv, tensor_request("colors", _colors(1)).SerializeToString(), 30_000, t
            )
            for t in timings
        )
    )
    assert [output_array(pb.ModelInferResponse.FromString(b)).argmax() for b in bodies] == [0, 0, 0]
    first = timings[0]
    assert all((t.batch, t.taken, t.compute_end) == (first.batch, first.taken, first.compute_end) for t in timings)
    assert (first.batch_size, first.batch_calls) == (3, 3) and first.batch > 0
    assert max(t.enqueued for t in timings) <= first.taken <= first.compute_start < first.compute_end
    later = Timing()
    await asyncio.to_thread(
        ws.manager.submit, lv, tensor_request("colors", _colors(2)).SerializeToString(), 30_000, later
    )
    assert later.batch > first.batch and (later.batch_size, later.batch_calls) == (2, 1)
