"""The boundary between the gateway's Python and its native front (gateway/native/api.h, bound by cffi in API
mode): every call is checked against the header, data crosses it as structs read by field name, and the front
checks the bounds of what Python hands it before anything is allocated from it."""

from __future__ import annotations

import pathlib
import time
from collections.abc import Iterator
from typing import Any

import grpc
import pydantic
import pytest

from fovea.errors import InvalidArgument
from fovea.v1 import registry_pb2
from gateway import fast_port
from gateway.config import GatewayConfig
from gateway.fast_port import AliasTarget, CStrings, ImageModel, NativeGateway, RouteTable, WorkerRoute
from inference import grpc_predict_v2_pb2 as pb

HEALTH_CHECK = "/grpc.health.v1.Health/Check"  # needs no credentials: the front relays it to the Python server


@pytest.fixture
def front(tmp_path: pathlib.Path) -> Iterator[NativeGateway]:
    """A front alone: its Python server's socket has no listener, so every relayed call fails UNAVAILABLE."""
    gw = NativeGateway(
        "127.0.0.1:0", 1 << 20, f"unix:{tmp_path}/none.sock", "token", 5000, 10000, 64, 3, 100, threads=2
    )
    yield gw
    gw.shutdown(0.1)
    gw.close()


def health_checks(port: int, n: int) -> list[grpc.StatusCode]:
    codes = []
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        check = channel.unary_unary(HEALTH_CHECK)
        for _ in range(n):
            try:
                check(b"", timeout=5)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as exc:
                codes.append(exc.code())
    return codes


def test_calls_that_break_the_header_are_refused_before_they_reach_the_front(front: NativeGateway) -> None:
    lib, ffi = front.lib, front.ffi
    with pytest.raises(TypeError):  # the old index array
        lib.fg_counts(front.handle, ffi.new("int64_t[22]"))
    with pytest.raises(TypeError):  # the old text table
        lib.fg_set_routes(front.handle, b"A ident 1 1.0\n")
    with pytest.raises(TypeError):  # the old positional arguments
        lib.fg_start(b"127.0.0.1:0", 1 << 20, ffi.new("int*"))
    with pytest.raises(TypeError):  # one argument too few
        lib.fg_drain_log(front.handle, ffi.new("struct fg_log_record[]", 1), 1)
    with pytest.raises(TypeError):
        lib.fg_readmit(front.handle, "a str, not bytes")
    with pytest.raises(AttributeError):  # a field the struct does not have
        ffi.new("struct fg_counters*").in_progress  # noqa: B018 - the read is the test
    with pytest.raises(OverflowError):
        lib.fg_set_max_top_k(front.handle, 2**63)


def test_the_counters_read_by_name_follow_the_calls(front: NativeGateway) -> None:
    counters = front.ffi.new("struct fg_counters*")
    front.lib.fg_counts(front.handle, counters)
    assert (counters.native_calls, counters.python_calls, counters.retries) == (0, 0, 0)
    assert health_checks(front.port, 5) == [grpc.StatusCode.UNAVAILABLE] * 5  # no Python server to relay to
    front.lib.fg_counts(front.handle, counters)
    assert counters.python_calls == 5 and counters.native_calls == 0
    deadline = time.monotonic() + 5  # the last call's objects go once its end has run on the front's thread
    while (counters.pending_calls, counters.call_objects) != (0, 16 * 2) and time.monotonic() < deadline:
        time.sleep(0.01)
        front.lib.fg_counts(front.handle, counters)
    assert (counters.pending_calls, counters.call_objects) == (0, 16 * 2)  # each thread's queue waits for 16 calls
    assert len(counters.codes) == front.lib.FG_STATUS_CODES
    counts = front.counts()
    assert (counts["python"], counts["native"], counts["in_progress"]) == (5, 0, 0)
    assert front.drain_log() == ([], 0)  # relayed calls are logged by the Python server, not here


