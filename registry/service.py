"""The registry's parts over one Redis and one artifact store, and who may call what.

Registry holds no state of its own beside Redis and the store, so any number of
replicas can serve the same cluster.

Access rules (see check_access):
  internal token   every call (gateways and workers)
  role infer       read models, versions and aliases; watch aliases
  role publish     also register, alias (promote, rollback, delete), archive, download
  role admin       also manage API keys and see workers
  model patterns   a key limited to some models sees and touches only those;
                   managing keys needs an admin key without patterns, so no key
                   can mint a key wider than itself
  internal only    Heartbeat and VerifyApiKey: a heartbeat names an address the
                   gateways send traffic (and the internal token) to
"""

from __future__ import annotations

import fnmatch
from typing import Any

import redis.asyncio as aioredis

from fovea.errors import PermissionDenied, Unauthenticated
from fovea.v1 import registry_pb2
from registry.artifacts import ArtifactStore
from registry.catalog import Catalog
from registry.keystore import KeyStore
from registry.workers import WorkerTable

INTERNAL = "internal"


class Registry:
    def __init__(
        self,
        redis: aioredis.Redis,
        store: ArtifactStore,
        heartbeat_ttl_s: float,
        max_artifact_bytes: int,
        watch_poll_s: float = 0.2,
        max_alias_history: int = 20,
    ) -> None:
        self.redis = redis
        self.store = store
        self.max_artifact_bytes = max_artifact_bytes
        self.catalog = Catalog(redis, store, max_alias_history)
        self.keys = KeyStore(redis)
        self.workers = WorkerTable(redis, heartbeat_ttl_s, watch_poll_s)

    async def authenticate(self, secret: str) -> registry_pb2.ApiKey:
        return await self.keys.verify(secret)


def model_allowed(patterns: list[str], model: str) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(model, p) for p in patterns)


def _role_name(role: int) -> str:
    return registry_pb2.Role.Name(role).removeprefix("ROLE_").lower()


def check_access(principal: Any, needed: int, model: str = "", all_models: bool = False) -> None:
    """Raise PermissionDenied unless the caller's role and model patterns allow the call.

    Args:
        needed: the least role, e.g. registry_pb2.ROLE_PUBLISH.
        model: the model the call touches; checked against the key's patterns.
        all_models: the call reaches beyond single models (key management).
    """
    if principal == INTERNAL:
        return
    if not isinstance(principal, registry_pb2.ApiKey):
        raise Unauthenticated("missing credentials")
    if principal.role < needed:
        raise PermissionDenied(
            f"API key {principal.key_id} has role {_role_name(principal.role)}; this call needs {_role_name(needed)}"
        )
    if all_models and principal.model_patterns:
        raise PermissionDenied(
            f"API key {principal.key_id} is limited to some models; this call needs an admin key without model patterns"
        )
    if model and not model_allowed(list(principal.model_patterns), model):
        raise PermissionDenied(f"API key {principal.key_id} may not use model {model!r}")


def check_internal(principal: Any, what: str) -> None:
    if principal != INTERNAL:
        raise PermissionDenied(f"{what} is only for Fovea services (the internal token), not API keys")
