"""Registry fixtures: real in-process registry servers (build_server) on the session's Valkey."""

from __future__ import annotations

import pathlib
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from registry.config import RegistryConfig
from registry.server import RegistryServer, build_server
from tests.registry.helpers import Reg

StartRegistry = Callable[..., Awaitable[RegistryServer]]


@pytest.fixture
def token() -> str:
    """An admin token (an operator's): publishes, moves aliases, manages keys."""
    return secrets.token_hex(24)


@pytest.fixture
def worker_token() -> str:
    return secrets.token_hex(24)


@pytest.fixture
def gateway_token() -> str:
    return secrets.token_hex(24)


@pytest.fixture
async def start_registry(
    redis_url: str, tmp_path: pathlib.Path, token: str, worker_token: str, gateway_token: str
) -> AsyncIterator[StartRegistry]:
    """Start registries on the clean test database; all share one artifact dir unless told otherwise."""
    servers: list[RegistryServer] = []

    async def start(**overrides: Any) -> RegistryServer:
        fields: dict[str, Any] = dict(
            port=0,
            redis_url=redis_url,
            artifact_dir=tmp_path / "artifacts",
            admin_tokens=token,
            worker_tokens=worker_token,
            gateway_tokens=gateway_token,
            log_json=False,
            grace_s=0.5,
        )
        fields.update(overrides)
        server = await build_server(RegistryConfig(**fields))
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop(0.5)


@pytest.fixture
async def reg(start_registry: StartRegistry, token: str, worker_token: str) -> AsyncIterator[Reg]:
    """A registry and a client that holds an admin token (and a worker's, for heartbeats)."""
    server = await start_registry()
    client = Reg(f"127.0.0.1:{server.port}", token, worker_token=worker_token)
    yield client
    await client.close()
