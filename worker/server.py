"""Builds the worker: model manager, OIP server, heartbeats; main() and tests share build_server()."""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc

from fovea import crypto
from fovea.config import server_options
from fovea.registry_link import RegistryLink
from fovea.rpc import ServiceInterceptor, internal_authenticator
from fovea.serve import add_health, set_serving
from fovea.v1 import registry_pb2
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from worker.config import WorkerConfig
from worker.models import ModelManager
from worker.runtime import device_info
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
    state: int = registry_pb2.WORKER_STATE_STARTING
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def status(self) -> registry_pb2.WorkerStatus:
        provider = next((lv.provider for lv in self.manager.loaded.values()), "")
        kind, name, mem = device_info(provider, self.config.device_id)
        return registry_pb2.WorkerStatus(
            worker_id=self.config.worker_id, address=self.config.address(self.port), state=self.state,
            models=self.manager.statuses(), device=registry_pb2.Device(kind=kind, name=name, memory_bytes=mem),
            queue_depth=self.manager.queue_depth, in_flight=self.servicer.in_flight)

    async def _heartbeats(self) -> None:
        while True:
            try:
                await self.link.heartbeat(self.status())
            except grpc.aio.AioRpcError as exc:
                logger.warning("heartbeat failed: %s", exc.code().name)
            await asyncio.sleep(self.config.heartbeat_interval_s)

    async def start(self) -> None:
        await self.manager.start()
        self.state = registry_pb2.WORKER_STATE_READY
        await set_serving(self.health, [SERVICE], True)
        self.tasks.append(asyncio.create_task(self._heartbeats()))

    async def stop(self, grace_s: float) -> None:
        """NOT_SERVING, refuse new calls, answer everything in flight, final draining heartbeat, exit."""
        await set_serving(self.health, [SERVICE], False)
        self.state = registry_pb2.WORKER_STATE_DRAINING
        self.servicer.accepting = False
        for t in self.tasks:
            t.cancel()
        try:
            await self.link.heartbeat(self.status())
        except grpc.aio.AioRpcError:
            pass
        stopping = asyncio.create_task(self.server.stop(grace_s))
        await self.manager.stop(grace_s)
        await stopping
        await self.link.close()
        self.decode_pool.shutdown(wait=False)


async def build_server(config: WorkerConfig) -> WorkerServer:
    key = crypto.load_key(config.encryption_key_file) if config.encryption_key_file else None
    link = RegistryLink(config.registry_address, config.internal_token, config.max_message_bytes)
    manager = ModelManager(config, link, key)
    decode_pool = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="decode")
    servicer = WorkerServicer(manager, config, decode_pool)
    interceptor = ServiceInterceptor(internal_authenticator(config.internal_token))
    server = grpc.aio.server(interceptors=[interceptor], options=server_options(config.max_message_bytes))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    health_servicer = add_health(server, [SERVICE])
    await set_serving(health_servicer, [SERVICE], False)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    await server.start()
    ws = WorkerServer(config, server, port, manager, servicer, link, health_servicer, decode_pool)
    await ws.start()
    logger.info("worker %s listening on %s:%d", config.worker_id, config.host, port)
    return ws
