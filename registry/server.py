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
from fovea.rpc import ServiceInterceptor, bearer_token
from fovea.serve import add_health, set_serving
from fovea.tokens import API_KEY_PREFIX, TokenTable
from fovea.v1 import registry_pb2, registry_pb2_grpc
from registry.artifacts import LocalArtifactStore
from registry.config import RegistryConfig
from registry.placements import Placements
from registry.redis_conn import connect
from registry.service import Registry, principal_of
from registry.servicer import RegistryServicer

logger = logging.getLogger(__name__)
SERVICE = registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name


def _translate(exc: BaseException) -> FoveaError | None:
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError, ConnectionError)):
        return RegistryUnavailable("registry storage (Redis) is unavailable; retry shortly")
    return None


def make_authenticator(registry: Registry, tokens: TokenTable) -> Any:
    """Who the caller is, from the metadata alone, before any request body is read."""

    async def authenticate(method: str, metadata: dict[str, Any]) -> Any:
        token = bearer_token(metadata)
        if token.startswith(API_KEY_PREFIX):
            return await registry.authenticate(token)
        kind = tokens.kind_of(token)
        if kind is None:
            raise Unauthenticated("invalid credentials: not an API key or a current service token")
        return principal_of(kind)

    return authenticate


@dataclass
class RegistryServer:
    server: grpc.aio.Server
    port: int
    registry: Registry
    health: Any
    placements: Placements

    async def stop(self, grace_s: float) -> None:
        await set_serving(self.health, [SERVICE], False)
        await self.placements.stop()  # gives up leadership first, so another replica takes over at once
        await self.server.stop(grace_s)
        await self.registry.redis.aclose()


async def build_server(config: RegistryConfig) -> RegistryServer:
    tokens = config.token_table()  # a malformed entry stops the start, before anything is opened
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
    authenticate = make_authenticator(registry, tokens)
    interceptor = ServiceInterceptor(authenticate, translate=_translate)
    options = server_options(config.max_message_bytes, config.max_pending_calls)
    server = grpc.aio.server(interceptors=[interceptor], options=options)
    placements = Placements(registry.redis, config)
    servicer = RegistryServicer(registry, placements, config.chunk_bytes, config.max_concurrent_uploads)
    registry_pb2_grpc.add_RegistryServiceServicer_to_server(servicer, server)
    health_servicer = add_health(server, [SERVICE])
    creds = config.server_credentials()
    address = f"{config.host}:{config.port}"
    port = server.add_secure_port(address, creds) if creds else server.add_insecure_port(address)
    await server.start()
    await set_serving(health_servicer, [SERVICE], True)
    placements.start()
    logger.info(
        "registry listening on %s:%d (%s; artifacts in %s, encryption %s; service tokens %s)",
        config.host,
        port,
        "mutual TLS" if config.tls_client_ca_file else "TLS" if creds else "plaintext",
        store.root,
        "on" if keys else "off",
        tokens.counts() or "none",
    )
    return RegistryServer(server, port, registry, health_servicer, placements)
