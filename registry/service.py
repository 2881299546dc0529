"""Registry logic over Redis and the artifact store. The servicer only adapts gRPC to these calls.

Redis layout (every key built by fovea.names.key):
  models                      set of model names
  model:NAME:seq              last version number (INCR makes numbering atomic)
  model:NAME:v:N              ModelVersion, protobuf bytes
  model:NAME:aliases          hash alias -> Alias bytes
  apikeys                     set of key ids
  apikey:ID                   hash record (ApiKey bytes), salt, digest
  worker:ID                   WorkerStatus bytes, expiring after the heartbeat TTL
  workers                     sorted set id -> expiry time
  events:models / events:keys pub/sub channels
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import logging
import os
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis
from google.protobuf.timestamp_pb2 import Timestamp

from fovea.errors import (
    InvalidArgument,
    InvalidState,
    ModelNotFound,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    VersionNotFound,
)
from fovea.names import check_key_id, check_name, check_worker_id, key
from fovea.v1 import model_pb2, registry_pb2
from registry import keys as apikeys
from registry.artifacts import ArtifactStore
from registry.validate import validate_artifact

logger = logging.getLogger(__name__)

DEFAULT_ALIAS = "production"


def _now_ts() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


def pick_target(alias: model_pb2.Alias) -> int:
    """A version from the alias's targets, chosen at random by weight (a canary split)."""
    if len(alias.targets) == 1:
        return alias.targets[0].version
    return random.choices([t.version for t in alias.targets], [t.weight for t in alias.targets])[0]


def role_allows(role: int, needed: int) -> bool:
    return role >= needed


def model_allowed(patterns: list[str], model: str) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(model, p) for p in patterns)


