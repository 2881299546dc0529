"""Traces across the hops (issue #21): a live cluster exports over OTLP to a real receiver in this test, a gRPC
server speaking the OpenTelemetry collector protocol from its published protos (opentelemetry-proto)."""

from __future__ import annotations

import contextvars
import functools
import os
import pathlib
import secrets
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

from fovea import tracing
from fovea.cluster import ROOT
from fovea.redis_server import free_port
from fovea.v1 import image_pb2, image_pb2_grpc
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.e2e.live import Live, start_gateway, start_live
from tests.tinymodels import png

SERVER = trace_pb2.Span.SPAN_KIND_SERVER
CLIENT = trace_pb2.Span.SPAN_KIND_CLIENT
INFER = "inference.GRPCInferenceService/ModelInfer"


@dataclass
class Received:
    service: str
    span: trace_pb2.Span

    def attr(self, key: str) -> Any:
        for kv in self.span.attributes:
            if kv.key == key:
                value = kv.value
                return getattr(value, value.WhichOneof("value"))
        return None


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    """Keeps every span exported to it, with its resource's service.name."""

    def __init__(self) -> None:
        self.spans: list[Received] = []
        self.lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:
        with self.lock:
            for resource_spans in request.resource_spans:
                service = next(
                    (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"), ""
                )
                for scope in resource_spans.scope_spans:
                    self.spans.extend(Received(service, s) for s in scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def trace(self, trace_id: bytes) -> list[Received]:
        with self.lock:
            return [r for r in self.spans if r.span.trace_id == trace_id]

    def wait(self, trace_id: bytes, done: Callable[[list[Received]], bool], timeout_s: float = 30.0) -> list[Received]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            spans = self.trace(trace_id)
            if done(spans):
                return spans
            time.sleep(0.05)
        names = [(r.service, r.span.name) for r in self.trace(trace_id)]
        raise AssertionError(f"trace {trace_id.hex()} incomplete after {timeout_s} s: {names}")


@dataclass
class Traced:
    live: Live
    receiver: Receiver
    http_port: int


@pytest.fixture(scope="module")
def traced(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traced]:
    """A cluster with its own Valkey: the shared one's database 0 holds what earlier tests left, and later
    tests flush it."""
    receiver = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
    }
    http_port = free_port()
    live = start_live(
        tmp_path_factory.mktemp("tracing"),
        registry_env=otel,
        worker_env=otel,
        gateway_env={**otel, "FOVEA_GATEWAY_HTTP_PORT": str(http_port)},
    )
    try:
        yield Traced(live, receiver, http_port)
    finally:
        live.stop()
        server.stop(0)


def new_parent(sampled: bool = True) -> tuple[str, bytes, bytes]:
    """A client's traceparent and its trace and span ids."""
    trace_id, span_id = secrets.token_bytes(16), secrets.token_bytes(8)
    return f"00-{trace_id.hex()}-{span_id.hex()}-{'01' if sampled else '00'}", trace_id, span_id


def one(spans: list[Received], service: str, name: str, kind: int | None = None) -> Received:
    found = [r for r in spans if r.service == service and r.span.name == name and kind in (None, r.span.kind)]
    assert len(found) == 1, f"{service} {name}: {len(found)} spans in {[(r.service, r.span.name) for r in spans]}"
    return found[0]


def within(child: Received, parent: Received) -> bool:
    return (
        child.span.parent_span_id == parent.span.span_id
        and parent.span.start_time_unix_nano <= child.span.start_time_unix_nano
        and child.span.end_time_unix_nano <= parent.span.end_time_unix_nano
    )


def test_one_classify_call_is_one_trace_across_gateway_worker_and_registry(traced: Traced) -> None:
    live, receiver = traced.live, traced.receiver
    key = live.rc.create_key("infer")[1]  # a key the gateway has not seen: it asks the registry
    parent, trace_id, client_span = new_parent()
    rid = "trace-classify-1"
    with grpc.insecure_channel(live.gateways[0].address) as channel:
        stub = image_pb2_grpc.ImageServiceStub(channel)
        request = image_pb2.ClassifyRequest(
            model="colors", images=[image_pb2.Image(data=png((240, 20, 20))), image_pb2.Image(data=png((10, 10, 220)))]
        )
        metadata = (("authorization", f"Bearer {key}"), ("traceparent", parent), ("x-request-id", rid))
        answer = stub.Classify(request, metadata=metadata, timeout=30)
    assert [r.labels[0].label for r in answer.results] == ["red", "blue"]

    def complete(spans: list[Received]) -> bool:
        names = {(r.service, r.span.name) for r in spans}
        return {
            ("fovea-worker", "answer"),
            ("fovea-gateway", "fovea.v1.ImageService/Classify"),
            ("fovea-registry", "fovea.v1.RegistryService/VerifyApiKey"),
        } <= names

    spans = receiver.wait(trace_id, complete)
    server = one(spans, "fovea-gateway", "fovea.v1.ImageService/Classify", SERVER)
    assert server.span.parent_span_id == client_span
    assert server.attr("fovea.model") == "colors" and server.attr("fovea.model_version") == "1"
    assert server.attr("fovea.images") == 2 and server.attr("rpc.grpc.status_code") == 0
    assert server.attr("fovea.request_id") == rid and server.attr("rpc.system") == "grpc"

    # The gateway's native front holds a call of a key it has not seen, unread, while it asks the Python server
    # (ServerLive with the call's metadata, its traceparent included): that check is in the trace, before the call.
    check = one(spans, "fovea-gateway", "inference.GRPCInferenceService/ServerLive", SERVER)
    assert check.span.parent_span_id == client_span
    assert check.span.end_time_unix_nano <= server.span.start_time_unix_nano
    authenticates = [r for r in spans if r.service == "fovea-gateway" and r.span.name == "authenticate"]
    first = [a for a in authenticates if within(a, check)]
    again = [a for a in authenticates if within(a, server)]  # the key is in the cache by now
    assert len(first) == 1 and len(again) == 1 and len(authenticates) == 2, authenticates
    route = one(spans, "fovea-gateway", "route")
    call = one(spans, "fovea-gateway", INFER, CLIENT)
    assert within(route, server) and within(call, server)
    assert route.attr("fovea.model") == "colors" and route.attr("fovea.model_version") == "1"
    assert call.attr("rpc.grpc.status_code") == 0 and call.attr("fovea.model") == "colors"
    # The key's check at the registry is the first authentication span's child, in the registry's own span.
    verify = one(spans, "fovea-registry", "fovea.v1.RegistryService/VerifyApiKey", SERVER)
    assert verify.span.parent_span_id == first[0].span.span_id

    worker = one(spans, "fovea-worker", INFER, SERVER)
    assert worker.span.parent_span_id == call.span.span_id
    assert call.span.start_time_unix_nano <= worker.span.start_time_unix_nano
    assert worker.attr("fovea.request_id") == rid and worker.attr("rpc.grpc.status_code") == 0
    assert worker.attr("fovea.model") == "colors" and worker.attr("fovea.model_version") == "1"
    assert worker.attr("fovea.batch_size") == 2 and worker.attr("fovea.images") == 2
    assert worker.attr("fovea.worker_id").startswith("worker0")
    steps = {name: one(spans, "fovea-worker", name) for name in ("preprocess", "queue wait", "compute", "answer")}
    assert all(within(step, worker) for step in steps.values()), "the worker's steps lie inside its server span"
    assert steps["preprocess"].attr("fovea.images") == 2
    assert steps["compute"].attr("fovea.batch_size") == 2 and steps["compute"].attr("fovea.batch_calls") == 1
    order = [steps[n].span for n in ("preprocess", "queue wait", "compute", "answer")]
    assert all(a.end_time_unix_nano <= b.start_time_unix_nano for a, b in zip(order, order[1:], strict=False))
    # one trace: every span of this request id is in it
    with receiver.lock:
        tagged = [
            r
            for r in receiver.spans
            if any(kv.key == "fovea.request_id" and kv.value.string_value == rid for kv in r.span.attributes)
        ]
    assert {r.span.trace_id for r in tagged} == {trace_id}


def test_an_http_classify_call_is_traced_like_a_grpc_one(traced: Traced) -> None:
    live, receiver = traced.live, traced.receiver
    parent, trace_id, client_span = new_parent()
    request = urllib.request.Request(
        f"http://127.0.0.1:{traced.http_port}/v1/models/colors:classify",
        data=png((10, 10, 220)),
        method="POST",
        headers={
            "Authorization": f"Bearer {live.keys['infer']}",
            "Content-Type": "image/png",
            "traceparent": parent,
            "x-request-id": "trace-http-1",
        },
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert answer.status == 200 and b"blue" in answer.read()
    name = "POST /v1/models/{model}:classify"

    def complete(spans: list[Received]) -> bool:
        return {("fovea-worker", "answer"), ("fovea-gateway", name)} <= {(r.service, r.span.name) for r in spans}

    spans = receiver.wait(trace_id, complete)
    server = one(spans, "fovea-gateway", name, SERVER)
    assert server.span.parent_span_id == client_span
    assert server.attr("http.response.status_code") == 200 and server.attr("fovea.status") == "OK"
    assert server.attr("fovea.request_id") == "trace-http-1" and server.attr("fovea.model") == "colors"
    assert server.attr("url.path") == "/v1/models/colors:classify"
    assert within(one(spans, "fovea-gateway", "authenticate"), server)
    call = one(spans, "fovea-gateway", INFER, CLIENT)
    assert within(call, server)
    assert one(spans, "fovea-worker", INFER, SERVER).span.parent_span_id == call.span.span_id


def ident_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="ident")
    request.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.arange(4, dtype=np.float32).tobytes())
    return request