def routes(ffi: Any, text: CStrings, workers: list[tuple[bytes, bytes]], n_aliases: int = 0) -> Any:
    entries = ffi.new(
        "struct fg_worker_route[]",
        [
            {"model": text(b"ident"), "version": 1, "fast_address": text(f), "main_address": text(m), "queue_depth": 0}
            for f, m in workers
        ],
    )
    text.owned.append(entries)  # the table points at it
    return ffi.new("struct fg_routes*", {"workers": entries, "n_workers": len(workers), "n_aliases": n_aliases})


def test_routing_entries_past_their_bounds_are_left_out_and_a_malformed_table_refused(front: NativeGateway) -> None:
    lib, ffi = front.lib, front.ffi
    text = CStrings(ffi)
    good = (b"127.0.0.1:1", b"127.0.0.1:2")
    long = b"127.0.0.1:" + b"9" * (lib.FG_ADDRESS_BYTES - 10)  # one byte past what a log record holds
    assert lib.fg_set_routes(front.handle, routes(ffi, text, [good])) == 0
    assert lib.fg_set_routes(front.handle, routes(ffi, text, [good, (long, good[1]), (good[0], long)])) == 2
    null_model = ffi.new("struct fg_alias_target[]", [{"model": ffi.NULL, "version": 1, "weight": 1.0}])
    assert lib.fg_set_routes(front.handle, ffi.new("struct fg_routes*", {"aliases": null_model, "n_aliases": 1})) == 1
    # a count without its array, a negative count, a count past the limit: the table is refused whole
    assert lib.fg_set_routes(front.handle, routes(ffi, text, [], n_aliases=3)) == -1
    assert lib.fg_set_routes(front.handle, ffi.new("struct fg_routes*", {"n_workers": -1})) == -1
    one = ffi.new("struct fg_image_model[]", 1)
    huge = ffi.new("struct fg_routes*", {"images": one})
    huge.n_images = lib.FG_MAX_ENTRIES + 1
    assert lib.fg_set_routes(front.handle, huge) == -1
    assert lib.fg_set_routes(front.handle, ffi.NULL) == -1
    # through the wrapper, entries of every kind go in; the last table is kept for the tests
    table = RouteTable(
        [AliasTarget("ident", 1, 1.0)],
        [ImageModel("ident", 1, "input", "output", 4)],
        [WorkerRoute("ident", 1, "127.0.0.1:1", "127.0.0.1:2", 3)],
    )
    front.set_routes(table)
    assert front.routes is table and front.routes.has_alias("ident") and len(front.routes.workers_of("ident")) == 1


def test_the_canary_pick_follows_the_production_alias_weights(front: NativeGateway) -> None:
    """The front's pick (fovea/canary.h, shared with the worker's front) agrees with fovea/canary.py: by weight,
    and a 0% target takes no calls."""
    assert front.pick_version("m") == 0  # no production alias in the table
    front.set_routes(RouteTable(aliases=[AliasTarget("m", 1, 90.0), AliasTarget("m", 2, 10.0)]))
    picks = [front.pick_version("m") for _ in range(4000)]
    assert set(picks) == {1, 2} and 0.05 < picks.count(2) / len(picks) < 0.15
    front.set_routes(RouteTable(aliases=[AliasTarget("m", 1, 100.0), AliasTarget("m", 2, 0.0)]))
    assert {front.pick_version("m") for _ in range(4000)} == {1}
    assert front.pick_version("other") == 0


def test_python_asks_the_front_for_a_classifys_limits(front: NativeGateway) -> None:
    """gateway/service.py Gateway.check_images takes the front's rule and limits (classify.h): set on the front,
    they are what the Python server's refusals say."""
    front.set_classify_limits(3, 32, 100, 50)  # default top_k, per worker batch, bytes, pixels
    front.set_max_top_k(7)
    assert front.check_classify([10, 20], 0) == (3, "")
    assert front.check_classify([10], 7) == (7, "")
    assert front.check_classify([], 0)[1] == "no images: send at least one encoded image"
    assert front.check_classify([1] * 65, 0)[1] == "65 images in one call; the limit is 64"
    assert front.check_classify([10], 8)[1] == "top_k 8 exceeds the limit of 7"
    assert front.check_classify([10, 101], 0)[1] == "image 1 is 101 bytes; the limit is 100"
    assert front.check_pixels(2, 10, 5) == ""
    assert front.check_pixels(2, 10, 6) == "image 2 is 10x6 = 60 pixels; the limit is 50"
    assert "no sensible size" in front.check_pixels(0, -1, 5)


