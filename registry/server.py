"""Builds the registry's gRPC server; main() and the tests both use build_server()."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import grpc
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from fovea import crypto
from fovea.config import server_options
from fovea.errors import FoveaError, RegistryUnavailable, Unauthenticated
from fovea.rpc import ServiceInterceptor, bearer_token, matches_any
from fovea.serve import add_health, set_serving
from fovea.v1 import registry_pb2, registry_pb2_grpc
from registry.artifacts import LocalArtifactStore
from registry.config import RegistryConfig
from registry.redis_conn import connect
from registry.service import INTERNAL, Registry
from registry.servicer import RegistryServicer

logger = logging.getLogger(__name__)
SERVICE = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name


def _translate(exc: BaseException) -> FoveaError | None:
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError, ConnectionError)):
        return RegistryUnavailable("registry storage (Redis) is unavailable; retry shortly")
    return None


def make_authenticator(registry: Registry, internal_tokens: list[str]) -> Any:
    async def authenticate(method: str, metadata: dict[str, Any]) -> Any:
        token = bearer_token(metadata)
        if matches_any(token, internal_tokens):
            return INTERNAL
        if not token.startswith("fv_"):
            raise Unauthenticated("invalid credentials: not an API key or the internal token")
        return await registry.authenticate(token)

    return authenticate


@dataclass
class RegistryServer:
    server: grpc.aio.Server
    port: int
    registry: Registry
    health: Any

    async def stop(self, grace_s: float) -> None:
        await set_serving(self.health, [SERVICE], False)
        await self.server.stop(grace_s)
        await self.registry.redis.aclose()


async def build_server(config: RegistryConfig) -> RegistryServer:
    keys = crypto.load_keys(config.encryption_key_file, config.previous_encryption_key_file)
    store = LocalArtifactStore(config.artifact_dir, keys[0] if keys else None, keys[1:])
    registry = Registry(
        connect(config.redis_url),
        store,
        config.heartbeat_ttl_s,
        config.max_artifact_bytes,
        config.watch_poll_s,
        config.max_alias_history,
    )
    authenticate = make_authenticator(registry, config.accepted_internal_tokens())
    interceptor = ServiceInterceptor(authenticate, translate=_translate)
    options = server_options(config.max_message_bytes, config.max_pending_calls)
    server = grpc.aio.server(interceptors=[interceptor], options=options)
    servicer = RegistryServicer(registry, config.chunk_bytes, config.max_concurrent_uploads)
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(servicer, server)
    health_servicer = add_health(server, [SERVICE])
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    await server.start()
    await set_serving(health_servicer, [SERVICE], True)
    logger.info(
        "registry listening on %s:%d (artifacts in %s, encryption %s)",
        config.host,
        port,
        store.root,
        "on" if keys else "off",
    )
    return RegistryServer(server, port, registry, health_servicer)
