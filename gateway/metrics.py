"""Prometheus metrics of one gateway, plus the access log line written when a call ends.

Each gateway has its own CollectorRegistry, so several gateways can live in one
process (the tests). Label children are cached: the hot path pays a dict lookup
and an increment, not prometheus_client's label validation.

The access log is the one place that writes a line per call, so it skips the
logging module's per-record work: a call appends a tuple, and a task writes the
lines in one batch every flush_s, in the same JSON shape as fovea.log (ts,
level, service, logger, msg, request_id, model, version) plus method, code, ms.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any, TextIO

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, start_http_server

from fovea import log
from fovea.v1 import registry_pb2

STATUS_BY_VALUE = {code.value[0]: code for code in grpc.StatusCode}
WORKER_STATES = {value: name.removeprefix("WORKER_STATE_").lower() for name, value in registry_pb2.WorkerState.items()}
KEY_REFUSALS = {
    grpc.StatusCode.UNAUTHENTICATED: "unauthenticated",
    grpc.StatusCode.PERMISSION_DENIED: "permission_denied",
}
KEY_REFUSAL_NAMES = {code.name: reason for code, reason in KEY_REFUSALS.items()}
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, access_log: AccessLog | None = None) -> None:
        self.registry = CollectorRegistry()
        self.access_log = access_log
        self.requests = Counter(
            "fovea_gateway_requests",
            "Calls by method, model and status code.",
            ["method", "model", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "fovea_gateway_request_seconds",
            "Call latency at the gateway, by method.",
            ["method"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.upstream = Counter(
            "fovea_gateway_upstream_requests",
            "Calls sent to each worker, by status code.",
            ["worker", "code"],
            registry=self.registry,
        )
        self.retries = Counter(
            "fovea_gateway_upstream_retries", "Calls retried on another worker.", registry=self.registry
        )
        self.ejections = Counter(
            "fovea_gateway_worker_ejections", "Workers set aside after repeated failures.", registry=self.registry
        )
        self.rate_limited = Counter(
            "fovea_gateway_rate_limited", "Calls refused by a per-key rate limit.", registry=self.registry
        )
        self.key_refusals = Counter(
            "fovea_gateway_key_refusals",
            "Calls refused for their API key: unauthenticated (missing, malformed, unknown, revoked or expired) "
            "or permission_denied (role or model not allowed).",
            ["reason"],
            registry=self.registry,
        )
        self._children: dict[tuple[Any, ...], Any] = {}
        self._http: Any = None

    def _child(self, metric: Any, *labels: str) -> Any:
        k = (id(metric), *labels)
        child = self._children.get(k)
        if child is None:
            child = self._children[k] = metric.labels(*labels)
        return child

    def on_done(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        """Called by the interceptor when a call ends; the model comes from the logging context."""
        name = method.rsplit("/", 1)[-1]
        model = log.model_name.get()
        self._child(self.requests, name, model, code.name).inc()
        self._child(self.latency, name).observe(seconds)
        if code in KEY_REFUSALS:
            self._child(self.key_refusals, KEY_REFUSALS[code]).inc()
        if self.access_log is not None:
            self.access_log.add(name, code.name, seconds, model)

    def on_native(
        self,
        rows: list[tuple[float, int, float, str, str, str, str, str]],
        dropped: int,
        worker_ids: dict[str, str] | None = None,
    ) -> None:
        """Native calls (ModelInfer, Classify), drained from the front in batches: the same metrics and
        access-log lines as the calls the Python server answers. worker_ids maps fast addresses to worker ids."""
        for ts, value, seconds, rid, model, version, worker, method in rows:
            code = STATUS_BY_VALUE.get(value, grpc.StatusCode.UNKNOWN).name
            self._child(self.requests, method, model, code).inc()
            self._child(self.latency, method).observe(seconds)
            if code in KEY_REFUSAL_NAMES:
                self._child(self.key_refusals, KEY_REFUSAL_NAMES[code]).inc()
            if worker and worker_ids and worker in worker_ids:  # the worker that answered (or failed last)
                self._child(self.upstream, worker_ids[worker], code).inc()
            if self.access_log is not None:
                self.access_log.pending.append((ts, method, code, seconds, rid, model, version))
        if dropped and self.access_log is not None:
            self.access_log.dropped += dropped

    def upstream_call(self, worker_id: str, code: grpc.StatusCode) -> None:
        self._child(self.upstream, worker_id, code.name).inc()

    def served_by_worker(self) -> dict[str, float]:
        """Successful upstream calls per worker id (read by tests and the benchmark)."""
        out: dict[str, float] = {}
        for sample in list(self.upstream.collect())[0].samples:
            if sample.name.endswith("_total") and sample.labels["code"] == "OK":
                out[sample.labels["worker"]] = sample.value
        return out

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def watch_fast_port(self, counts: Any) -> None:
        """Calls on the native front (the gateway's one port), read from it at scrape time: by status code, and how
        many it answered itself (path="native") or relayed to this gateway's Python server (path="python"). The
        names still say fast_port, from when the front was a second port (issue 19 kept them for dashboards)."""
        from prometheus_client.core import CounterMetricFamily

        class FastPort:
            def collect(self) -> Any:
                now = counts()
                codes = CounterMetricFamily(
                    "fovea_gateway_fast_port_requests",
                    "Calls answered on the gateway's port (its native front), by status code",
                    labels=["code"],
                )
                for value, count in enumerate(now["codes"]):
                    if count:
                        codes.add_metric([grpc.StatusCode(STATUS_BY_VALUE[value]).name], count)
                paths = CounterMetricFamily(
                    "fovea_gateway_fast_port_calls",
                    "Fast-port calls answered natively or passed to Python",
                    labels=["path"],
                )
                paths.add_metric(["native"], now["native"])
                paths.add_metric(["python"], now["python"])
                yield from (codes, paths)

        self.registry.register(FastPort())

    def watch_cluster(self, workers: Any, keys: Any = None, cert_files: dict[str, str] | None = None) -> None:
        """Gauges read at scrape time from the gateway's own view: ready workers per model (gateway.routing.Workers),
        the earliest expiry among the API keys it has cached (gateway.auth.KeyCache), and the expiry of its TLS
        certificate files (role -> path)."""
        from prometheus_client.core import GaugeMetricFamily

        from fovea.cert_expiry import CertificateExpiry

        class ClusterView:
            def describe(self) -> list[Any]:
                return []

            def collect(self) -> Any:
                ready = GaugeMetricFamily(
                    "fovea_gateway_ready_workers",
                    "Workers this gateway would route a model to (ready, not ejected), by model",
                    labels=["model"],
                )
                states = GaugeMetricFamily(
                    "fovea_gateway_workers", "Workers this gateway knows, by state", labels=["state"]
                )
                per_model: dict[str, int] = {}
                per_state: dict[str, int] = {}
                for ep in list(workers.endpoints.values()):
                    state = "ejected" if ep.ejected else WORKER_STATES.get(ep.status.state, "unknown")
                    per_state[state] = per_state.get(state, 0) + 1
                    if ep.ejected or state != "ready":
                        continue
                    for name in {m.name for m in ep.status.models if m.ready}:
                        per_model[name] = per_model.get(name, 0) + 1
                for name, n in sorted(per_model.items()):
                    ready.add_metric([name], n)
                for state, n in sorted(per_state.items()):
                    states.add_metric([state], n)
                yield from (ready, states)
                if keys is None:
                    return
                expiries = [
                    record.expires_at.ToNanoseconds() / 1e9
                    for record, _ in list(keys.entries.values())
                    if record.HasField("expires_at") and not record.revoked
                ]
                soonest = GaugeMetricFamily(
                    "fovea_gateway_api_key_soonest_expiry_timestamp_seconds",
                    "Unix time at which the first of the API keys this gateway has cached (in use) expires; "
                    "absent when none of them expires",
                )
                if expiries:
                    soonest.add_metric([], min(expiries))
                yield soonest

        self.registry.register(ClusterView())
        if cert_files and any(cert_files.values()):
            self.registry.register(CertificateExpiry("fovea_gateway_certificate_expiry_timestamp_seconds", cert_files))

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint; returns its port (0 picks a free one)."""
        server, thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = (server, thread)
        return int(server.server_port)

    def close(self) -> None:
        if self._http is not None:
            server, thread = self._http
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)
            self._http = None


