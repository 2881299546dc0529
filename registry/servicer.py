"""gRPC adapter for the registry: check access, call Registry, convert back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from fovea.errors import InvalidArgument
from fovea.rpc import principal
from fovea.v1 import model_pb2, registry_pb2, registry_pb2_grpc
from registry.service import Registry, check_access

INFER, PUBLISH, ADMIN = registry_pb2.ROLE_INFER, registry_pb2.ROLE_PUBLISH, registry_pb2.ROLE_ADMIN


def _caller_id() -> str:
    p = principal.get()
    return p.key_id if isinstance(p, registry_pb2.ApiKey) else "internal"


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    def __init__(self, registry: Registry, chunk_bytes: int) -> None:
        self.registry = registry
        self.chunk_bytes = chunk_bytes

    async def RegisterModel(self, request_iterator: AsyncIterator[registry_pb2.RegisterModelRequest], context: grpc.aio.ServicerContext) -> registry_pb2.RegisterModelResponse:
        metadata: model_pb2.ModelVersion | None = None
        parts: list[bytes] = []
        size = 0
        async for req in request_iterator:
            which = req.WhichOneof("part")
            if metadata is None:
                if which != "metadata":
                    raise InvalidArgument("the first RegisterModel message must carry the metadata")
                metadata = req.metadata
                check_access(principal.get(), PUBLISH, metadata.name)
                continue
            if which != "chunk":
                raise InvalidArgument("metadata may only be sent once, first")
            size += len(req.chunk)
            if size > self.registry.max_artifact_bytes:
                raise InvalidArgument(f"artifact exceeds the limit of {self.registry.max_artifact_bytes} bytes")
            parts.append(req.chunk)
        if metadata is None:
            raise InvalidArgument("empty RegisterModel stream")
        mv = await self.registry.register(metadata, b"".join(parts), _caller_id())
        return registry_pb2.RegisterModelResponse(model=mv)

    async def GetModelVersion(self, request: registry_pb2.GetModelVersionRequest, context: Any) -> registry_pb2.GetModelVersionResponse:
        check_access(principal.get(), INFER, request.model)
        mv, alias = await self.registry.resolve(request.model, request.version, request.alias)
        return registry_pb2.GetModelVersionResponse(model=mv, alias=alias)

    async def ListModels(self, request: model_pb2.ListModelsRequest, context: Any) -> model_pb2.ListModelsResponse:
        check_access(principal.get(), INFER)
        p = principal.get()
        models = await self.registry.list_models()
        if isinstance(p, registry_pb2.ApiKey):
            from registry.service import model_allowed

            models = [m for m in models if model_allowed(list(p.model_patterns), m.name)]
        return model_pb2.ListModelsResponse(models=models)

    async def ListVersions(self, request: registry_pb2.ListVersionsRequest, context: Any) -> registry_pb2.ListVersionsResponse:
        check_access(principal.get(), INFER, request.model)
        return registry_pb2.ListVersionsResponse(versions=await self.registry.list_versions(request.model))

    async def SetAlias(self, request: registry_pb2.SetAliasRequest, context: Any) -> registry_pb2.SetAliasResponse:
        check_access(principal.get(), PUBLISH, request.model)
        new, previous = await self.registry.set_alias(request.model, request.alias, list(request.targets))
        return registry_pb2.SetAliasResponse(alias=new, previous=previous)

    async def ArchiveVersion(self, request: registry_pb2.ArchiveVersionRequest, context: Any) -> registry_pb2.ArchiveVersionResponse:
        check_access(principal.get(), PUBLISH, request.model)
        return registry_pb2.ArchiveVersionResponse(model=await self.registry.archive(request.model, request.version))

    async def DownloadArtifact(self, request: registry_pb2.DownloadArtifactRequest, context: Any) -> AsyncIterator[registry_pb2.DownloadArtifactResponse]:
        check_access(principal.get(), PUBLISH, request.model)
        mv = await self.registry.get_version(request.model, request.version)
        for chunk in self.registry.artifact_chunks(mv.sha256, self.chunk_bytes):
            yield registry_pb2.DownloadArtifactResponse(chunk=chunk)

    async def CreateApiKey(self, request: registry_pb2.CreateApiKeyRequest, context: Any) -> registry_pb2.CreateApiKeyResponse:
        check_access(principal.get(), ADMIN)
        record, secret = await self.registry.create_key(request)
        return registry_pb2.CreateApiKeyResponse(key=record, secret=secret)

    async def ListApiKeys(self, request: registry_pb2.ListApiKeysRequest, context: Any) -> registry_pb2.ListApiKeysResponse:
        check_access(principal.get(), ADMIN)
        return registry_pb2.ListApiKeysResponse(keys=await self.registry.list_keys())

    async def RevokeApiKey(self, request: registry_pb2.RevokeApiKeyRequest, context: Any) -> registry_pb2.RevokeApiKeyResponse:
        check_access(principal.get(), ADMIN)
        return registry_pb2.RevokeApiKeyResponse(key=await self.registry.revoke_key(request.key_id))

    async def VerifyApiKey(self, request: registry_pb2.VerifyApiKeyRequest, context: Any) -> registry_pb2.VerifyApiKeyResponse:
        check_access(principal.get(), ADMIN)
        return registry_pb2.VerifyApiKeyResponse(key=await self.registry.verify_key(request.secret))

    async def Heartbeat(self, request: registry_pb2.HeartbeatRequest, context: Any) -> registry_pb2.HeartbeatResponse:
        check_access(principal.get(), ADMIN)
        return registry_pb2.HeartbeatResponse(ttl_s=await self.registry.heartbeat(request.status))

    async def ListWorkers(self, request: registry_pb2.ListWorkersRequest, context: Any) -> registry_pb2.ListWorkersResponse:
        check_access(principal.get(), ADMIN)
        workers = await self.registry.list_workers(request.model, request.version, request.ready_only)
        return registry_pb2.ListWorkersResponse(workers=workers)

    async def WatchModels(self, request: registry_pb2.WatchModelsRequest, context: Any) -> AsyncIterator[registry_pb2.WatchModelsResponse]:
        check_access(principal.get(), INFER)
        async for event in self.registry.watch_models():
            yield event

    async def WatchWorkers(self, request: registry_pb2.WatchWorkersRequest, context: Any) -> AsyncIterator[registry_pb2.WatchWorkersResponse]:
        check_access(principal.get(), ADMIN)
        async for event in self.registry.watch_workers():
            yield event

    async def WatchApiKeys(self, request: registry_pb2.WatchApiKeysRequest, context: Any) -> AsyncIterator[registry_pb2.WatchApiKeysResponse]:
        check_access(principal.get(), ADMIN)
        async for event in self.registry.watch_keys():
            yield event

