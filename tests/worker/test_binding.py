"""The worker's Python <-> C++ boundary is checked: worker/native/api.h declares it once, and the cffi binding
built from it (_fovea_worker) refuses values of the wrong type instead of passing them on as raw words. The
structs it exchanges are read by field name; these tests check those fields against what the front is known
to do, on a real front listening on a port."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from worker.fast_port import NativeFront, binding
from worker.metrics import TIME_BUCKETS_S


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: list[int]


@dataclass
class Batching:
    max_batch_size: int = 4
    max_queue_len: int = 16
    max_queue_delay_us: int = 0
    preferred_batch_sizes: list[int] = field(default_factory=list)


@pytest.fixture
def front() -> Iterator[NativeFront]:
    f = NativeFront("127.0.0.1:0", 1 << 20, ["good-token"], 1000, "unix:/nonexistent/python.sock")
    try:
        yield f
    finally:
        f.shutdown(1)
        f.close()


def add(front: NativeFront, inputs: list[Tensor], outputs: list[Tensor] | None = None) -> int:
    """A version with no batch loops: the front queues its calls, nobody computes them."""
    outs = outputs if outputs is not None else [Tensor("y", "FP32", [-1, 3])]
    return front.add("m", 1, inputs, outs, ["a", "b", "c"], False, Batching(), [], noop, noop)


def noop(*args: Any) -> None:
    pass


def test_values_of_the_wrong_type_raise_type_error(front: NativeFront) -> None:
    ffi, lib = binding()
    depth = ffi.new("fv_queue_depth *")
    with pytest.raises(TypeError):
        lib.fv_depth(front.handle, "0", depth)  # a string for the slot
    with pytest.raises(TypeError):
        lib.fv_depth(front.handle, 0, ffi.new("fv_batch *"))  # another struct
    with pytest.raises(TypeError):
        lib.fv_depth(front.handle, 0)  # an argument short
    with pytest.raises(TypeError):
        lib.fv_depth(12345, 0, depth)  # an integer for a handle
    instances = lib.fv_instances_new(ffi.NULL)
    try:
        with pytest.raises(TypeError):
            lib.fv_depth(instances, 0, depth)  # the handles are distinct types: not the front
        with pytest.raises(TypeError):
            lib.fv_instances_new(front.handle)  # nor a session
    finally:
        lib.fv_instances_free(instances)
    spec = ffi.new("fv_model_spec *")
    with pytest.raises(TypeError):
        spec.max_batch = "8"
    with pytest.raises(TypeError):
        spec.name = b"m"  # a char* field takes C memory its owner keeps alive, not a Python object
    with pytest.raises(AttributeError):
        spec.max_batches = 8  # no such field
    with pytest.raises(OverflowError):
        spec.max_batch = 1 << 40  # int32_t


def test_structs_are_read_by_field_name(front: NativeFront) -> None:
    ffi, lib = binding()
    slot = add(front, [Tensor("x", "FP32", [-1, 2])])
    depth = ffi.new("fv_queue_depth *", {"queued": 7, "busy": 7})
    assert lib.fv_depth(front.handle, slot, depth) == 0
    assert (depth.queued, depth.busy) == (0, 0)
    assert lib.fv_depth(front.handle, slot + 100, depth) == -1

    # The request-time buckets are the main port's (worker/metrics.py), +Inf last; nothing answered yet.
    [(name, version, bounds, counts, total)] = front.request_times()
    assert (name, version) == ("m", "1")
    assert bounds == pytest.approx(list(TIME_BUCKETS_S))
    assert counts == [0] * (len(TIME_BUCKETS_S) + 1) and total == 0

    # A call with a token the front does not accept is answered UNAUTHENTICATED, and counted under that code.
    with grpc.insecure_channel(f"127.0.0.1:{front.port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(
                pb.ModelInferRequest(model_name="m"), metadata=[("authorization", "Bearer bad")], timeout=10
            )
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    counts_by_code = ffi.new("fv_status_counts *")
    lib.fv_codes(front.handle, counts_by_code)
    assert counts_by_code.by_code[grpc.StatusCode.UNAUTHENTICATED.value[0]] == 1
    assert sum(counts_by_code.by_code) == 1
    assert front.codes() == list(counts_by_code.by_code)

    # Fresh C++ loop state: no records, no drops, no error.
    instances = lib.fv_instances_new(ffi.NULL)
    try:
        io, _arrays = front._records(4)
        assert lib.fv_take_records(instances, io) == 0
        assert (io.nrecords, io.nwaits, io.expired, io.cancelled, io.failed, io.lost) == (0, 0, 0, 0, 0, 0)
        assert ffi.string(io.last_error) == b""
    finally:
        lib.fv_instances_free(instances)


def test_the_front_checks_what_python_passes(front: NativeFront) -> None:
    ffi, lib = binding()
    # rank 8 is the limit: the spec's dims hold 8, and a 9th is refused by the front, not written past them
    assert add(front, [Tensor("x", "FP32", [-1] + [1] * 7)]) >= 0
    with pytest.raises(ValueError, match="out of its limits"):
        add(front, [Tensor("x", "FP32", [-1] + [1] * 8)])
    with pytest.raises(ValueError, match="out of its limits"):
        add(front, [Tensor("x", "NOPE", [-1, 2])])
    with pytest.raises(ValueError, match="out of its limits"):
        add(front, [Tensor(f"x{i}", "FP32", [-1, 2]) for i in range(9)])
    slot = add(front, [Tensor("x", "FP32", [-1, 2])])
    front.route("m", [(slot, 1)])
    with pytest.raises(ValueError, match="unknown slot"):
        front.route("m", [(slot + 100, 1)])
    with pytest.raises(ValueError):
        front.route("m", [(slot, -1)])  # a negative weight
    # batches the front never handed out
    out = ffi.new("fv_output[]", 1)
    assert lib.fv_complete(front.handle, 999, 0, 1, out) == -1
    assert lib.fv_fail(front.handle, 999, 13, b"x") == -1
    # a session spec missing its names is refused with a message, not read through NULL pointers
    assert front.ort_unavailable() == ""
    spec = ffi.new("fv_session_spec *", {"ninputs": 1, "noutputs": 1})
    err = ffi.new("char[]", 512)
    assert lib.fv_ort_session(spec, err, 512) == ffi.NULL
    assert b"missing" in ffi.string(err)


def test_the_canary_pick_follows_the_route_weights(front: NativeFront) -> None:
    """fv_pick_version is the worker's one canary pick: Python asks it for calls it decodes, and the front uses
    it for the raw tensors it answers itself."""
    inputs = [Tensor("x", "FP32", [-1, 3])]
    slots = {
        v: front.add("m", v, inputs, [Tensor("y", "FP32", [-1, 3])], [], False, Batching(), [], noop, noop)
        for v in (1, 2, 3)
    }
    assert front.pick_version("m") == 0  # no route yet
    front.route("m", [(slots[1], 90), (slots[2], 10)])
    picks = [front.pick_version("m") for _ in range(4000)]
    assert set(picks) == {1, 2} and 0.05 < picks.count(2) / len(picks) < 0.15
    front.route("m", [(slots[1], 100), (slots[2], 0)])  # a 0% target takes no calls (fovea/canary.h), as the
    assert {front.pick_version("m") for _ in range(4000)} == {1}  # registry and the gateway pick
    front.route("m", [(slots[3], 0)])  # a weight of 0 still takes the calls when it is the only target
    assert {front.pick_version("m") for _ in range(50)} == {3}
    front.route("m", [(slots[2], 0), (slots[3], 0)])  # or when no target with weight is loaded here: any one
    assert {front.pick_version("m") for _ in range(200)} == {2, 3}
    front.route("m", [])
    assert front.pick_version("m") == 0 and front.pick_version("other") == 0
