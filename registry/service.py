"""The registry's parts over one Redis and one artifact store, and who may call what.

Registry holds no state of its own beside Redis and the store, so any number of
replicas can serve the same cluster.

Access rules (see check_access):
  role infer       read models, versions and aliases; watch aliases; list placements
  role publish     also register, alias (promote, rollback, delete), archive, download,
                   and scale models (SetModelScale)
  role admin       also manage API keys and see workers
  model patterns   a key limited to some models sees and touches only those (placements too);
                   managing keys needs an admin key without patterns, so no key
                   can mint a key wider than itself
  admin token      an operator's token (admin_tokens): an admin key without patterns
  worker token     read models, versions and aliases, watch them, download artifacts,
                   list placements, and Heartbeat, which only workers may send: a
                   heartbeat names an address the gateways send traffic (and their
                   token) to, and its answer is the worker's assigned models
  gateway token    read models, versions and aliases, watch them, watch workers and
                   API keys, list placements, and VerifyApiKey and DemandModel, which
                   only gateways may send (a demand makes the placement leader load
                   a model scaled to zero)
A service token never registers, moves aliases or manages keys: a stolen one
cannot mint a key or send traffic to another model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from fovea.errors import PermissionDenied, Unauthenticated
from fovea.names import model_allowed
from fovea.v1 import registry_pb2
from registry.api_keys import KeyStore
from registry.artifacts import ArtifactStore
from registry.catalog import Catalog
from registry.workers import WorkerTable


@dataclass(frozen=True)
class Service:
    """The caller is a Fovea service of this kind, by the token it presented."""

    kind: str


WORKER = Service("worker")
GATEWAY = Service("gateway")
READERS = frozenset({WORKER, GATEWAY})
# An operator's token acts as an admin key without model patterns; its id names it in logs and records.
OPERATOR = registry_pb2.ApiKey(key_id="admin-token", role=registry_pb2.ROLE_ADMIN, description="admin_tokens")


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
        self.api_keys = KeyStore(redis)
        self.workers = WorkerTable(redis, heartbeat_ttl_s, watch_poll_s)

    async def authenticate(self, secret: str) -> registry_pb2.ApiKey:
        return await self.api_keys.verify(secret)


def _role_name(role: int) -> str:
    return registry_pb2.Role.Name(role).removeprefix("ROLE_").lower()


def principal_of(kind: str) -> Service | registry_pb2.ApiKey:
    """The principal a service or admin token stands for (kinds as in RegistryConfig.token_table)."""
    return OPERATOR if kind == "admin" else Service(kind)


def check_access(
    principal: Any, needed: int, model: str = "", all_models: bool = False, services: frozenset[Service] = frozenset()
) -> None:
    """Raise PermissionDenied unless the caller's role and model patterns allow the call.

    Args:
        needed: the least role, e.g. registry_pb2.ROLE_PUBLISH.
        model: the model the call touches; checked against the key's patterns.
        all_models: the call reaches beyond single models (key management).
        services: the kinds of service that may make this call with their token; none by default.
    """
    if isinstance(principal, Service):
        if principal not in services:
            raise PermissionDenied(f"a {principal.kind} token may not make this call")
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


def check_service(principal: Any, service: Service, what: str) -> None:
    """Raise unless the caller is this kind of service: calls no key or other service may make."""
    if principal is None:
        raise Unauthenticated("missing credentials")
    if principal != service:
        raise PermissionDenied(f"{what} is only for {service.kind}s (a {service.kind} token)")
