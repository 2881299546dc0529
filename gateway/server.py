"""Builds the gateway; main() and the tests share build_server()."""

from __future__ import annotations

import asyncio
import logging
import pathlib
from dataclasses import dataclass, field
from typing import Any

import grpc

from fovea.config import server_options
from fovea.registry_link import RegistryLink
from fovea.rpc import ServiceInterceptor
from fovea.serve import add_health, set_serving
from fovea.v1 import image_pb2, image_pb2_grpc, registry_pb2
from gateway.auth import KeyCache
from gateway.config import GatewayConfig
from gateway.metrics import Metrics
from gateway.ratelimit import RateLimiter
from gateway.routing import Versions, Workers
from gateway.service import Gateway
from gateway.servicer import ImageServicer, InferenceServicer
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)
SERVICES = [
    image_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name,
    pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
]


@dataclass
class GatewayServer:
    server: grpc.aio.Server
    port: int
    gateway: Gateway
    keys: KeyCache
    link: RegistryLink
    health: Any
    stop_event: asyncio.Event
    metrics: Metrics
    metrics_port: int = -1
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def stop(self, grace_s: float) -> None:
        await set_serving(self.health, SERVICES, False)
        self.stop_event.set()
        await self.server.stop(grace_s)
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await self.gateway.workers.close()
        await self.gateway.limiter.close()
        await self.link.close()
        self.metrics.close()


def _credentials(config: GatewayConfig) -> grpc.ServerCredentials | None:
    if not config.tls_cert_file:
        return None
    cert = pathlib.Path(config.tls_cert_file).read_bytes()
    key = pathlib.Path(config.tls_key_file).read_bytes()
    if config.tls_client_ca_file:
        ca = pathlib.Path(config.tls_client_ca_file).read_bytes()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
    return grpc.ssl_server_credentials([(key, cert)])


async def build_server(config: GatewayConfig) -> GatewayServer:
    link = RegistryLink(config.registry_address, config.internal_token, config.max_message_bytes)
    versions = Versions(link, config.latest_cache_s)
    metrics = Metrics(config.access_log)
    workers = Workers(config.max_message_bytes, config.eject_after_failures, config.eject_s,
                      on_eject=metrics.ejections.inc)
    limiter = RateLimiter(config.redis_url, config.rate_limit_timeout_s)
    gateway = Gateway(config, versions, workers, limiter, metrics)
    keys = KeyCache(link, config.key_cache_ttl_s, config.refused_key_cache_s, role_of(config.min_role))
    interceptor = ServiceInterceptor(keys.authenticator(), on_done=metrics.on_done)
    server = grpc.aio.server(interceptors=[interceptor], options=server_options(config.max_message_bytes))
    image_pb2_grpc.add_ImageServiceServicer_to_server(ImageServicer(gateway, link), server)
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(gateway), server)
    health_servicer = add_health(server, SERVICES)
    await set_serving(health_servicer, SERVICES, False)
    address = f"{config.host}:{config.port}"
    creds = _credentials(config)
    port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(link.follow("models", link.watch_models, versions.on_event, stop)),
        asyncio.create_task(link.follow("workers", link.watch_workers, workers.on_event, stop)),
        asyncio.create_task(link.follow("keys", link.watch_keys, keys.on_event, stop)),
    ]
    await gateway.wait_for_workers(5.0)
    await server.start()
    metrics_port = metrics.serve(config.metrics_host, config.metrics_port) if config.metrics_port >= 0 else -1
    await set_serving(health_servicer, SERVICES, True)
    logger.info("gateway listening on %s (%s)%s", f"{config.host}:{port}", "TLS" if creds else "plaintext",
                f", metrics on {config.metrics_host}:{metrics_port}" if metrics_port >= 0 else "")
    return GatewayServer(server, port, gateway, keys, link, health_servicer, stop, metrics, metrics_port, tasks)


def role_of(name: str) -> int:
    roles = {"infer": registry_pb2.ROLE_INFER, "publish": registry_pb2.ROLE_PUBLISH, "admin": registry_pb2.ROLE_ADMIN}
    if name not in roles:
        raise ValueError(f"min_role must be one of {', '.join(roles)}, got {name!r}")
    return roles[name]
