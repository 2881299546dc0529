"""Python clients: Client for the gateway's image API, RegistryClient for publishing and keys.

from fovea.client import Client
with Client("127.0.0.1:8500", api_key) as c:
    result = c.classify([open("cat.jpg", "rb").read()], model="efficientnet-lite0")
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grpc

from fovea import codegen

codegen.require()

from fovea.config import channel_options  # noqa: E402
from fovea.v1 import image_pb2, image_pb2_grpc, model_pb2, registry_pb2, registry_pb2_grpc  # noqa: E402

CHUNK_BYTES = 1024 * 1024
ROLES = {"infer": registry_pb2.ROLE_INFER, "publish": registry_pb2.ROLE_PUBLISH, "admin": registry_pb2.ROLE_ADMIN}


def _channel(
    address: str,
    tls_ca_file: str | None,
    max_message_bytes: int,
    tls_cert_file: str | None = None,
    tls_key_file: str | None = None,
) -> grpc.Channel:
    """Plaintext unless tls_ca_file is given ("" = the system's roots); a client certificate for mutual TLS."""
    options = channel_options(max_message_bytes)
    if tls_ca_file is not None:
        ca = pathlib.Path(tls_ca_file).read_bytes() if tls_ca_file else None
        cert = pathlib.Path(tls_cert_file).read_bytes() if tls_cert_file else None
        key = pathlib.Path(tls_key_file).read_bytes() if tls_key_file else None
        creds = grpc.ssl_channel_credentials(ca, private_key=key, certificate_chain=cert)
        return grpc.secure_channel(address, creds, options=options)
    return grpc.insecure_channel(address, options=options)


class _Base:
    def __init__(
        self,
        address: str,
        token: str,
        timeout_s: float = 30.0,
        tls_ca_file: str | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
        tls_cert_file: str | None = None,
        tls_key_file: str | None = None,
    ) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.channel = _channel(address, tls_ca_file, max_message_bytes, tls_cert_file, tls_key_file)

    def _md(self, request_id: str = "") -> tuple[tuple[str, str], ...]:
        return self.metadata + ((("x-request-id", request_id),) if request_id else ())

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Client(_Base):
    """The public image API, through a gateway."""

    def __init__(self, address: str, api_key: str, **kwargs: Any) -> None:
        super().__init__(address, api_key, **kwargs)
        self.stub = image_pb2_grpc.ImageServiceStub(self.channel)

    def classify(
        self,
        images: Sequence[bytes],
        model: str,
        top_k: int = 5,
        version: int = 0,
        alias: str = "",
        ids: Sequence[str] | None = None,
        request_id: str = "",
    ) -> image_pb2.ClassifyResponse:
        req = image_pb2.ClassifyRequest(model=model, version=version, alias=alias, top_k=top_k)
        for i, data in enumerate(images):
            req.images.add(data=data, id=ids[i] if ids else str(i))
        return self.stub.Classify(req, metadata=self._md(request_id), timeout=self.timeout_s)

    def classify_stream(
        self, requests: Iterable[image_pb2.ClassifyRequest], timeout_s: float | None = None
    ) -> Iterator[image_pb2.ClassifyStreamResponse]:
        """Classify many requests over one stream; answers come in order, numbered from 0.

        A failed item carries error_code/error_message and the stream goes on.
        The gateway keeps a bounded window in flight, so a fast producer is slowed down.
        """
        items = (image_pb2.ClassifyStreamRequest(request=r, sequence=i) for i, r in enumerate(requests))
        return iter(self.stub.ClassifyStream(items, metadata=self.metadata, timeout=timeout_s))

    def list_models(self) -> list[model_pb2.ModelSummary]:
        return list(
            self.stub.ListModels(
                image_pb2.ImageServiceListModelsRequest(), metadata=self.metadata, timeout=self.timeout_s
            ).models
        )

    def get_model(self, model: str, version: int = 0, alias: str = "") -> model_pb2.ModelVersion:
        return self.stub.GetModel(
            image_pb2.GetModelRequest(model=model, version=version, alias=alias),
            metadata=self.metadata,
            timeout=self.timeout_s,
        ).model


class RegistryClient(_Base):
    """Registry administration: publish models, move aliases, manage keys."""

    def __init__(self, address: str, token: str, **kwargs: Any) -> None:
        super().__init__(address, token, **kwargs)
        self.stub = registry_pb2_grpc.RegistryServiceStub(self.channel)

    def register(
        self, artifact: bytes | str | pathlib.Path, metadata: model_pb2.ModelVersion, progress: bool = False
    ) -> model_pb2.ModelVersion:
        """Upload an ONNX file in chunks with its metadata; returns the new version.

        A path is read a chunk at a time as the upload goes, so a large model is never held whole.
        """

        def chunks() -> Iterator[bytes]:
            if isinstance(artifact, bytes):
                for i in range(0, len(artifact), CHUNK_BYTES):
                    yield artifact[i : i + CHUNK_BYTES]
                return
            with open(artifact, "rb") as f:
                while chunk := f.read(CHUNK_BYTES):
                    yield chunk

        size = len(artifact) if isinstance(artifact, bytes) else pathlib.Path(artifact).stat().st_size

        def parts() -> Iterator[registry_pb2.RegisterModelRequest]:
            yield registry_pb2.RegisterModelRequest(metadata=metadata)
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=size, unit="B", unit_scale=True, desc=f"upload {metadata.name}")
            for chunk in chunks():
                yield registry_pb2.RegisterModelRequest(chunk=chunk)
                if bar is not None:
                    bar.update(len(chunk))
            if bar is not None:
                bar.close()

        return self.stub.RegisterModel(parts(), metadata=self.metadata, timeout=max(self.timeout_s, 600)).model

    def resolve(self, model: str, version: int = 0, alias: str = "") -> registry_pb2.GetModelVersionResponse:
        return self.stub.GetModelVersion(
            registry_pb2.GetModelVersionRequest(model=model, version=version, alias=alias),
            metadata=self.metadata,
            timeout=self.timeout_s,
        )

    def list_models(self) -> list[model_pb2.ModelSummary]:
        return list(
            self.stub.ListModels(model_pb2.ListModelsRequest(), metadata=self.metadata, timeout=self.timeout_s).models
        )

    def list_versions(self, model: str) -> list[model_pb2.ModelVersion]:
        return list(
            self.stub.ListVersions(
                registry_pb2.ListVersionsRequest(model=model), metadata=self.metadata, timeout=self.timeout_s
            ).versions
        )

    def set_alias(self, model: str, alias: str, targets: Sequence[tuple[int, int]]) -> registry_pb2.SetAliasResponse:
        req = registry_pb2.SetAliasRequest(model=model, alias=alias)
        for version, weight in targets:
            req.targets.add(version=version, weight=weight)
        return self.stub.SetAlias(req, metadata=self.metadata, timeout=self.timeout_s)

    def rollback_alias(self, model: str, alias: str = "production") -> registry_pb2.RollbackAliasResponse:
        """Point the alias back at its targets before the last change."""
        return self.stub.RollbackAlias(
            registry_pb2.RollbackAliasRequest(model=model, alias=alias), metadata=self.metadata, timeout=self.timeout_s
        )

    def delete_alias(self, model: str, alias: str) -> model_pb2.Alias:
        return self.stub.DeleteAlias(
            registry_pb2.DeleteAliasRequest(model=model, alias=alias), metadata=self.metadata, timeout=self.timeout_s
        ).alias

    def alias_history(self, model: str, alias: str = "production") -> registry_pb2.GetAliasHistoryResponse:
        return self.stub.GetAliasHistory(
            registry_pb2.GetAliasHistoryRequest(model=model, alias=alias),
            metadata=self.metadata,
            timeout=self.timeout_s,
        )

    def archive(self, model: str, version: int) -> model_pb2.ModelVersion:
        return self.stub.ArchiveVersion(
            registry_pb2.ArchiveVersionRequest(model=model, version=version),
            metadata=self.metadata,
            timeout=self.timeout_s,
        ).model

    def reencrypt_artifacts(self) -> registry_pb2.ReencryptArtifactsResponse:
        # A whole store can take a while: no short client deadline.
        return self.stub.ReencryptArtifacts(
            registry_pb2.ReencryptArtifactsRequest(), metadata=self.metadata, timeout=max(self.timeout_s, 3600.0)
        )

    def create_key(
        self,
        role: str = "infer",
        model_patterns: Sequence[str] = (),
        ttl_s: int = 0,
        description: str = "",
        rate_limit_rps: float = 0,
        rate_limit_ips: float = 0,
        rate_burst: float = 0,
    ) -> tuple[registry_pb2.ApiKey, str]:
        resp = self.stub.CreateApiKey(
            registry_pb2.CreateApiKeyRequest(
                role=ROLES[role],
                model_patterns=model_patterns,
                ttl_s=ttl_s,
                description=description,
                rate_limit_rps=rate_limit_rps,
                rate_limit_ips=rate_limit_ips,
                rate_burst=rate_burst,
            ),
            metadata=self.metadata,
            timeout=self.timeout_s,
        )
        return resp.key, resp.secret

    def list_keys(self) -> list[registry_pb2.ApiKey]:
        return list(
            self.stub.ListApiKeys(
                registry_pb2.ListApiKeysRequest(), metadata=self.metadata, timeout=self.timeout_s
            ).keys
        )

    def revoke_key(self, key_id: str) -> registry_pb2.ApiKey:
        return self.stub.RevokeApiKey(
            registry_pb2.RevokeApiKeyRequest(key_id=key_id), metadata=self.metadata, timeout=self.timeout_s
        ).key

    def list_workers(
        self, model: str = "", version: int = 0, ready_only: bool = False
    ) -> list[registry_pb2.WorkerStatus]:
        return list(
            self.stub.ListWorkers(
                registry_pb2.ListWorkersRequest(model=model, version=version, ready_only=ready_only),
                metadata=self.metadata,
                timeout=self.timeout_s,
            ).workers
        )

    def scale(self, scale: registry_pb2.ModelScale) -> registry_pb2.ModelPlacement:
        """Set a model's desired replicas (publish role); returns its placement as it stands."""
        return self.stub.SetModelScale(
            registry_pb2.SetModelScaleRequest(scale=scale), metadata=self.metadata, timeout=self.timeout_s
        ).placement

    def list_placements(self, model: str = "") -> tuple[list[registry_pb2.ModelPlacement], str]:
        """Each model's placement (or one model's), and the id of the registry replica leading placement."""
        resp = self.stub.ListPlacements(
            registry_pb2.ListPlacementsRequest(model=model), metadata=self.metadata, timeout=self.timeout_s
        )
        return list(resp.placements), resp.leader