class Registry:
    def __init__(self, redis: aioredis.Redis, store: ArtifactStore, heartbeat_ttl_s: float,
                 max_artifact_bytes: int, watch_poll_s: float = 0.2) -> None:
        self.redis = redis
        self.store = store
        self.heartbeat_ttl_s = heartbeat_ttl_s
        self.max_artifact_bytes = max_artifact_bytes
        self.watch_poll_s = watch_poll_s

    # ---- model versions -------------------------------------------------

    async def register(self, declared: model_pb2.ModelVersion, data: bytes, published_by: str) -> model_pb2.ModelVersion:
        """Validate, store the artifact by digest, then number the version atomically."""
        check_name(declared.name)
        if not data:
            raise InvalidArgument("empty artifact: send the ONNX file as chunks after the metadata")
        for tag in declared.tags:
            if len(tag) > 128 or len(declared.tags[tag]) > 1024:
                raise InvalidArgument("tag keys are limited to 128 characters and values to 1024")
        mv = await asyncio.to_thread(validate_artifact, data, declared)
        sha = hashlib.sha256(data).hexdigest()
        await asyncio.to_thread(self.store.put, data, sha)
        mv.sha256 = sha
        mv.size_bytes = len(data)
        mv.created_at.CopyFrom(_now_ts())
        mv.published_by = published_by
        mv.state = model_pb2.VERSION_STATE_READY
        mv.encrypted = bool(getattr(self.store, "key", None))
        mv.version = int(await self.redis.incr(key("model", mv.name, "seq")))
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(key("model", mv.name, "v", mv.version), mv.SerializeToString())
            pipe.sadd(key("models"), mv.name)
            await pipe.execute()
        await self._publish_models(registry_pb2.WatchModelsResponse(versions=[mv]))
        logger.info("registered %s v%d sha256=%s (%d bytes)", mv.name, mv.version, sha[:12], len(data))
        return mv

    async def get_version(self, model: str, version: int) -> model_pb2.ModelVersion:
        check_name(model)
        raw = await self.redis.get(key("model", model, "v", version))
        if raw is None:
            if not await self.redis.sismember(key("models"), model):
                raise ModelNotFound(f"unknown model {model!r}")
            raise VersionNotFound(f"model {model!r} has no version {version}")
        return model_pb2.ModelVersion.FromString(raw)

    async def resolve(self, model: str, version: int, alias: str) -> tuple[model_pb2.ModelVersion, model_pb2.Alias | None]:
        """A version by number, or through an alias (default production, then the latest version)."""
        check_name(model)
        if version:
            return await self.get_version(model, version), None
        name = alias or DEFAULT_ALIAS
        check_name(name, "alias")
        raw = await self.redis.hget(key("model", model, "aliases"), name)
        if raw is not None:
            al = model_pb2.Alias.FromString(raw)
            return await self.get_version(model, pick_target(al)), al
        if alias:
            if not await self.redis.sismember(key("models"), model):
                raise ModelNotFound(f"unknown model {model!r}")
            raise VersionNotFound(f"model {model!r} has no alias {alias!r}")
        latest = await self.redis.get(key("model", model, "seq"))
        if latest is None:
            raise ModelNotFound(f"unknown model {model!r}")
        for v in range(int(latest), 0, -1):
            mv = await self.get_version(model, v)
            if mv.state == model_pb2.VERSION_STATE_READY:
                return mv, None
        raise VersionNotFound(f"model {model!r} has no servable version")

    async def list_versions(self, model: str) -> list[model_pb2.ModelVersion]:
        check_name(model)
        latest = await self.redis.get(key("model", model, "seq"))
        if latest is None:
            raise ModelNotFound(f"unknown model {model!r}")
        keys = [key("model", model, "v", v) for v in range(1, int(latest) + 1)]
        raws = await self.redis.mget(keys) if keys else []
        return [model_pb2.ModelVersion.FromString(r) for r in raws if r is not None]

    async def list_models(self) -> list[model_pb2.ModelSummary]:
        names = sorted(n.decode() for n in await self.redis.smembers(key("models")))
        out = []
        for name in names:
            seq = int(await self.redis.get(key("model", name, "seq")) or 0)
            aliases = await self.list_aliases(name)
            out.append(model_pb2.ModelSummary(name=name, latest_version=seq, version_count=seq, aliases=aliases))
        return out

    async def list_aliases(self, model: str) -> list[model_pb2.Alias]:
        raw = await self.redis.hgetall(key("model", model, "aliases"))
        return [model_pb2.Alias.FromString(v) for _, v in sorted(raw.items())]

    async def set_alias(self, model: str, alias: str, targets: list[model_pb2.AliasTarget]) -> tuple[model_pb2.Alias, model_pb2.Alias | None]:
        """Point an alias at one version (weight 100) or two (weights summing to 100), atomically."""
        check_name(model)
        check_name(alias, "alias")
        if not 1 <= len(targets) <= 2:
            raise InvalidArgument("an alias points at one version, or two for a canary")
        if len(targets) == 1 and targets[0].weight == 0:
            targets = [model_pb2.AliasTarget(version=targets[0].version, weight=100)]
        if sum(t.weight for t in targets) != 100:
            raise InvalidArgument("alias weights must sum to 100")
        if len({t.version for t in targets}) != len(targets):
            raise InvalidArgument("alias targets must be distinct versions")
        alias_key = key("model", model, "aliases")
        version_keys = [key("model", model, "v", t.version) for t in targets]
        async with self.redis.pipeline(transaction=True) as pipe:
            await pipe.watch(alias_key, *version_keys)
            for t, vk in zip(targets, version_keys):
                raw = await pipe.get(vk)
                if raw is None:
                    raise VersionNotFound(f"model {model!r} has no version {t.version}")
                if model_pb2.ModelVersion.FromString(raw).state != model_pb2.VERSION_STATE_READY:
                    raise InvalidState(f"version {t.version} of {model!r} is archived and cannot be served")
            prev_raw = await pipe.hget(alias_key, alias)
            new = model_pb2.Alias(model=model, name=alias, targets=targets, updated_at=_now_ts())
            pipe.multi()
            pipe.hset(alias_key, alias, new.SerializeToString())
            await pipe.execute()
        previous = model_pb2.Alias.FromString(prev_raw) if prev_raw else None
        await self._publish_models(registry_pb2.WatchModelsResponse(aliases=[new]))
        logger.info("alias %s/%s -> %s", model, alias, [(t.version, t.weight) for t in targets])
        return new, previous

    async def archive(self, model: str, version: int) -> model_pb2.ModelVersion:
        alias_key = key("model", model, "aliases")
        vkey = key("model", check_name(model), "v", version)
        async with self.redis.pipeline(transaction=True) as pipe:
            await pipe.watch(alias_key, vkey)
            raw = await pipe.get(vkey)
            if raw is None:
                await self.get_version(model, version)  # raises the right NOT_FOUND
            for al_raw in (await pipe.hgetall(alias_key)).values():
                al = model_pb2.Alias.FromString(al_raw)
                if any(t.version == version for t in al.targets):
                    raise InvalidState(f"alias {al.name!r} points at version {version}; move it first")
            mv = model_pb2.ModelVersion.FromString(raw)
            mv.state = model_pb2.VERSION_STATE_ARCHIVED
            pipe.multi()
            pipe.set(vkey, mv.SerializeToString())
            await pipe.execute()
        await self._publish_models(registry_pb2.WatchModelsResponse(versions=[mv]))
        return mv

    async def _publish_models(self, event: registry_pb2.WatchModelsResponse) -> None:
        await self.redis.publish(key("events", "models"), event.SerializeToString())

    async def watch_models(self) -> AsyncIterator[registry_pb2.WatchModelsResponse]:
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(key("events", "models"))
        try:
            snapshot = registry_pb2.WatchModelsResponse(snapshot=True)
            for summary in await self.list_models():
                snapshot.aliases.extend(summary.aliases)
            yield snapshot
            while True:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg is not None and msg["type"] == "message":
                    yield registry_pb2.WatchModelsResponse.FromString(msg["data"])
        finally:
            await pubsub.aclose()

    def artifact_chunks(self, sha256: str, chunk_bytes: int) -> Any:
        return self.store.read_chunks(sha256, chunk_bytes)

    # ---- API keys -------------------------------------------------------

    async def create_key(self, req: registry_pb2.CreateApiKeyRequest) -> tuple[registry_pb2.ApiKey, str]:
        if req.role == registry_pb2.ROLE_UNSPECIFIED:
            raise InvalidArgument("role is required: infer, publish or admin")
        for pattern in req.model_patterns:
            if not pattern or len(pattern) > 128 or any(c in pattern for c in "/:\x00"):
                raise InvalidArgument(f"invalid model pattern {pattern[:80]!r}")
        key_id, secret = apikeys.new_secret()
        record = registry_pb2.ApiKey(
            key_id=key_id, role=req.role, model_patterns=req.model_patterns, created_at=_now_ts(),
            description=req.description[:256], rate_limit_rps=req.rate_limit_rps,
            rate_limit_ips=req.rate_limit_ips, rate_burst=req.rate_burst,
        )
        if req.ttl_s:
            record.expires_at.FromSeconds(int(time.time()) + int(req.ttl_s))
        salt = os.urandom(16)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(key("apikey", key_id), mapping={
                "record": record.SerializeToString(), "salt": salt, "digest": apikeys.digest(salt, secret),
            })
            pipe.sadd(key("apikeys"), key_id)
            await pipe.execute()
        logger.info("created API key %s role=%s", key_id, registry_pb2.Role.Name(req.role))
        return record, secret

    async def list_keys(self) -> list[registry_pb2.ApiKey]:
        ids = sorted(i.decode() for i in await self.redis.smembers(key("apikeys")))
        out = []
        for key_id in ids:
            raw = await self.redis.hget(key("apikey", key_id), "record")
            if raw:
                out.append(registry_pb2.ApiKey.FromString(raw))
        return out

    async def revoke_key(self, key_id: str) -> registry_pb2.ApiKey:
        check_key_id(key_id)
        k = key("apikey", key_id)
        raw = await self.redis.hget(k, "record")
        if raw is None:
            raise NotFound(f"unknown API key id {key_id!r}")
        record = registry_pb2.ApiKey.FromString(raw)
        record.revoked = True
        await self.redis.hset(k, "record", record.SerializeToString())
        await self.redis.publish(key("events", "keys"), registry_pb2.WatchApiKeysResponse(key_ids=[key_id]).SerializeToString())
        logger.info("revoked API key %s", key_id)
        return record

    async def verify_key(self, secret: str) -> registry_pb2.ApiKey:
        """The key's record when the secret is valid, unrevoked and unexpired; else Unauthenticated."""
        key_id = apikeys.key_id_of(secret)
        if key_id is None:
            raise Unauthenticated("malformed API key")
        fields = await self.redis.hmget(key("apikey", key_id), ["record", "salt", "digest"])
        if fields[0] is None or not apikeys.matches(fields[1], fields[2], secret):
            raise Unauthenticated("unknown API key")
        record = registry_pb2.ApiKey.FromString(fields[0])
        if record.revoked:
            raise Unauthenticated("API key revoked")
        if record.HasField("expires_at") and record.expires_at.seconds <= time.time():
            raise Unauthenticated("API key expired")
        return record

    async def watch_keys(self) -> AsyncIterator[registry_pb2.WatchApiKeysResponse]:
        pubsub = self.redis.pubsub()
        await pubsub.subscribe(key("events", "keys"))
        try:
            yield registry_pb2.WatchApiKeysResponse(snapshot=True)
            while True:
                msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                if msg is not None and msg["type"] == "message":
                    yield registry_pb2.WatchApiKeysResponse.FromString(msg["data"])
        finally:
            await pubsub.aclose()

    # ---- workers --------------------------------------------------------

    async def heartbeat(self, status: registry_pb2.WorkerStatus) -> float:
        check_worker_id(status.worker_id)
        if not status.address or len(status.address) > 256:
            raise InvalidArgument("heartbeat needs the worker's host:port address")
        status.updated_at.CopyFrom(_now_ts())
        ttl_ms = int(self.heartbeat_ttl_s * 1000)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(key("worker", status.worker_id), status.SerializeToString(), px=ttl_ms)
            pipe.zadd(key("workers"), {status.worker_id: time.time() + self.heartbeat_ttl_s})
            await pipe.execute()
        return self.heartbeat_ttl_s

    async def live_workers(self) -> list[registry_pb2.WorkerStatus]:
        now = time.time()
        ids = await self.redis.zrangebyscore(key("workers"), now, "+inf")
        await self.redis.zremrangebyscore(key("workers"), "-inf", now - 60)
        if not ids:
            return []
        raws = await self.redis.mget([key("worker", i.decode()) for i in ids])
        return [registry_pb2.WorkerStatus.FromString(r) for r in raws if r is not None]

    async def list_workers(self, model: str, version: int, ready_only: bool) -> list[registry_pb2.WorkerStatus]:
        out = []
        for w in await self.live_workers():
            if ready_only and w.state != registry_pb2.WORKER_STATE_READY:
                continue
            if model:
                loaded = [m for m in w.models if m.name == model and (not version or m.version == version)]
                if not loaded or (ready_only and not any(m.ready for m in loaded)):
                    continue
            out.append(w)
        return out

    async def watch_workers(self) -> AsyncIterator[registry_pb2.WatchWorkersResponse]:
        """A snapshot, then changes found by polling the live set (which also catches expiry)."""
        seen: dict[str, bytes] = {}
        first = True
        while True:
            current = {w.worker_id: w for w in await self.live_workers()}
            event = registry_pb2.WatchWorkersResponse(snapshot=first)
            for wid, w in current.items():
                sig = _worker_signature(w)
                if first or seen.get(wid) != sig:
                    event.workers.append(w)
                    seen[wid] = sig
            for wid in list(seen):
                if wid not in current:
                    event.removed_worker_ids.append(wid)
                    del seen[wid]
            if first or event.workers or event.removed_worker_ids:
                yield event
            first = False
            await asyncio.sleep(self.watch_poll_s)


def _worker_signature(w: registry_pb2.WorkerStatus) -> bytes:
    c = registry_pb2.WorkerStatus()
    c.CopyFrom(w)
    c.ClearField("updated_at")
    c.queue_depth = 0
    c.in_flight = 0
    return c.SerializeToString(deterministic=True)


def check_access(principal: Any, needed: int, model: str = "") -> None:
    """Raise PermissionDenied unless the caller's role and model patterns allow the call."""
    if principal == "internal":
        return
    if not isinstance(principal, registry_pb2.ApiKey):
        raise Unauthenticated("missing credentials")
    if not role_allows(principal.role, needed):
        raise PermissionDenied(
            f"API key {principal.key_id} has role {registry_pb2.Role.Name(principal.role)}; "
            f"this call needs {registry_pb2.Role.Name(needed)}"
        )
    if model and not model_allowed(list(principal.model_patterns), model):
        raise PermissionDenied(f"API key {principal.key_id} may not use model {model!r}")