def test_python_asks_the_fronts_canary_pick_for_other_aliases() -> None:
    """gateway/routing.py resolves aliases the front's table does not hold through fg_canary_pick: the front's
    rule, so a 0% target takes no calls and weights split them."""
    from fovea.v1 import model_pb2

    def alias(*weights: int) -> model_pb2.Alias:
        targets = [model_pb2.AliasTarget(version=v + 1, weight=w) for v, w in enumerate(weights)]
        return model_pb2.Alias(name="staging", targets=targets)

    picks = [fast_port.canary_pick(alias(90, 10)) for _ in range(4000)]
    assert set(picks) == {1, 2} and 0.05 < picks.count(2) / len(picks) < 0.15
    assert {fast_port.canary_pick(alias(100, 0)) for _ in range(4000)} == {1}
    assert {fast_port.canary_pick(alias(0)) for _ in range(10)} == {1}
    with pytest.raises(ValueError, match="out of 0..100"):
        fast_port.canary_pick(alias(50, 101))
    with pytest.raises(ValueError, match="no targets"):
        fast_port.canary_pick(alias())


def test_python_asks_the_fronts_model_patterns() -> None:
    """gateway/auth.py's model access is the front's rule (keys.h model_allowed: fnmatch(3) without escapes),
    which agrees with the registry's Python (fovea/names.py) on the patterns key creation accepts."""
    from fovea.names import model_allowed as registry_rule

    cases = [
        ([], "anything", True),
        (["res*"], "resnet-18", True),
        (["res*"], "vit", False),
        (["Res*"], "resnet", False),  # case-sensitive
        (["cifar-?"], "cifar-9", True),
        (["cifar-?"], "cifar-10", False),
        (["[ab]*"], "beta", True),
        (["[!ab]*"], "beta", False),
        (["a", "b*"], "bee", True),
        (["*"], "", True),
    ]
    for patterns, model, allowed in cases:
        assert fast_port.model_allowed(patterns, model) is allowed, (patterns, model)
        assert registry_rule(patterns, model) is allowed, (patterns, model)


def test_the_worker_choice_counts_other_gateways_queue_over_every_version(front: NativeGateway) -> None:
    """With no call of its own in flight, the front sends to the worker whose heartbeat reported the shorter
    queue, summed over the versions it serves; equal queues share the calls. (The live in-flight count, which
    this table cannot set, is shown by tests/gateway/test_routing.py.)"""

    def table(busy_queue: int, other_version_queue: int) -> RouteTable:
        return RouteTable(
            workers=[
                WorkerRoute("m", 1, "127.0.0.1:1", "127.0.0.1:2", busy_queue),
                WorkerRoute("m", 2, "127.0.0.1:1", "127.0.0.1:2", other_version_queue),
                WorkerRoute("m", 1, "127.0.0.1:3", "127.0.0.1:4", 2),
            ]
        )

    assert front.choose("m", 1) == ""  # no worker in the table
    front.set_routes(table(5, 0))
    assert {front.choose("m", 1) for _ in range(200)} == {"127.0.0.1:3"}
    front.set_routes(table(1, 4))  # 1 + 4 queued on the first worker over both versions
    assert {front.choose("m", 1) for _ in range(200)} == {"127.0.0.1:3"}
    front.set_routes(table(1, 1))  # equal: the two share
    picks = [front.choose("m", 1) for _ in range(2000)]
    assert 0.4 < picks.count("127.0.0.1:1") / len(picks) < 0.6
    front.set_routes(table(2**31 - 1, 0))  # a huge report is bounded, not wrapped into a small one
    assert {front.choose("m", 1) for _ in range(200)} == {"127.0.0.1:3"}
    assert front.choose("m", 3) == "" and front.choose("other", 1) == ""


