"""OpenTelemetry tracing for the services, configured by the standard OTEL_* variables and off unless they name
an exporter (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_TRACES_EXPORTER).

Off, `tracer` is None and the SDK is never imported: the hot path checks that one global. On, every call gets a
server span (fovea/rpc.py) whose parent is the caller's W3C traceparent; its children are made only while it is
recording, so a call the sampler declined costs one span start (ids and the sampler's decision) and nothing else.
"""

from __future__ import annotations

import contextvars
import logging
import os
import random
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

logger = logging.getLogger(__name__)

tracer: Tracer | None = None
"""The services' tracer; None while tracing is off (the one check the hot path makes)."""
_provider: Any = None
_ids: Any = None  # the provider's id generator, which takes the trace id the quick decision drew
_parent_based = True
"""Whether the sampler follows the caller's decision (the parentbased_* samplers)."""
_bound = 1 << 64
"""Trace ids whose low 64 bits are below this are sampled (TraceIdRatioBased's rule; always_on: all)."""
_LOW64 = (1 << 64) - 1
_quiet: contextvars.ContextVar[tuple[str | int, str] | None] = contextvars.ContextVar("fovea_unsampled", default=None)
"""An unsampled call's trace id (the caller's, in hex, or one drawn here) and tracestate, to pass on: such calls
make no span at all."""
_token: contextvars.ContextVar[Any] = contextvars.ContextVar("fovea_span_token", default=None)
_TRACEPARENT_RE = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# A traceparent is 55 characters in version 00; later versions may append fields. Longer values, and a
# tracestate over the W3C limit of 32 entries (512 characters suffices for any sane one), are ignored
# here, before the propagator, which would log a warning per call for them.
MAX_TRACEPARENT = 128
MAX_TRACESTATE = 512
_propagator = TraceContextTextMapPropagator()
_NO_SPAN = nullcontext()

# Server-side gRPC codes that mark a span as failed (OpenTelemetry's semantic conventions for gRPC servers);
# the others (NOT_FOUND, INVALID_ARGUMENT, ...) are the caller's error, not the service's.
SERVER_ERRORS = frozenset({2, 4, 12, 13, 14, 15})


def configured(env: Mapping[str, str]) -> bool:
    """Whether the environment asks for traces: an exporter endpoint or OTEL_TRACES_EXPORTER, and not disabled."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters == "none":
        return False
    return bool(
        exporters or env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def setup(service: str, env: Mapping[str, str] | None = None) -> bool:
    """Start tracing for this process when the environment configures it; returns whether it did.

    service: the default service.name ("gateway" -> fovea-gateway); OTEL_SERVICE_NAME or a service.name in
    OTEL_RESOURCE_ATTRIBUTES win. The sampler comes from OTEL_TRACES_SAMPLER(_ARG) (default parentbased_always_on).
    """
    global tracer, _provider
    env = os.environ if env is None else env
    if not configured(env):
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    global _ids, _parent_based, _bound
    exporters = _exporters(env)  # first: a bad setting stops the service before anything starts
    sampler, _parent_based, _bound = _sampler(env)
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: f"fovea-{service}"}))
    _ids = _preset_ids()
    provider = TracerProvider(sampler=sampler, resource=resource, shutdown_on_exit=False, id_generator=_ids)
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    _provider = provider
    tracer = provider.get_tracer("fovea")
    logger.info(
        "tracing on: service %s, sampler %s, exporters %s",
        resource.attributes.get(SERVICE_NAME),
        provider.sampler.get_description(),
        ", ".join(type(e).__name__ for e in exporters),
    )
    return True


SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)


def _sampler(env: Mapping[str, str]) -> tuple[Any, bool, int]:
    """The sampler OTEL_TRACES_SAMPLER(_ARG) names (default parentbased_always_on), whether it follows the
    caller's decision, and the bound its root decision applies to a trace id's low 64 bits."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased, TraceIdRatioBased

    name = (env.get("OTEL_TRACES_SAMPLER", "") or "parentbased_always_on").strip().lower()
    if name not in SAMPLERS:
        raise ValueError(f"OTEL_TRACES_SAMPLER={name!r}; Fovea knows {', '.join(SAMPLERS)}")
    root: Any
    if name.endswith("traceidratio"):
        arg = env.get("OTEL_TRACES_SAMPLER_ARG", "") or "1.0"
        try:
            rate = float(arg)
        except ValueError:
            rate = -1.0
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"OTEL_TRACES_SAMPLER_ARG={arg!r}: the ratio of traces to sample, from 0 to 1")
        root = TraceIdRatioBased(rate)
        bound = root.bound
    else:
        root = ALWAYS_OFF if name.endswith("always_off") else ALWAYS_ON
        bound = 0 if root is ALWAYS_OFF else 1 << 64
    parent_based = name.startswith("parentbased_")
    return (ParentBased(root) if parent_based else root), parent_based, bound


