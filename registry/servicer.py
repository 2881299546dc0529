"""gRPC adapter for the registry: validate names, check access, call the registry, convert back."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from fovea.errors import InvalidArgument, InvalidState
from fovea.names import check_name, model_allowed
from fovea.rpc import principal
from fovea.v1 import model_pb2, registry_pb2, registry_pb2_grpc
from registry.artifacts import Upload
from registry.placements import Placements
from registry.service import GATEWAY, READERS, WORKER, Registry, check_access, check_service

logger = logging.getLogger(__name__)
INFER, PUBLISH, ADMIN = registry_pb2.ROLE_INFER, registry_pb2.ROLE_PUBLISH, registry_pb2.ROLE_ADMIN


def _caller_id() -> str:
    p = principal.get()
    return p.key_id if isinstance(p, registry_pb2.ApiKey) else getattr(p, "kind", "")


def _alias(name: str) -> str:
    return check_name(name, "alias") if name else ""


def _visible(event: registry_pb2.WatchModelsResponse, patterns: list[str]) -> registry_pb2.WatchModelsResponse | None:
    """The part of a model event an API key limited to some models may see (None when nothing)."""
    if not patterns:
        return event
    out = registry_pb2.WatchModelsResponse(snapshot=event.snapshot)
    out.aliases.extend(a for a in event.aliases if model_allowed(patterns, a.model))
    out.versions.extend(v for v in event.versions if model_allowed(patterns, v.name))
    out.removed_aliases.extend(r for r in event.removed_aliases if model_allowed(patterns, r.split("/")[0]))
    if out.snapshot or out.aliases or out.versions or out.removed_aliases:
        return out
    return None


async def read_upload(
    requests: AsyncIterator[registry_pb2.RegisterModelRequest], max_bytes: int, on_metadata: Any, upload: Upload
) -> model_pb2.ModelVersion:
    """The metadata of a RegisterModel stream; its chunks go to upload's file as they arrive (only
    one is in memory at a time), and the stream is refused once it passes max_bytes."""
    metadata: model_pb2.ModelVersion | None = None
    async for req in requests:
        which = req.WhichOneof("part")
        if metadata is None:
            if which != "metadata":
                raise InvalidArgument("the first RegisterModel message must carry the metadata")
            metadata = req.metadata
            on_metadata(metadata)
            continue
        if which != "chunk":
            raise InvalidArgument("metadata may only be sent once, first")
        if upload.size + len(req.chunk) > max_bytes:
            raise InvalidArgument(f"artifact exceeds the limit of {max_bytes} bytes (max_artifact_bytes)")
        # Disk writes may block (a network volume), so they run off the event loop.
        await asyncio.to_thread(upload.write, req.chunk)
    if metadata is None:
        raise InvalidArgument("empty RegisterModel stream: send the metadata, then the artifact in chunks")
    return metadata


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(
        self, registry: Registry, placements: Placements, chunk_bytes: int, max_concurrent_uploads: int = 4
    ) -> None:
        self.registry = registry
        self.placements = placements
        self.catalog = registry.catalog
        self.chunk_bytes = chunk_bytes
        # Each upload is validated by a child process that holds the model in memory; this bounds how many at once.
        self.uploads = asyncio.Semaphore(max_concurrent_uploads)

    # ---- models ---------------------------------------------------------

    async def RegisterModel(
        self, request_iterator: AsyncIterator[registry_pb2.RegisterModelRequest], context: grpc.aio.ServicerContext
    ) -> registry_pb2.RegisterModelResponse:
        def on_metadata(mv: model_pb2.ModelVersion) -> None:
            check_name(mv.name)
            check_access(principal.get(), PUBLISH, mv.name)

        async with self.uploads:
            with self.registry.store.begin_upload() as upload:
                metadata = await read_upload(request_iterator, self.registry.max_artifact_bytes, on_metadata, upload)
                mv = await self.catalog.register(metadata, upload, _caller_id())
        return registry_pb2.RegisterModelResponse(model=mv)

    async def GetModelVersion(
        self, request: registry_pb2.GetModelVersionRequest, context: Any
    ) -> registry_pb2.GetModelVersionResponse:
        check_name(request.model)
        _alias(request.alias)
        check_access(principal.get(), INFER, request.model, services=READERS)
        mv, alias = await self.catalog.resolve(request.model, request.version, request.alias)
        return registry_pb2.GetModelVersionResponse(model=mv, alias=alias)

    async def ListModels(self, request: model_pb2.ListModelsRequest, context: Any) -> model_pb2.ListModelsResponse:
        p = principal.get()
        check_access(p, INFER, services=READERS)
        models = await self.catalog.list_models()
        if isinstance(p, registry_pb2.ApiKey):
            models = [m for m in models if model_allowed(list(p.model_patterns), m.name)]
        return model_pb2.ListModelsResponse(models=models)

    async def ListVersions(
        self, request: registry_pb2.ListVersionsRequest, context: Any
    ) -> registry_pb2.ListVersionsResponse:
        check_name(request.model)
        check_access(principal.get(), INFER, request.model, services=READERS)
        return registry_pb2.ListVersionsResponse(versions=await self.catalog.list_versions(request.model))

    async def ArchiveVersion(
        self, request: registry_pb2.ArchiveVersionRequest, context: Any
    ) -> registry_pb2.ArchiveVersionResponse:
        check_name(request.model)
        check_access(principal.get(), PUBLISH, request.model)
        return registry_pb2.ArchiveVersionResponse(model=await self.catalog.archive(request.model, request.version))

    async def DownloadArtifact(
        self, request: registry_pb2.DownloadArtifactRequest, context: Any
    ) -> AsyncIterator[registry_pb2.DownloadArtifactResponse]:
        check_name(request.model)
        check_access(principal.get(), PUBLISH, request.model, services=frozenset({WORKER}))
        mv = await self.catalog.get_version(request.model, request.version)
        chunks = self.catalog.artifact_chunks(mv, self.chunk_bytes)
        # File reads may block (a network volume), so they run off the event loop.
        while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
            yield registry_pb2.DownloadArtifactResponse(chunk=chunk)

    # ---- aliases --------------------------------------------------------

    async def SetAlias(self, request: registry_pb2.SetAliasRequest, context: Any) -> registry_pb2.SetAliasResponse:
        check_name(request.model)
        check_name(request.alias, "alias")
        check_access(principal.get(), PUBLISH, request.model)
        new, previous = await self.catalog.set_alias(request.model, request.alias, list(request.targets))
        return registry_pb2.SetAliasResponse(alias=new, previous=previous)

    async def RollbackAlias(
        self, request: registry_pb2.RollbackAliasRequest, context: Any
    ) -> registry_pb2.RollbackAliasResponse:
        check_name(request.model)
        _alias(request.alias)
        check_access(principal.get(), PUBLISH, request.model)
        restored, previous = await self.catalog.rollback_alias(request.model, request.alias)
        return registry_pb2.RollbackAliasResponse(alias=restored, previous=previous)

    async def DeleteAlias(
        self, request: registry_pb2.DeleteAliasRequest, context: Any
    ) -> registry_pb2.DeleteAliasResponse:
        check_name(request.model)
        check_name(request.alias, "alias")
        check_access(principal.get(), PUBLISH, request.model)
        return registry_pb2.DeleteAliasResponse(alias=await self.catalog.delete_alias(request.model, request.alias))

    async def GetAliasHistory(
        self, request: registry_pb2.GetAliasHistoryRequest, context: Any
    ) -> registry_pb2.GetAliasHistoryResponse:
        check_name(request.model)
        _alias(request.alias)
        check_access(principal.get(), INFER, request.model, services=READERS)
        current, history = await self.catalog.alias_history(request.model, request.alias)
        return registry_pb2.GetAliasHistoryResponse(alias=current, history=history)

    async def WatchModels(
        self, request: registry_pb2.WatchModelsRequest, context: Any
    ) -> AsyncIterator[registry_pb2.WatchModelsResponse]:
        p = principal.get()
        check_access(p, INFER, services=READERS)
        patterns = list(p.model_patterns) if isinstance(p, registry_pb2.ApiKey) else []
        async for event in self.catalog.watch():
            visible = _visible(event, patterns)
            if visible is not None:
                yield visible

    # ---- API keys -------------------------------------------------------

    async def CreateApiKey(
        self, request: registry_pb2.CreateApiKeyRequest, context: Any
    ) -> registry_pb2.CreateApiKeyResponse:
        check_access(principal.get(), ADMIN, all_models=True)
        record, secret = await self.registry.api_keys.create(request)
        return registry_pb2.CreateApiKeyResponse(key=record, secret=secret)

    async def ListApiKeys(
        self, request: registry_pb2.ListApiKeysRequest, context: Any
    ) -> registry_pb2.ListApiKeysResponse:
        check_access(principal.get(), ADMIN, all_models=True)
        return registry_pb2.ListApiKeysResponse(keys=await self.registry.api_keys.list())

    async def RevokeApiKey(
        self, request: registry_pb2.RevokeApiKeyRequest, context: Any
    ) -> registry_pb2.RevokeApiKeyResponse:
        check_access(principal.get(), ADMIN, all_models=True)
        return registry_pb2.RevokeApiKeyResponse(key=await self.registry.api_keys.revoke(request.key_id))

    async def VerifyApiKey(
        self, request: registry_pb2.VerifyApiKeyRequest, context: Any
    ) -> registry_pb2.VerifyApiKeyResponse:
        check_service(principal.get(), GATEWAY, "VerifyApiKey")
        return registry_pb2.VerifyApiKeyResponse(key=await self.registry.api_keys.verify(request.secret))

    async def WatchApiKeys(
        self, request: registry_pb2.WatchApiKeysRequest, context: Any
    ) -> AsyncIterator[registry_pb2.WatchApiKeysResponse]:
        check_access(principal.get(), ADMIN, all_models=True, services=frozenset({GATEWAY}))
        async for event in self.registry.api_keys.watch():
            yield event

    async def ReencryptArtifacts(
        self, request: registry_pb2.ReencryptArtifactsRequest, context: Any
    ) -> registry_pb2.ReencryptArtifactsResponse:
        check_access(principal.get(), ADMIN, all_models=True)
        try:
            done = await asyncio.to_thread(self.registry.store.reencrypt)
        except ValueError as exc:
            raise InvalidState(str(exc)) from None
        if done.unreadable:
            logger.warning(
                "re-encryption left %d artifact(s) no configured key opens: %s",
                len(done.unreadable),
                ", ".join(d[:16] for d in done.unreadable),
            )
        logger.info("re-encrypted %d artifact(s); %d already under the current key", done.rewritten, done.unchanged)
        return registry_pb2.ReencryptArtifactsResponse(
            rewritten=done.rewritten, unchanged=done.unchanged, unreadable=done.unreadable
        )

    # ---- workers --------------------------------------------------------

    async def Heartbeat(self, request: registry_pb2.HeartbeatRequest, context: Any) -> registry_pb2.HeartbeatResponse:
        check_service(principal.get(), WORKER, "Heartbeat")
        ttl_s = await self.registry.workers.heartbeat(request.status)
        assigned, known = await self.placements.on_heartbeat(request.status, ttl_s)
        return registry_pb2.HeartbeatResponse(ttl_s=ttl_s, assigned_models=assigned, assignment_known=known)

    async def ListWorkers(
        self, request: registry_pb2.ListWorkersRequest, context: Any
    ) -> registry_pb2.ListWorkersResponse:
        if request.model:
            check_name(request.model)
        check_access(principal.get(), ADMIN, request.model, all_models=not request.model)
        workers = await self.registry.workers.list(request.model, request.version, request.ready_only)
        return registry_pb2.ListWorkersResponse(workers=workers)

    async def WatchWorkers(
        self, request: registry_pb2.WatchWorkersRequest, context: Any
    ) -> AsyncIterator[registry_pb2.WatchWorkersResponse]:
        check_access(principal.get(), ADMIN, all_models=True, services=frozenset({GATEWAY}))
        async for event in self.registry.workers.watch():
            yield event

    # ---- placement ------------------------------------------------------

    async def SetModelScale(
        self, request: registry_pb2.SetModelScaleRequest, context: Any
    ) -> registry_pb2.SetModelScaleResponse:
        check_name(request.scale.model)
        check_access(principal.get(), PUBLISH, request.scale.model)
        return registry_pb2.SetModelScaleResponse(placement=await self.placements.set_scale(request.scale))

    async def ListPlacements(
        self, request: registry_pb2.ListPlacementsRequest, context: Any
    ) -> registry_pb2.ListPlacementsResponse:
        if request.model:
            check_name(request.model)
        p = principal.get()
        check_access(p, INFER, request.model, services=READERS)
        placements, leader = await self.placements.list_placements(request.model)
        if isinstance(p, registry_pb2.ApiKey):
            placements = [x for x in placements if model_allowed(list(p.model_patterns), x.scale.model)]
        return registry_pb2.ListPlacementsResponse(placements=placements, leader=leader)

    async def DemandModel(
        self, request: registry_pb2.DemandModelRequest, context: Any
    ) -> registry_pb2.DemandModelResponse:
        check_service(principal.get(), GATEWAY, "DemandModel")
        check_name(request.model)
        return registry_pb2.DemandModelResponse(placement=await self.placements.demand(request.model))