def test_keys_past_their_bounds_are_refused(front: NativeGateway) -> None:
    lib, ffi = front.lib, front.ffi
    text = CStrings(ffi)
    patterns = [text(b"ident*")]
    many = ffi.new("char*[]", patterns)

    def key(key_id: Any, n_patterns: int) -> Any:
        return ffi.new(
            "struct fg_key*",
            {"digest": b"\1" * 32, "key_id": key_id, "role": 1, "model_patterns": many, "n_model_patterns": n_patterns},
        )

    assert lib.fg_put_key(front.handle, key(text(b"k1"), 1)) == 0
    assert lib.fg_put_key(front.handle, key(text(b"k" * (lib.FG_TEXT_MAX + 1)), 1)) == -1
    assert lib.fg_put_key(front.handle, key(ffi.NULL, 0)) == -1
    assert lib.fg_put_key(front.handle, key(text(b"k2"), -1)) == -1
    assert lib.fg_put_key(front.handle, key(text(b"k3"), lib.FG_MAX_ENTRIES + 1)) == -1
    assert lib.fg_put_limited_key(front.handle, key(text(b"k4"), lib.FG_MAX_ENTRIES + 1)) == 0  # no patterns read
    with pytest.raises(IndexError):  # a digest is 32 bytes: cffi refuses a longer one
        key(text(b"k5"), 0).digest = b"\1" * 33
    record = registry_pb2.ApiKey(key_id="k6", role=registry_pb2.ROLE_INFER, model_patterns=["ident"])
    with pytest.raises(ValueError, match="32 bytes"):  # and the wrapper a shorter one
        front.put_key(b"\1" * 31, record, 60.0)
    front.put_key(b"\2" * 32, record, 60.0)


def test_a_config_out_of_bounds_starts_no_front(tmp_path: pathlib.Path) -> None:
    ffi, lib = fast_port.binding()
    port = ffi.new("int*")
    text = CStrings(ffi)
    base = {"address": text(b"127.0.0.1:0"), "python_address": text(f"unix:{tmp_path}/x.sock".encode())}
    for bad in (
        {"max_message_bytes": 0},
        {"fast_threads": lib.FG_MAX_THREADS + 1},
        {"unread_window_bytes": -1},
        {"reconnect_min_ms": -1},
        {"reconnect_min_ms": 500, "reconnect_max_ms": 400},
        {"reconnect_min_ms": 1, "reconnect_max_ms": lib.FG_MAX_RECONNECT_MS + 1},
    ):
        config = ffi.new("struct fg_config*", {**base, "max_message_bytes": 1 << 20, **bad})
        assert lib.fg_start(config, port) == ffi.NULL, bad
    assert lib.fg_start(ffi.new("struct fg_config*", {"max_message_bytes": 1 << 20}), port) == ffi.NULL  # no address
    with pytest.raises(ValueError, match="threads"):
        NativeGateway("127.0.0.1:0", 1 << 20, f"unix:{tmp_path}/x.sock", "", 1, 1, 1, 1, 1, threads=1000)
    with pytest.raises(ValueError, match="reconnect"):
        NativeGateway("127.0.0.1:0", 1 << 20, f"unix:{tmp_path}/x.sock", "", 1, 1, 1, 1, 1, reconnect_s=(3, 2))
    with pytest.raises(pydantic.ValidationError, match="worker_reconnect_min_s"):
        GatewayConfig(worker_reconnect_min_s=3, worker_reconnect_max_s=2)


NAME_RULE = "use 1-63 lowercase letters, digits, '.', '_' or '-', starting with a letter or digit, with no '..'"