def _preset_ids() -> Any:
    """The SDK's random id generator, but the next trace id may be set beforehand: start_server() draws a new
    trace's id to decide quickly, and a sampled one must keep it, or the SDK's sampler would decide again."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class PresetIds(RandomIdGenerator):
        def __init__(self) -> None:
            self.next_trace_id = 0

        def generate_trace_id(self) -> int:
            preset, self.next_trace_id = self.next_trace_id, 0
            return preset or super().generate_trace_id()

    return PresetIds()


def _exporters(env: Mapping[str, str]) -> list[Any]:
    """The span exporters OTEL_TRACES_EXPORTER names (default otlp): otlp over gRPC, console."""
    names = [n.strip() for n in (env.get("OTEL_TRACES_EXPORTER", "") or "otlp").lower().split(",") if n.strip()]
    out: list[Any] = []
    for name in names:
        if name == "otlp":
            protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
            if protocol.strip().lower() != "grpc":
                raise ValueError(
                    f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: Fovea exports OTLP over gRPC only; set it to 'grpc' "
                    "(or unset it) and point OTEL_EXPORTER_OTLP_ENDPOINT at the collector's gRPC port (4317)"
                )
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            out.append(OTLPSpanExporter())
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            out.append(ConsoleSpanExporter())
        elif name != "none":
            raise ValueError(f"OTEL_TRACES_EXPORTER names {name!r}; Fovea knows otlp, console and none")
    return out


def shutdown() -> None:
    """Export what is buffered and stop the exporters (on the service's stop)."""
    global tracer, _provider
    provider, _provider, tracer = _provider, None, None
    if provider is not None:
        provider.shutdown()  # ends the batch processors, which flush first


def current() -> Span:
    return trace.get_current_span()


def recording() -> bool:
    """Whether this call is traced: tracing is on and its span is recording (sampled)."""
    return tracer is not None and trace.get_current_span().is_recording()


def span(name: str) -> Any:
    """A child span of the current one as a context manager, only while the current one is recording
    (give it attributes with annotate() inside)."""
    if tracer is None or not trace.get_current_span().is_recording():
        return _NO_SPAN
    return tracer.start_as_current_span(name)


def annotate(**attributes: Any) -> None:
    """Attributes on the current span when it is recording, named fovea.<keyword>; empty strings are left out."""
    if tracer is None:
        return
    current_span = trace.get_current_span()
    if current_span.is_recording():
        current_span.set_attributes({f"fovea.{k}": v for k, v in attributes.items() if v != ""})


def headers() -> tuple[tuple[str, str], ...]:
    """traceparent (and tracestate) for an outgoing call, from the current span; empty when there is none.
    An unsampled span goes out too (flags 00), so that the next service follows the decision."""
    if tracer is None:
        return ()
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        quiet = _quiet.get()
        if quiet is None:
            return ()
        trace_id = quiet[0] if isinstance(quiet[0], str) else f"{quiet[0]:032x}"
        unsampled = (TRACEPARENT, f"00-{trace_id}-{random.getrandbits(64) or 1:016x}-00")
        return (unsampled, (TRACESTATE, quiet[1])) if quiet[1] else (unsampled,)
    parent = (TRACEPARENT, f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}")
    if not ctx.trace_state:
        return (parent,)
    return parent, (TRACESTATE, ctx.trace_state.to_header())


def start_server(method: str, metadata: Mapping[str, Any]) -> Span | None:
    """The server span of a gRPC call (method: '/package.Service/Method'), current until end_server(); its parent
    is the caller's traceparent when it sent a valid one. None when the sampler declines the call."""
    server = _start(method[1:], metadata)
    if server is not None:
        service, _, name = method[1:].partition("/")
        server.set_attributes({"rpc.system": "grpc", "rpc.service": service, "rpc.method": name})
    return server


def start_http(method: str, route: str, path: str, headers: Mapping[str, Any]) -> Span | None:
    """start_server() for an HTTP request (route: the path's pattern, e.g. /v2/models/{model}/infer)."""
    server = _start(f"{method} {route}", headers)
    if server is not None:
        server.set_attributes({"http.request.method": method, "http.route": route, "url.path": path[:256]})
    return server


def _start(name: str, metadata: Mapping[str, Any]) -> Span | None:
    """A server span named name, made current, when the sampler takes the call.

    The decision is the sampler's rule taken here, on the caller's flag or a newly drawn trace id, before the
    SDK is asked: an unsampled call makes no span and attaches no context (the SDK's start_span costs tens of
    microseconds per call on these machines); it only notes its trace id, so that headers() passes it on."""
    assert tracer is not None
    parent = metadata.get(TRACEPARENT)
    found = _TRACEPARENT_RE.fullmatch(parent) if isinstance(parent, str) and len(parent) <= MAX_TRACEPARENT else None
    state = metadata.get(TRACESTATE)
    state = state if isinstance(state, str) and len(state) <= MAX_TRACESTATE else ""
    trace_id = 0
    if found is not None and _valid(found):
        trace_hex = found.group(2)
        if _parent_based:
            sampled = bool(int(found.group(4), 16) & 1)
        else:
            sampled = int(trace_hex[16:], 16) < _bound
    else:
        found = None
        trace_id = random.getrandbits(128) or 1
        trace_hex = ""
        sampled = trace_id & _LOW64 < _bound
    if not sampled:
        _quiet.set((trace_hex or trace_id, state))
        return None
    _quiet.set(None)
    if found is not None:
        carrier = {TRACEPARENT: parent, TRACESTATE: state} if state else {TRACEPARENT: parent}
        parent_context = _propagator.extract(carrier)
    else:
        parent_context = otel_context.Context()  # a root, whatever this task's context holds
        _ids.next_trace_id = trace_id  # the id this decision was taken on
    server = tracer.start_span(name, context=parent_context, kind=SpanKind.SERVER)
    # detached by end_server(): an HTTP connection's requests may share one task, and so one context
    _token.set(otel_context.attach(trace.set_span_in_context(server)))
    return server


def _valid(found: re.Match[str]) -> bool:
    """W3C's rules beyond the pattern: version ff and all-zero ids are invalid; version 00 has no more fields."""
    version = found.group(1)
    if version == "ff" or found.group(2) == "0" * 32 or found.group(3) == "0" * 16:
        return False
    return not (version == "00" and found.group(5))


def end_server(server: Span, code: Any, request_id: str, attributes: Mapping[str, Any], http_status: int = 0) -> None:
    """Close a call's server span with its status code (a grpc.StatusCode: the error table's, also for HTTP,
    where http_status is the answer's) and request id, and make it no longer current."""
    token = _token.get()
    if token is not None:
        _token.set(None)
        otel_context.detach(token)
    if server.is_recording():
        number = code.value[0]
        if http_status:
            server.set_attributes({"http.response.status_code": http_status, "fovea.status": code.name})
        else:
            server.set_attribute("rpc.grpc.status_code", number)
        if request_id:
            server.set_attribute("fovea.request_id", request_id)
        if attributes:
            server.set_attributes(attributes)
        if http_status >= 500 if http_status else number in SERVER_ERRORS:
            server.set_status(Status(StatusCode.ERROR, code.name))
    server.end()


@contextmanager
def client(name: str, attributes: dict[str, Any]) -> Iterator[None]:
    """A client span for a call to another service (name: 'package.Service/Method'), current while it runs, so
    that headers() names it as the callee's parent; its status code is that of the error raised, if any.
    No span when the current call is not recording."""
    if tracer is None or not trace.get_current_span().is_recording():
        yield
        return
    service, _, method = name.partition("/")
    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method, **attributes}
    with tracer.start_as_current_span(name, kind=SpanKind.CLIENT, attributes=attributes) as out:
        try:
            yield
        except BaseException as exc:
            code: Any = getattr(exc, "code", None)  # FoveaError's grpc.StatusCode; anything else is UNKNOWN
            out.set_attribute("rpc.grpc.status_code", code.value[0] if hasattr(code, "value") else 2)
            raise
        out.set_attribute("rpc.grpc.status_code", 0)


class Clock:
    """Converts time.perf_counter() readings to the epoch nanoseconds spans take, for spans made after the fact."""

    def __init__(self) -> None:
        self.epoch_ns = time.time_ns()
        self.perf = time.perf_counter()

    def ns(self, perf: float) -> int:
        return self.epoch_ns - int((self.perf - perf) * 1e9)


def past(name: str, clock: Clock, start: float, end: float, attributes: dict[str, Any] | None = None) -> None:
    """A finished child span of the current one from two perf_counter() readings (what a batch measured)."""
    if tracer is None or end < start:
        return
    child = tracer.start_span(name, start_time=clock.ns(start), attributes=attributes)
    child.end(end_time=clock.ns(end))