def test_a_sampled_raw_tensor_call_is_traced_and_an_unsampled_one_is_not(traced: Traced) -> None:
    """The gateway's native front answers raw-tensor ModelInfer itself, except a sampled call, which it hands to the
    Python server, which traces it."""
    live, receiver = traced.live, traced.receiver
    key = live.keys["infer"]
    quiet, quiet_trace, _ = new_parent(sampled=False)
    parent, trace_id, client_span = new_parent()
    with grpc.insecure_channel(live.gateways[0].address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        for traceparent in (quiet, parent):
            metadata = (("authorization", f"Bearer {key}"), ("traceparent", traceparent))
            answer = stub.ModelInfer(ident_request(), metadata=metadata, timeout=30)
            assert np.frombuffer(answer.raw_output_contents[0], np.float32).tolist() == [0.0, 1.0, 2.0, 3.0]

    def complete(spans: list[Received]) -> bool:
        names = {(r.service, r.span.name, r.span.kind) for r in spans}
        return {("fovea-worker", "answer", 1), ("fovea-gateway", INFER, SERVER), ("fovea-gateway", INFER, CLIENT)} <= {
            (service, name, kind if name == INFER else 1) for service, name, kind in names
        }

    spans = receiver.wait(trace_id, complete)
    server = one(spans, "fovea-gateway", INFER, SERVER)
    assert server.span.parent_span_id == client_span
    assert server.attr("fovea.model") == "ident" and server.attr("rpc.grpc.status_code") == 0
    call = one(spans, "fovea-gateway", INFER, CLIENT)
    worker = one(spans, "fovea-worker", INFER, SERVER)  # the worker's main port, which traces; not its fast port
    assert call.span.parent_span_id == server.span.span_id and worker.span.parent_span_id == call.span.span_id
    assert one(spans, "fovea-worker", "compute").attr("fovea.batch_size") == 1
    time.sleep(0.5)  # several export periods: the unsampled call's spans, had there been any, would be here
    assert receiver.trace(quiet_trace) == []


def test_a_gateway_with_tracing_off_exports_nothing(traced: Traced) -> None:
    live, receiver = traced.live, traced.receiver
    # Off: no OTEL_* variables for this one, though the worker behind it traces.
    gateway = start_gateway(live, "untraced-gateway")
    try:
        assert "tracing on" not in gateway.log_path.read_text()
        parent, trace_id, _ = new_parent()
        with grpc.insecure_channel(gateway.address) as channel:
            stub = image_pb2_grpc.ImageServiceStub(channel)
            request = image_pb2.ClassifyRequest(model="colors", images=[image_pb2.Image(data=png((240, 20, 20)))])
            metadata = (("authorization", f"Bearer {live.keys['infer']}"), ("traceparent", parent))
            assert stub.Classify(request, metadata=metadata, timeout=30).results[0].labels[0].label == "red"
        time.sleep(1.0)
        # The gateway passed no traceparent on: nothing of this trace reached the receiver.
        assert receiver.trace(trace_id) == []
    finally:
        gateway.stop()
        live.cluster.services.remove(gateway)


def test_tracing_is_off_unless_configured_and_then_no_sdk_is_loaded() -> None:
    assert not tracing.configured({})
    assert not tracing.configured({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"})
    assert not tracing.configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_SDK_DISABLED": "true"})
    assert not tracing.configured({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"})
    assert tracing.configured({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4317"})
    assert tracing.configured({"OTEL_TRACES_EXPORTER": "console"})
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    script = (
        "import sys; from fovea import tracing; "
        "assert not tracing.setup('gateway') and tracing.tracer is None; "
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry.sdk') or 'exporter' in m))"
    )
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", "with tracing off neither the SDK nor an exporter is loaded"


def test_a_protocol_fovea_cannot_export_is_refused_at_start(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError, match="OTLP over gRPC only"):
        tracing.setup(
            "gateway", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}
        )
    with pytest.raises(ValueError, match="otlp, console and none"):
        tracing.setup("gateway", {"OTEL_TRACES_EXPORTER": "zipkin"})
    assert tracing.tracer is None


@pytest.fixture
def console_tracing() -> Iterator[Callable[[dict[str, str]], None]]:
    """Tracing set up in this process with the console exporter (pytest captures what it prints)."""

    def start(env: dict[str, str]) -> None:
        assert tracing.setup("gateway", {"OTEL_TRACES_EXPORTER": "console", **env})

    try:
        yield start
    finally:
        tracing.shutdown()


def in_call(fn: Callable[[], Any]) -> Any:
    """Run fn in a context of its own, as each gRPC call runs in a task of its own."""
    return contextvars.copy_context().run(fn)


def test_the_quick_decision_follows_the_callers_flag_and_passes_unsampled_traces_on(
    console_tracing: Callable[[dict[str, str]], None],
) -> None:
    console_tracing({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"})
    method = "/inference.GRPCInferenceService/ModelInfer"

    def call(metadata: dict[str, str]) -> tuple[Any, tuple[tuple[str, str], ...]]:
        server = tracing.start_server(method, metadata)
        return server, tracing.headers()

    server, headers = in_call(lambda: call({}))  # a new trace, which ratio 0 never samples
    assert server is None and len(headers) == 1 and headers[0][1].endswith("-00")
    parent, trace_id, span_id = new_parent(sampled=False)
    server, headers = in_call(lambda: call({"traceparent": parent, "tracestate": "vendor=1"}))
    assert server is None  # the caller's "no" is followed, and its trace id goes on with its tracestate
    assert headers[0][1].startswith(f"00-{trace_id.hex()}-") and headers[0][1].endswith("-00")
    assert headers[0][1][36:52] != span_id.hex() and headers[1] == ("tracestate", "vendor=1")
    parent, trace_id, span_id = new_parent(sampled=True)
    server, headers = in_call(lambda: call({"traceparent": parent, "tracestate": "vendor=1"}))
    assert server is not None and server.is_recording()  # the caller's "yes" too
    context = server.get_span_context()
    assert context.trace_id == int.from_bytes(trace_id, "big") and server.parent.span_id == int.from_bytes(
        span_id, "big"
    )
    assert headers[0][1] == f"00-{trace_id.hex()}-{context.span_id:016x}-01" and headers[1] == (
        "tracestate",
        "vendor=1",
    )
    server.end()
    for bad in (
        f"ff-{trace_id.hex()}-{span_id.hex()}-01",  # version ff
        f"00-{'0' * 32}-{span_id.hex()}-01",  # all-zero trace id
        f"00-{trace_id.hex().upper()}-{span_id.hex()}-01",  # upper case
        f"00-{trace_id.hex()}-{span_id.hex()}-01-extra",  # version 00 has no more fields
        "00-" + "a" * 200,
    ):
        server, headers = in_call(functools.partial(call, {"traceparent": bad}))
        assert server is None and trace_id.hex() not in headers[0][1], bad  # a new trace instead


def test_the_quick_decision_samples_a_ratio_of_new_traces_as_the_sdk_would(
    console_tracing: Callable[[dict[str, str]], None],
) -> None:
    console_tracing({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"})
    from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

    bound = TraceIdRatioBased(0.5).bound
    sampled = []
    for _ in range(1000):
        server = in_call(lambda: tracing.start_server("/a.B/C", {}))
        if server is not None:
            # the SDK kept the trace id the decision was taken on, and its own sampler agreed
            assert server.is_recording() and server.get_span_context().trace_id & ((1 << 64) - 1) < bound
            server.end()
            sampled.append(server)
    assert 400 < len(sampled) < 600
    # not parent-based: the ratio applies to the caller's trace id too, whatever its flag says
    low, high = "0" * 16, "f" * 16
    kept = in_call(lambda: tracing.start_server("/a.B/C", {"traceparent": f"00-{'1' * 16}{low}-{'2' * 16}-00"}))
    dropped = in_call(lambda: tracing.start_server("/a.B/C", {"traceparent": f"00-{'1' * 16}{high}-{'2' * 16}-01"}))
    assert kept is not None and dropped is None
    kept.end()


def test_sampler_settings_fovea_cannot_follow_are_refused() -> None:
    with pytest.raises(ValueError, match="Fovea knows"):
        tracing.setup("gateway", {"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "jaeger_remote"})
    with pytest.raises(ValueError, match="from 0 to 1"):
        tracing.setup(
            "gateway",
            {"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"},
        )
    assert tracing.tracer is None