def test_the_checks_of_a_request_refuse_what_is_out_of_bounds(front: NativeGateway) -> None:
    """fg_check_infer and fg_check_tensor read only `bytes` bytes of the caller's buffer: a NULL buffer with bytes, a
    negative count or one past 2^31 - 1 (never read: the buffer is one byte), a NULL handle or result is -1, and
    the result is untouched."""
    lib, ffi = front.lib, front.ffi
    out = ffi.new("struct fg_check*")
    out.images = 7
    for request, size in ((ffi.NULL, 1), (b"\n", -1), (b"\n", 2**62), (b"\n", 2**31), (b"\n", 2**63 - 1)):
        assert lib.fg_check_infer(front.handle, request, size, out) == -1, size
        assert lib.fg_check_tensor(request, size, out) == -1, size
    assert lib.fg_check_infer(ffi.NULL, b"", 0, out) == -1
    assert lib.fg_check_infer(front.handle, b"", 0, ffi.NULL) == -1
    assert lib.fg_check_tensor(b"", 0, ffi.NULL) == -1
    assert out.images == 7 and ffi.string(out.message) == b""
    with pytest.raises(OverflowError):  # past int64_t: cffi refuses it
        lib.fg_check_infer(front.handle, b"", 2**63, out)
    # A NULL buffer of 0 bytes is the empty message: no model name.
    assert lib.fg_check_infer(front.handle, ffi.NULL, 0, out) == 0
    assert (out.valid, ffi.string(out.message).decode()) == (0, f"invalid model name '': {NAME_RULE}")


def test_the_checks_give_the_refusal_or_the_images(front: NativeGateway) -> None:
    """Through the Python binding: the first rule a request breaks, with its message; else what the call is charged
    for (an image per element of a BYTES tensor, else a batch row: the most of any input), the images past the
    per-call limit (64 here) apart, and what the route needs."""
    req = pb.ModelInferRequest(model_name="m", model_version="3")
    req.inputs.add(name="img", datatype="BYTES", shape=[2, 3])
    req.inputs.add(name="x", datatype="FP32", shape=[5, 4])
    check = front.check_infer(req.SerializeToString())
    assert (check.refusal, check.over_limit, check.images) == ("", "", 6)
    assert (check.model, check.version, check.tensors) == ("m", 3, False)
    req.inputs[1].shape[0] = 65
    assert (
        front.check_infer(req.SerializeToString()).over_limit == "input 'x' has a batch of 65; the limit is 64 per call"
    )
    req.inputs[0].shape[:] = [8, 9]
    check = front.check_infer(req.SerializeToString())  # the first input past the limit is named
    assert (check.refusal, check.over_limit) == ("", "input 'img' holds 72 images; the limit is 64 per call")
    raw = pb.ModelInferRequest(model_name="m", raw_input_contents=[b"\0" * 8])
    raw.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    check = front.check_infer(raw.SerializeToString())
    assert (check.refusal, check.images, check.version, check.tensors) == ("", 1, 0, True)
    front.set_max_top_k(5)  # the front's limit is the checks' limit
    raw.outputs.add(name="y").parameters["classification"].int64_param = 6
    assert (
        front.check_infer(raw.SerializeToString()).refusal
        == "output 'y': classification asks for 6 classes; expected 1 to 5"
    )
    not_a_message = "the request is not a valid ModelInferRequest message"
    for garbage in (b"\xff", b"\n\x02\xff\xfe", b"\n\x05ab", b"\x00\x01", b"*\x03\x1a\x01\x80"):  # not UTF-8, cut...
        assert front.check_infer(garbage).refusal == not_a_message, garbage
    # The longest message: a model name of 80 characters, each shown as 10, whole in FG_MESSAGE_BYTES.
    long_name = front.check_infer(pb.ModelInferRequest(model_name="\U0001f600" * 100).SerializeToString()).refusal
    assert long_name == "invalid model name '" + "\\U0001f600" * 80 + f"': {NAME_RULE}"
    assert len(long_name) < front.lib.FG_MESSAGE_BYTES


def test_a_tensor_is_checked_as_in_a_request() -> None:
    """fg_check_tensor, for the REST gateway: the element count of a valid tensor, else the rule it breaks."""
    tensor = pb.ModelInferRequest.InferInputTensor(name="t", datatype="FP32", shape=[2, 3])
    assert fast_port.tensor_elements(tensor.SerializeToString()) == 6
    tensor.datatype = "FP8"
    with pytest.raises(InvalidArgument, match="input 't' has unknown datatype 'FP8'; expected one of BOOL"):
        fast_port.tensor_elements(tensor.SerializeToString())
    tensor.datatype = "BYTES"
    tensor.shape[:] = [2**40, 2]
    with pytest.raises(InvalidArgument, match=r"input 't' has too many elements in its shape \[1099511627776, 2\]"):
        fast_port.tensor_elements(tensor.SerializeToString())
