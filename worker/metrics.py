"""The worker's Prometheus metrics, on their own registry so that several in-process workers (tests) never clash.

Every observation is a few dictionary lookups and a bisect: cheap enough for the hot path.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from worker.fast_port import binding

logger = logging.getLogger(__name__)

# Seconds, as the native front's histogram has them (worker/native/api.h fv_time_bounds_ns, the one list):
# both histograms of request times share their buckets.
TIME_BUCKETS_S = tuple(ns / 1e9 for ns in binding()[1].fv_time_bounds_ns)
STATUS_BY_VALUE = {code.value[0]: code.value for code in grpc.StatusCode}
BATCH_BUCKETS = (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256)


class _BeforeScrape:
    """Runs hooks when the registry is collected; yields no metrics."""

    def __init__(self, hooks: list[Callable[[], None]]) -> None:
        self.hooks = hooks

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Any:
        for hook in self.hooks:
            hook()
        return iter(())


class WorkerMetrics:
    """Histograms per model version, counters per method and status, gauges read at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.before_scrape: list[Callable[[], None]] = []
        self.registry.register(_BeforeScrape(self.before_scrape))  # first, so it runs before the histograms are read
        labels = ("model", "version")
        self.queue_s = Histogram(
            "fovea_worker_queue_seconds",
            "Time a request waited in the batcher queue",
            labels,
            buckets=TIME_BUCKETS_S,
            registry=self.registry,
        )
        self.preprocess_s = Histogram(
            "fovea_worker_preprocess_seconds",
            "Time to decode and preprocess the images of one request",
            labels,
            buckets=TIME_BUCKETS_S,
            registry=self.registry,
        )
        self.compute_s = Histogram(
            "fovea_worker_compute_seconds",
            "ONNX Runtime time of one batch",
            labels,
            buckets=TIME_BUCKETS_S,
            registry=self.registry,
        )
        self.total_s = Histogram(
            "fovea_worker_request_seconds",
            "Time from receiving a ModelInfer to answering it",
            labels,
            buckets=TIME_BUCKETS_S,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "fovea_worker_batch_size",
            "Samples per batch run by ONNX Runtime",
            labels,
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.padding = Counter(
            "fovea_worker_padding_samples",
            "Zero samples run to fill batches up to a session's batch size (pad_batches)",
            labels,
            registry=self.registry,
        )
        self.requests = Counter(
            "fovea_worker_requests",
            "RPCs answered, by method and status code",
            ("method", "code"),
            registry=self.registry,
        )
        self.dropped = Counter(
            "fovea_worker_dropped",
            "Requests dropped before compute, by reason (expired, cancelled)",
            ("model", "version", "reason"),
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "fovea_worker_queue_depth", "Requests waiting in batcher queues", registry=self.registry
        )
        self.in_flight = Gauge("fovea_worker_in_flight", "ModelInfer calls being served", registry=self.registry)
        self.provider = Gauge(
            "fovea_worker_provider",
            "1 for the execution provider each loaded version really got",
            ("model", "version", "provider"),
            registry=self.registry,
        )
        self.gpu_memory_used = Gauge(
            "fovea_worker_gpu_memory_used_bytes",
            "GPU memory in use (GPU workers only)",
            ("device",),
            registry=self.registry,
        )
        self.gpu_memory_total = Gauge(
            "fovea_worker_gpu_memory_total_bytes", "GPU memory (GPU workers only)", ("device",), registry=self.registry
        )
        self.gpu_utilization = Gauge(
            "fovea_worker_gpu_utilization_ratio",
            "Share of the last sample period in which a kernel ran on the GPU, 0 to 1 (NVML; GPU workers only)",
            ("device",),
            registry=self.registry,
        )
        self._series: dict[tuple[str, str], tuple[Any, Any, Any, Any, Any]] = {}
        self._codes: dict[tuple[str, grpc.StatusCode], Any] = {}
        self._server: Any = None
        self.port = 0

    def series(self, model: str, version: str) -> tuple[Any, Any, Any, Any, Any]:
        """(queue, preprocess, compute, total, batch size) children for one version, cached."""
        key = (model, version)
        children = self._series.get(key)
        if children is None:
            children = (
                self.queue_s.labels(model, version),
                self.preprocess_s.labels(model, version),
                self.compute_s.labels(model, version),
                self.total_s.labels(model, version),
                self.batch_size.labels(model, version),
            )
            self._series[key] = children
        return children

    def batch_hook(self, model: str, version: str) -> Callable[[int, list[float], float, int], None]:
        """The C++ batch loops' on_batch for one version: run_samples is the batch size a batch ran at (more than
        its samples when padded up to a batch bucket)."""
        queue, _, compute, _, size = self.series(model, version)
        padding = self.padding.labels(model, version)

        def hook(samples: int, waits_s: list[float], compute_s: float, run_samples: int) -> None:
            size.observe(samples)
            compute.observe(compute_s)
            for w in waits_s:
                queue.observe(w)
            if run_samples > samples:
                padding.inc(run_samples - samples)

        return hook

    def drop_hook(self, model: str, version: str) -> Callable[[str], None]:
        children = {r: self.dropped.labels(model, version, r) for r in ("expired", "cancelled")}
        return lambda reason: children[reason].inc()

    def on_done(self, method: str, code: grpc.StatusCode, elapsed_s: float) -> None:
        child = self._codes.get((method, code))
        if child is None:
            child = self.requests.labels(method.rsplit("/", 1)[-1], code.name)
            self._codes[(method, code)] = child
        child.inc()

    def watch(self, queue_depth: Callable[[], float], in_flight: Callable[[], float]) -> None:
        self.queue_depth.set_function(queue_depth)
        self.in_flight.set_function(in_flight)

    def watch_models(self, manager: Any, max_queue_len: int, cert_files: dict[str, str] | None = None) -> None:
        """Per loaded version, read at scrape time from the ModelManager: requests queued (batcher and fast port),
        the queue's capacity (max_queue_len, each queue's bound), and readiness; plus certificate expiry."""
        from prometheus_client.core import GaugeMetricFamily

        from fovea.cert_expiry import CertificateExpiry

        class Models:
            def describe(self) -> list[Any]:
                return []

            def collect(self) -> Any:
                depth = GaugeMetricFamily(
                    "fovea_worker_model_queue_depth",
                    "Requests waiting in one version's queues (batcher and fast port)",
                    labels=["model", "version"],
                )
                capacity = GaugeMetricFamily(
                    "fovea_worker_queue_capacity",
                    "Most requests one version's queue holds (max_queue_len); more are refused",
                    labels=["model", "version"],
                )
                ready = GaugeMetricFamily(
                    "fovea_worker_model_ready",
                    "1 once a loaded version is warmed up and serving",
                    labels=["model", "version"],
                )
                for lv in list(manager.loaded.values()):
                    labels = [lv.mv.name, str(lv.mv.version)]
                    queued = manager.native.depth(lv.slot)[0] if manager.native is not None and lv.slot else 0
                    depth.add_metric(labels, queued)
                    capacity.add_metric(labels, max_queue_len)
                    ready.add_metric(labels, 1 if lv.ready else 0)
                yield from (depth, capacity, ready)

        self.registry.register(Models())
        if cert_files and any(cert_files.values()):
            self.registry.register(CertificateExpiry("fovea_worker_certificate_expiry_timestamp_seconds", cert_files))

    def watch_fast_port(
        self,
        codes: Callable[[], list[int]],
        times: Callable[[], list[tuple[str, str, list[float], list[int], float]]],
        flush: Callable[[], None],
    ) -> None:
        """ModelInfer calls answered on the native fast port, by status code, and the total time of those
        answered OK (the main port's fovea_worker_request_seconds), read from it at scrape time; flush()
        brings its batch histograms up to date before each scrape."""
        self.before_scrape.append(flush)

        class FastPort:
            def collect(self) -> Any:
                family = CounterMetricFamily(
                    "fovea_worker_fast_port_requests",
                    "ModelInfer calls on raw tensors the native front answered itself, by status code",
                    labels=["code"],
                )
                for value, count in enumerate(codes()):
                    if count:
                        family.add_metric([grpc.StatusCode(STATUS_BY_VALUE[value]).name], count)
                yield family
                seconds = HistogramMetricFamily(
                    "fovea_worker_fast_port_request_seconds",
                    "Time from receiving a raw-tensor ModelInfer on the native front to answering it",
                    labels=["model", "version"],
                )
                for model, version, bounds, counts, total in times():
                    cumulative = list(itertools.accumulate(counts))
                    buckets = [(floatToGoString(b), c) for b, c in zip(bounds, cumulative, strict=False)]
                    buckets.append(("+Inf", cumulative[-1]))
                    seconds.add_metric([model, version], buckets, total)
                yield seconds

        self.registry.register(FastPort())

    def watch_gpu(self, device_id: int) -> None:
        """GPU memory, read through NVML (pynvml) at scrape time; absent without NVML."""
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(device_id)
        except Exception as exc:  # noqa: BLE001 - metrics must never stop a worker
            logger.warning("no GPU memory metric: NVML is unavailable (%s)", exc)
            return
        lock = threading.Lock()

        def read(field: str) -> float:
            with lock:
                return float(getattr(pynvml.nvmlDeviceGetMemoryInfo(handle), field))

        def utilization() -> float:
            with lock:
                return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu) / 100.0

        self.gpu_memory_used.labels(str(device_id)).set_function(lambda: read("used"))
        self.gpu_memory_total.labels(str(device_id)).set_function(lambda: read("total"))
        self.gpu_utilization.labels(str(device_id)).set_function(utilization)

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint (a daemon thread); returns its port."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(self._server.server_port)
        return self.port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
