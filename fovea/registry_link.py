"""The async registry client that workers and gateways use (their service token, TLS, deadlines, reconnects)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from fovea import crypto
from fovea.config import channel_options
from fovea.errors import IntegrityError, RegistryUnavailable, UpstreamError
from fovea.rpc import call_metadata
from fovea.v1 import model_pb2, registry_pb2, registry_pb2_grpc

logger = logging.getLogger(__name__)


def upstream(exc: grpc.aio.AioRpcError) -> Exception:
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        return RegistryUnavailable(f"registry unavailable: {exc.details()}")
    return UpstreamError(exc.code(), exc.details() or "")


class RegistryLink:
    def __init__(
        self,
        address: str,
        token: str,
        max_message_bytes: int = 64 * 1024 * 1024,
        timeout_s: float = 10.0,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """credentials: TLS for the hop (BaseConfig.channel_credentials()); None dials plaintext."""
        self.address = address
        self.token = token
        self.timeout_s = timeout_s
        options = channel_options(max_message_bytes)
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(address, options=options)
        else:
            self.channel = grpc.aio.secure_channel(address, credentials, options=options)
        self.stub = registry_pb2_grpc.RegistryServiceStub(self.channel)

    def _md(self) -> Any:
        return call_metadata(self.token)

    async def close(self) -> None:
        await self.channel.close()

    async def resolve(self, model: str, version: int = 0, alias: str = "") -> registry_pb2.GetModelVersionResponse:
        try:
            return await self.stub.GetModelVersion(
                registry_pb2.GetModelVersionRequest(model=model, version=version, alias=alias),
                metadata=self._md(),
                timeout=self.timeout_s,
            )
        except grpc.aio.AioRpcError as exc:
            raise upstream(exc) from None

    async def download(self, mv: model_pb2.ModelVersion, keys: bytes | list[bytes] | None) -> bytes:
        """The artifact's plaintext, decrypted in memory and checked against its SHA-256."""
        parts = []
        try:
            async for chunk in self.stub.DownloadArtifact(
                registry_pb2.DownloadArtifactRequest(model=mv.name, version=mv.version),
                metadata=self._md(),
                timeout=max(self.timeout_s, 300.0),
            ):
                parts.append(chunk.chunk)
        except grpc.aio.AioRpcError as exc:
            raise upstream(exc) from None
        data = crypto.decrypt(keys, b"".join(parts), mv.sha256)
        digest = hashlib.sha256(data).hexdigest()
        if digest != mv.sha256:
            raise IntegrityError(
                f"artifact of {mv.name} v{mv.version} has SHA-256 {digest[:16]}..., the registry "
                f"recorded {mv.sha256[:16]}...; refusing to load it"
            )
        return data

    async def heartbeat(self, status: registry_pb2.WorkerStatus) -> registry_pb2.HeartbeatResponse:
        """Send the status; the answer carries the TTL and, to a pool worker, its assigned models."""
        resp: registry_pb2.HeartbeatResponse = await self.stub.Heartbeat(
            registry_pb2.HeartbeatRequest(status=status), metadata=self._md(), timeout=min(self.timeout_s, 3.0)
        )
        return resp

    async def demand(self, model: str) -> registry_pb2.ModelPlacement:
        """Ask for a model with no ready replica to be placed now (gateways); its placement says whether
        waiting can help (UNPLACEABLE: it cannot)."""
        try:
            resp = await self.stub.DemandModel(
                registry_pb2.DemandModelRequest(model=model), metadata=self._md(), timeout=self.timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise upstream(exc) from None
        return resp.placement

    async def list_placements(self, model: str = "") -> list[registry_pb2.ModelPlacement]:
        try:
            resp = await self.stub.ListPlacements(
                registry_pb2.ListPlacementsRequest(model=model), metadata=self._md(), timeout=self.timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise upstream(exc) from None
        return list(resp.placements)

    async def list_workers(
        self, model: str = "", version: int = 0, ready_only: bool = False
    ) -> list[registry_pb2.WorkerStatus]:
        resp = await self.stub.ListWorkers(
            registry_pb2.ListWorkersRequest(model=model, version=version, ready_only=ready_only),
            metadata=self._md(),
            timeout=self.timeout_s,
        )
        return list(resp.workers)

    async def verify_key(self, secret: str) -> registry_pb2.ApiKey:
        try:
            resp = await self.stub.VerifyApiKey(
                registry_pb2.VerifyApiKeyRequest(secret=secret), metadata=self._md(), timeout=self.timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise upstream(exc) from None
        return resp.key

    async def follow(
        self, name: str, open_stream: Callable[[], Any], handle: Callable[[Any], Any], stop: asyncio.Event
    ) -> None:
        """Consume a watch stream forever, reopening it with backoff; each reopen starts with a snapshot."""
        backoff = 0.05
        while not stop.is_set():
            call = open_stream()
            try:
                async for event in call:
                    backoff = 0.05
                    result = handle(event)
                    if asyncio.iscoroutine(result):
                        await result
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.CANCELLED and stop.is_set():
                    return
                logger.warning("%s watch lost (%s); reconnecting", name, exc.code().name)
            except asyncio.CancelledError:
                call.cancel()
                raise
            try:
                await asyncio.wait_for(stop.wait(), backoff)
            except TimeoutError:
                pass
            backoff = min(backoff * 2, 1.0)

    def watch_models(self) -> AsyncIterator[registry_pb2.WatchModelsResponse]:
        return self.stub.WatchModels(registry_pb2.WatchModelsRequest(), metadata=self._md())

    def watch_workers(self) -> AsyncIterator[registry_pb2.WatchWorkersResponse]:
        return self.stub.WatchWorkers(registry_pb2.WatchWorkersRequest(), metadata=self._md())

    def watch_keys(self) -> AsyncIterator[registry_pb2.WatchApiKeysResponse]:
        return self.stub.WatchApiKeys(registry_pb2.WatchApiKeysRequest(), metadata=self._md())
