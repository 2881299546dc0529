"""Small real helpers for registry tests: an async client, status capture, polling."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import grpc

from fovea.v1 import model_pb2, registry_pb2, registry_pb2_grpc
from tests.tinymodels import color_model

T = TypeVar("T")
CHUNK = 64 * 1024


class Reg:
    """An async registry client with one token (and a worker's token for heartbeats); every call has a deadline."""

    def __init__(self, address: str, token: str, timeout_s: float = 20.0, worker_token: str = "") -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = registry_pb2_grpc.RegistryServiceStub(self.channel)
        self.md = (("authorization", f"Bearer {token}"),)
        # Only workers may heartbeat (registry/service.py), so heartbeats go with a worker's token.
        self.worker_md = (("authorization", f"Bearer {worker_token}"),) if worker_token else self.md

    async def close(self) -> None:
        await self.channel.close()

    def with_token(self, token: str) -> Reg:
        return Reg(self.address, token, self.timeout_s)

    async def register(
        self, name: str, data: bytes | None = None, chunk: int = CHUNK, **fields: Any
    ) -> model_pb2.ModelVersion:
        data = color_model() if data is None else data
        meta = model_pb2.ModelVersion(name=name, **fields)

        async def parts() -> AsyncIterator[registry_pb2.RegisterModelRequest]:
            yield registry_pb2.RegisterModelRequest(metadata=meta)
            for i in range(0, len(data), chunk):
                yield registry_pb2.RegisterModelRequest(chunk=data[i : i + chunk])

        resp = await self.stub.RegisterModel(parts(), metadata=self.md, timeout=self.timeout_s)
        return resp.model

    async def call(self, method: str, request: Any) -> Any:
        md = self.worker_md if method == "Heartbeat" else self.md
        return await getattr(self.stub, method)(request, metadata=md, timeout=self.timeout_s)

    async def set_alias(self, model: str, alias: str, *targets: tuple[int, int]) -> registry_pb2.SetAliasResponse:
        req = registry_pb2.SetAliasRequest(
            model=model, alias=alias, targets=[model_pb2.AliasTarget(version=v, weight=w) for v, w in targets]
        )
        return await self.call("SetAlias", req)

    async def resolve(self, model: str, version: int = 0, alias: str = "") -> registry_pb2.GetModelVersionResponse:
        return await self.call(
            "GetModelVersion", registry_pb2.GetModelVersionRequest(model=model, version=version, alias=alias)
        )

    async def create_key(
        self, role: registry_pb2.Role, patterns: tuple[str, ...] = (), ttl_s: int = 0
    ) -> tuple[registry_pb2.ApiKey, str]:
        resp = await self.call(
            "CreateApiKey", registry_pb2.CreateApiKeyRequest(role=role, model_patterns=patterns, ttl_s=ttl_s)
        )
        return resp.key, resp.secret

    async def heartbeat(
        self,
        worker_id: str,
        models: tuple[tuple[str, int], ...] = (),
        state: registry_pb2.WorkerState = registry_pb2.WORKER_STATE_READY,
    ) -> float:
        status = registry_pb2.WorkerStatus(
            worker_id=worker_id,
            address=f"127.0.0.1:{abs(hash(worker_id)) % 50000 + 1024}",
            state=state,
            models=[
                registry_pb2.LoadedModel(name=n, version=v, ready=True, provider="CPUExecutionProvider")
                for n, v in models
            ],
            device=registry_pb2.Device(kind="CPU", name="test cpu"),
        )
        resp = await self.call("Heartbeat", registry_pb2.HeartbeatRequest(status=status))
        return resp.ttl_s

    async def download(self, model: str, version: int) -> bytes:
        parts = []
        async for r in self.stub.DownloadArtifact(
            registry_pb2.DownloadArtifactRequest(model=model, version=version), metadata=self.md, timeout=self.timeout_s
        ):
            parts.append(r.chunk)
        return b"".join(parts)


async def status_of(awaitable: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    """The status an RPC fails with; fails the test if it succeeds."""
    try:
        await awaitable
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    raise AssertionError("the call succeeded; expected an error status")


async def poll(check: Callable[[], Awaitable[T]], timeout_s: float = 10.0, every_s: float = 0.05) -> T:
    """Await check() until it returns something truthy; fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(every_s)
    raise AssertionError(f"condition not met within {timeout_s}s; last value {last!r}")


class Watch:
    """Reads a server stream on a task, so a test can wait for messages with a timeout."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for msg in self.call:
                self.queue.put_nowait((time.monotonic(), msg))
        except grpc.aio.AioRpcError as exc:
            self.queue.put_nowait((time.monotonic(), exc))

    async def next(self, timeout_s: float = 10.0) -> tuple[float, Any]:
        return await asyncio.wait_for(self.queue.get(), timeout_s)

    async def until(self, predicate: Callable[[Any], bool], timeout_s: float = 10.0) -> tuple[float, Any]:
        """The first message (with its arrival time) that satisfies predicate."""
        deadline = time.monotonic() + timeout_s
        while True:
            at, msg = await self.next(max(0.01, deadline - time.monotonic()))
            if isinstance(msg, Exception):
                raise msg
            if predicate(msg):
                return at, msg

    def close(self) -> None:
        self.call.cancel()
        self.task.cancel()


def redis_state(url: str) -> dict[bytes | str, bytes | None]:
    """Every key of the database with its DUMP, to prove nothing changed (redis-py's types allow str keys and
    a None DUMP, for a client that decodes and a key that went away)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        return {k: client.dump(k) for k in sorted(client.keys("*"))}
    finally:
        client.close()


def files_under(root: Any) -> list[str]:
    import pathlib

    root = pathlib.Path(root)
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def chunks_of(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]
