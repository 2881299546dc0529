"""Builds the worker: model manager, OIP server, heartbeats; main() and tests share build_server()."""

from __future__ import annotations

import asyncio
import logging
import pathlib
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import onnxruntime as ort

from fovea import crypto, tracing
from fovea.config import server_options
from fovea.registry_link import RegistryLink
from fovea.rpc import ServiceInterceptor
from fovea.serve import add_health, set_serving
from fovea.v1 import registry_pb2
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from worker.assignments import Assignments
from worker.config import WorkerConfig
from worker.decoding import DecodeThreads
from worker.fast_port import NativeFront
from worker.memory import device_budget, host_budget
from worker.metrics import WorkerMetrics
from worker.models import ModelManager
from worker.runtime import GPU_PROVIDERS, device_info
from worker.servicer import WorkerServicer

logger = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name


@dataclass
class WorkerServer:
    config: WorkerConfig
    server: grpc.aio.Server
    port: int
    manager: ModelManager
    servicer: WorkerServicer
    link: RegistryLink
    health: Any
    decode_pool: ThreadPoolExecutor
    metrics: WorkerMetrics
    native: NativeFront
    private_dir: pathlib.Path
    """Holds the Python server's unix socket (mode 0700): only this process's front reaches it."""
    decoders: DecodeThreads
    state: Any = registry_pb2.WORKER_STATE_STARTING  # a registry_pb2.WorkerState value
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    assignments: Assignments | None = None
    """What placement assigns (pool workers only); None on a worker with a fixed model list."""
    labels: dict[str, str] = field(default_factory=dict)
    memory_budget_bytes: int = 0
    device_memory_budget_bytes: int = 0

    def status(self) -> registry_pb2.WorkerStatus:
        provider = next((lv.provider for lv in self.manager.loaded.values()), "")
        kind, name, mem = device_info(provider, self.config.device_id)
        return registry_pb2.WorkerStatus(
            worker_id=self.config.worker_id,
            address=self.config.address(self.port),
            state=self.state,
            models=self.manager.statuses(),
            device=registry_pb2.Device(kind=kind, name=name, memory_bytes=mem),
            queue_depth=self.manager.queue_depth,
            in_flight=self.in_flight,
            # The one port. Gateways built before the ports merged send raw tensors to fast_address, and dial it
            # in plaintext: under TLS it stays empty, so that they send everything to address.
            fast_address="" if self.config.tls_cert_file else self.config.address(self.port),
            pooled=self.assignments is not None,
            labels=self.labels,
            memory_budget_bytes=self.memory_budget_bytes,
            device_memory_budget_bytes=self.device_memory_budget_bytes,
        )

    @property
    def in_flight(self) -> int:
        return self.servicer.in_flight + sum(self.manager.fast_pending())

    async def _heartbeats(self) -> None:
        changed = self.manager.changed
        while True:
            changed.clear()
            try:
                answer = await self.link.heartbeat(self.status())
                if self.assignments is not None and answer.assignment_known:
                    self.assignments.apply(answer.assigned_models)
            except grpc.aio.AioRpcError as exc:
                logger.warning("heartbeat failed: %s", exc.code().name)
            # A version that became ready, started leaving or unloaded is told at once, not a beat later.
            try:
                await asyncio.wait_for(changed.wait(), self.config.heartbeat_interval_s)
            except TimeoutError:
                pass

    async def start(self) -> None:
        await self.manager.start()
        self.state = registry_pb2.WORKER_STATE_READY
        await set_serving(self.health, [SERVICE], True)
        self.tasks.append(asyncio.create_task(self._heartbeats()))

    async def stop(self, grace_s: float) -> None:
        """Drain: NOT_SERVING and a draining heartbeat, refuse new calls, answer everything already
        accepted, stop the batchers, send the final draining heartbeat, and close within grace_s."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        await set_serving(self.health, [SERVICE], False)
        self.state = registry_pb2.WORKER_STATE_DRAINING
        self.servicer.accepting = False
        self.native.set_accepting(False)
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.assignments is not None:
            await self.assignments.stop()
        await self._heartbeat_once()  # gateways stop routing here at once
        linger_until = loop.time() + min(self.config.drain_linger_s, grace_s / 2)
        while (self.in_flight or loop.time() < linger_until) and loop.time() < deadline:
            await asyncio.sleep(0.005)
        # Returns once every call the port accepted is answered (relayed ones too: Python's server is still
        # up); the batch loops run meanwhile.
        await asyncio.to_thread(self.native.shutdown, max(0.0, deadline - loop.time()))
        decoded = await asyncio.to_thread(self.decoders.join, max(1.0, deadline - loop.time()))
        if self.in_flight:
            logger.warning("grace of %.1fs ran out with %d call(s) in flight", grace_s, self.in_flight)
        await self.manager.stop(max(0.0, deadline - loop.time()))
        self.native.close(free=decoded)  # a decode thread still running would reach a freed front
        await self._heartbeat_once()
        await self.server.stop(max(0.0, deadline - loop.time()))
        shutil.rmtree(self.private_dir, ignore_errors=True)
        await self.link.close()
        self.decode_pool.shutdown(wait=False)
        self.metrics.close()
        logger.info("worker %s drained", self.config.worker_id)

    async def _heartbeat_once(self) -> None:
        try:
            await asyncio.wait_for(self.link.heartbeat(self.status()), 2.0)
        except (grpc.aio.AioRpcError, TimeoutError) as exc:
            logger.warning("draining heartbeat failed: %s", exc)


async def build_server(config: WorkerConfig) -> WorkerServer:
    # What the worker offers placement, first: a pool worker without a budget must not start at all.
    gpu = any(p in GPU_PROVIDERS and p in ort.get_available_providers() for p in config.providers)
    gpu_labels = config.label_map(gpu)
    budget = host_budget(config.memory_budget_bytes)  # before any model: the process's own RSS is left out
    total = device_info(GPU_PROVIDERS[1], config.device_id)[2] if gpu and not config.device_memory_budget_bytes else 0
    device_budget_bytes = device_budget(config.device_memory_budget_bytes, gpu, total)
    if config.pooled and not budget:
        raise ValueError(
            "a pool worker needs a memory budget and none could be computed (no cgroup limit or MemTotal "
            "readable, or the process already holds 80% of it): set FOVEA_WORKER_MEMORY_BUDGET_BYTES"
        )
    keys = crypto.load_keys(config.encryption_key_file, config.previous_encryption_key_file)
    link = RegistryLink(
        config.registry_address,
        config.registry_token,
        config.max_message_bytes,
        credentials=config.channel_credentials(),
    )
    metrics = WorkerMetrics()
    # The one public port is the native front; it relays what it does not answer to this process's Python
    # server, which listens only on a unix socket in a directory that mkdtemp makes private (0700).
    private_dir = pathlib.Path(tempfile.mkdtemp(prefix="fovea-worker-"))
    socket = f"unix:{private_dir / 'python.sock'}"
    try:
        native = NativeFront(
            f"{config.host}:{config.port}",
            config.max_message_bytes,
            config.accepted_token_list(),
            config.default_deadline_ms,
            socket,
            config.tls_pems(),
        )
    except (OSError, RuntimeError) as exc:
        shutil.rmtree(private_dir, ignore_errors=True)
        raise RuntimeError(f"the worker cannot start its port: {exc}") from exc
    why = native.ort_unavailable()
    if why:
        # A library whose C API table is unproven (another release) is refused, not worked around.
        native.shutdown(0)
        native.close()
        shutil.rmtree(private_dir, ignore_errors=True)
        raise RuntimeError(f"the worker cannot run models on ONNX Runtime's C API: {why}")
    native.set_trace_sampled(tracing.tracer is not None)
    manager = ModelManager(config, link, keys, metrics, native)
    decode_pool = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="decode")
    servicer = WorkerServicer(manager, config, decode_pool, metrics)
    decoders = DecodeThreads(native, manager, config, decode_pool, metrics)
    decoders.start()
    # No check of the caller here: the server listens only on a socket in a private directory, and the native
    # front checks every call's internal token before it answers or relays it (worker/native/auth.cc).
    interceptor = ServiceInterceptor(None, on_done=metrics.on_done)
    options = server_options(config.max_message_bytes, config.max_pending_calls)
    server = grpc.aio.server(interceptors=[interceptor], options=options)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    health_servicer = add_health(server, [SERVICE])
    await set_serving(health_servicer, [SERVICE], False)
    server.add_insecure_port(socket)
    await server.start()
    port = native.port
    if config.metrics_port >= 0:
        metrics.serve(config.host, config.metrics_port)
        logger.info("metrics on http://%s:%d/metrics", config.host, metrics.port)
    ws = WorkerServer(
        config,
        server,
        port,
        manager,
        servicer,
        link,
        health_servicer,
        decode_pool,
        metrics,
        native,
        private_dir,
        decoders,
    )
    ws.labels, ws.memory_budget_bytes, ws.device_memory_budget_bytes = gpu_labels, budget, device_budget_bytes
    if config.pooled:
        ws.assignments = Assignments(manager)
        logger.info(
            "joining the pool: labels %s, memory budget %.0f MB%s",
            ",".join(f"{k}={v}" for k, v in sorted(ws.labels.items())),
            ws.memory_budget_bytes / 1e6,
            f", device memory budget {ws.device_memory_budget_bytes / 1e6:.0f} MB" if gpu else "",
        )
    metrics.watch(lambda: manager.queue_depth, lambda: ws.in_flight)  # the same count the heartbeats carry
    certs = {"server": config.tls_cert_file, "client_ca": config.tls_client_ca_file, "ca": config.tls_ca_file}
    metrics.watch_models(manager, config.max_queue_len, certs)  # per-model queues and readiness, cert expiry
    metrics.watch_fast_port(native.codes, native.request_times, native.flush_metrics)
    await ws.start()
    if any(lv.provider in GPU_PROVIDERS for lv in manager.loaded.values()):
        metrics.watch_gpu(config.device_id)
    logger.info(
        "worker %s listening on %s:%d%s", config.worker_id, config.host, port, " (TLS)" if config.tls_cert_file else ""
    )
    return ws