class AccessLog:
    """One line per finished call, written in batches (see the module docstring)."""

    def __init__(
        self, as_json: bool = True, stream: TextIO | None = None, flush_s: float = 0.2, max_pending: int = 100_000
    ) -> None:
        self.as_json = as_json
        self.stream = stream
        self.flush_s = flush_s
        self.max_pending = max_pending
        self.pending: list[tuple[float, str, str, float, str, str, str]] = []
        self.dropped = 0
        self.task: asyncio.Task[None] | None = None

    def add(self, method: str, code: str, seconds: float, model: str) -> None:
        if len(self.pending) >= self.max_pending:
            self.dropped += 1
            return
        self.pending.append((time.time(), method, code, seconds, log.request_id.get(), model, log.model_version.get()))

    def lines(self, entries: list[tuple[float, str, str, float, str, str, str]]) -> list[str]:
        out = []
        for ts, method, code, seconds, rid, model, version in entries:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"
            msg = f"{method} {code} {seconds * 1000:.2f} ms"
            if not self.as_json:
                out.append(f"{stamp} gateway INFO gateway.access: {msg} request_id={rid} model={model}")
                continue
            record: dict[str, object] = {
                "ts": stamp,
                "level": "INFO",
                "service": "gateway",
                "logger": "gateway.access",
                "msg": msg,
            }
            for k, v in (("request_id", rid), ("model", model), ("version", version)):
                if v:
                    record[k] = v
            record.update(method=method, code=code, ms=round(seconds * 1000, 3))
            out.append(json.dumps(record))
        return out

    def flush(self) -> None:
        if not self.pending and not self.dropped:
            return
        entries, self.pending = self.pending, []
        text = self.lines(entries)
        if self.dropped:
            text.append(
                json.dumps(
                    {
                        "level": "WARNING",
                        "service": "gateway",
                        "logger": "gateway.access",
                        "msg": f"access log dropped {self.dropped} lines (writer too slow)",
                    }
                )
            )
            self.dropped = 0
        stream = self.stream or sys.stderr
        try:
            stream.write("\n".join(text) + "\n")
            stream.flush()
        except (OSError, ValueError):
            pass

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.flush_s)
                self.flush()
        finally:
            self.flush()
