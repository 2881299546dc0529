"""Gateway test fixtures: a registry and two workers as real processes (shared by a test module),
and gateways built in-process with the same build_server() that main() uses."""

from __future__ import annotations

import asyncio
import itertools
import pathlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
import redis

from fovea.client import RegistryClient
from fovea.cluster import Cluster, Service
from fovea.redis_server import RedisServer
from fovea.v1 import image_pb2, image_pb2_grpc, model_pb2
from gateway.config import GatewayConfig
from gateway.server import GatewayServer, build_server
from tests.tinymodels import color_model, identity_model

# Each module-scoped stack gets its own Redis database, so the function-scoped
# `redis_url` fixture (FLUSHDB on database 0) of other tests cannot wipe it.
_next_db = itertools.cycle(range(1, 16))  # a module's stack is stopped before the next module's starts


@dataclass
class Stack:
    cluster: Cluster
    registry: Service
    workers: list[Service]
    rc: RegistryClient
    redis_url: str

    def key(self, role: str = "infer", **kwargs: Any) -> str:
        return self.rc.create_key(role, **kwargs)[1]


def start_stack(tmp: pathlib.Path, redis_url: str, n_workers: int = 2, **registry_env: str) -> Stack:
    cluster = Cluster(tmp, redis_url=redis_url)
    reg = cluster.start_registry(port=0, **registry_env)
    rc = RegistryClient(reg.address, cluster.admin_token, timeout_s=30)
    for name, artifact in (("colors", color_model()), ("ident", identity_model())):
        mv = rc.register(artifact, model_pb2.ModelVersion(name=name))
        rc.set_alias(name, "production", [(mv.version, 100)])
    workers = [
        cluster.start_worker(
            reg.address,
            ["colors", "ident"],
            name=f"worker{i}",
            FOVEA_WORKER_INTRA_OP_THREADS="1",
            FOVEA_WORKER_DECODE_THREADS="1",
        )
        for i in range(n_workers)
    ]
    stack = Stack(cluster, reg, workers, rc, redis_url)
    wait_ready_workers(stack, n_workers)
    return stack


def wait_ready_workers(stack: Stack, n: int, timeout_s: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready = stack.rc.list_workers("colors", ready_only=True)
        if len(ready) >= n and len(stack.rc.list_workers("ident", ready_only=True)) >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"fewer than {n} workers became ready")


@pytest.fixture(scope="module")
def stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    url = redis_server.url.rsplit("/", 1)[0] + f"/{next(_next_db)}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    s = start_stack(tmp_path_factory.mktemp("gwstack"), url)
    yield s
    s.cluster.stop()


@pytest.fixture
def own_stack(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A stack of its own, for tests that kill one of its workers (Redis database 15). Its registry keeps a
    silent worker for 15 s, so that a test can restart a killed worker before the registry forgets it;
    the gateways set a dead worker aside by themselves long before."""
    url = redis_server.url.rsplit("/", 1)[0] + "/15"
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    s = start_stack(tmp_path_factory.mktemp("failover"), url, FOVEA_REGISTRY_HEARTBEAT_TTL_S="15")
    yield s
    s.cluster.stop()


GatewayFactory = Callable[..., Awaitable[GatewayServer]]


@pytest.fixture
async def gateways(stack: Stack) -> AsyncIterator[GatewayFactory]:
    """start(**config_overrides) builds an in-process gateway on a free port; all stop at the end."""
    started: list[GatewayServer] = []

    async def start(**overrides: Any) -> GatewayServer:
        fields: dict[str, Any] = dict(
            port=0,
            registry_address=stack.registry.address,
            registry_token=stack.cluster.gateway_token,
            worker_token=stack.cluster.worker_call_token,
            log_json=True,
        )
        fields.update(overrides)
        srv = await build_server(GatewayConfig(**fields))
        started.append(srv)
        await wait_routable(srv, "colors")
        return srv

    yield start
    for srv in started:
        await srv.stop(0)


async def wait_routable(srv: GatewayServer, model: str, timeout_s: float = 20.0) -> None:
    """Wait until the gateway's worker view has the model ready somewhere."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if any(m.name == model and m.ready for ep in srv.gateway.workers.endpoints.values() for m in ep.status.models):
            # and the fast port's table has the model's alias and a worker for it
            if srv.native is None or (srv.native.routes.has_alias(model) and srv.native.routes.workers_of(model)):
                return
        await asyncio.sleep(0.05)
    raise AssertionError(f"gateway never saw a worker with {model} ready")


async def gateway_over_workers(stack: Stack, model: str, n: int = 2, **overrides: Any) -> GatewayServer:
    """A gateway of its own (the caller stops it) that sees n workers and can route the model."""
    gw = await build_server(
        GatewayConfig(
            port=0,
            registry_address=stack.registry.address,
            registry_token=stack.cluster.gateway_token,
            worker_token=stack.cluster.worker_call_token,
            **overrides,
        )
    )
    await wait_routable(gw, model)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while len(gw.gateway.workers.endpoints) < n and loop.time() < deadline:
        await asyncio.sleep(0.05)
    return gw


def auth(secret: str, rid: str = "") -> tuple[tuple[str, str], ...]:
    md: list[tuple[str, str]] = [("authorization", f"Bearer {secret}")]
    if rid:
        md.append(("x-request-id", rid))
    return tuple(md)


def image_stub(srv: GatewayServer | str) -> tuple[grpc.aio.Channel, image_pb2_grpc.ImageServiceStub]:
    address = srv if isinstance(srv, str) else f"127.0.0.1:{srv.port}"
    channel = grpc.aio.insecure_channel(address)
    return channel, image_pb2_grpc.ImageServiceStub(channel)


def classify_request(*images: bytes, model: str = "colors", top_k: int = 1) -> image_pb2.ClassifyRequest:
    return image_pb2.ClassifyRequest(
        model=model, top_k=top_k, images=[image_pb2.Image(data=d, id=str(i)) for i, d in enumerate(images)]
    )


async def status_of(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""
