"""Prometheus metrics of one gateway, plus the access log line written when a call ends.

Each gateway has its own CollectorRegistry, so several gateways can live in one
process (the tests). Label children are cached: the hot path pays a dict lookup
and an increment, not prometheus_client's label validation.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, start_http_server

from fovea import log

logger = logging.getLogger("gateway.access")

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, access_log: bool = True) -> None:
        self.registry = CollectorRegistry()
        self.access_log = access_log
        self.requests = Counter("fovea_gateway_requests", "Calls by method, model and status code.",
                                ["method", "model", "code"], registry=self.registry)
        self.latency = Histogram("fovea_gateway_request_seconds", "Call latency at the gateway, by method.",
                                 ["method"], buckets=LATENCY_BUCKETS_S, registry=self.registry)
        self.upstream = Counter("fovea_gateway_upstream_requests", "Calls sent to each worker, by status code.",
                                ["worker", "code"], registry=self.registry)
        self.retries = Counter("fovea_gateway_upstream_retries", "Calls retried on another worker.",
                               registry=self.registry)
        self.ejections = Counter("fovea_gateway_worker_ejections", "Workers set aside after repeated failures.",
                                 registry=self.registry)
        self.rate_limited = Counter("fovea_gateway_rate_limited", "Calls refused by a per-key rate limit.",
                                    registry=self.registry)
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
        if self.access_log:
            logger.info("%s %s %.2f ms", name, code.name, seconds * 1000)

    def upstream_call(self, worker_id: str, code: grpc.StatusCode) -> None:
        self._child(self.upstream, worker_id, code.name).inc()

    def served_by_worker(self) -> dict[str, float]:
        """Successful upstream calls per worker id (read by tests and the benchmark)."""
        out: dict[str, float] = {}
        for sample in self.upstream.collect()[0].samples:
            if sample.name.endswith("_total") and sample.labels["code"] == "OK":
                out[sample.labels["worker"]] = sample.value
        return out

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

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
