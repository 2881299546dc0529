"""API keys in Redis: records and salted digests, never secrets.

Redis layout:
  apikeys             set of key ids
  apikey:ID           hash: record (ApiKey bytes), salt, digest (HMAC-SHA256 of the secret)
  events:keys         stream of WatchApiKeysResponse changes (revocations)
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis

from fovea.errors import InvalidArgument, NotFound, Unauthenticated
from fovea.names import check_key_id, redis_key
from fovea.v1 import registry_pb2
from registry import api_key_secrets as secrets
from registry import events
from registry.catalog import now_ts

logger = logging.getLogger(__name__)

KEYS_STREAM = redis_key("events", "keys")
# Model-name globs: name characters plus the fnmatch wildcards * ? [ ] (and ! inside brackets).
PATTERN_RE = re.compile(r"[a-z0-9._*?\[\]!-]{1,128}")
MAX_PATTERNS = 64
MAX_DESCRIPTION_CHARS = 256
MAX_TTL_S = 10 * 365 * 24 * 3600


def check_create(req: registry_pb2.CreateApiKeyRequest) -> None:
    if req.role not in (registry_pb2.ROLE_INFER, registry_pb2.ROLE_PUBLISH, registry_pb2.ROLE_ADMIN):
        raise InvalidArgument("role is required: infer, publish or admin")
    if len(req.model_patterns) > MAX_PATTERNS:
        raise InvalidArgument(f"at most {MAX_PATTERNS} model patterns")
    for pattern in req.model_patterns:
        if not PATTERN_RE.fullmatch(pattern):
            raise InvalidArgument(
                f"invalid model pattern {pattern[:80]!r}: use model-name characters and the globs * ? [ ]"
            )
    if req.ttl_s > MAX_TTL_S:
        raise InvalidArgument(f"ttl_s is limited to {MAX_TTL_S} s (ten years); 0 means no expiry")
    if len(req.description) > MAX_DESCRIPTION_CHARS:
        raise InvalidArgument(f"description is limited to {MAX_DESCRIPTION_CHARS} characters")
    for name in ("rate_limit_rps", "rate_limit_ips", "rate_burst"):
        value = getattr(req, name)
        if not math.isfinite(value) or value < 0:
            raise InvalidArgument(f"{name} must be a finite number >= 0")


class KeyStore:
    def __init__(self, redis: aioredis.Redis) -> None:
        # Any: redis-py types replies as bytes | str; with decode_responses off they are bytes.
        self.redis: Any = redis

    async def create(self, req: registry_pb2.CreateApiKeyRequest) -> tuple[registry_pb2.ApiKey, str]:
        """A new key's record and its secret; only the salted digest is stored."""
        check_create(req)
        key_id, secret = secrets.new_secret()
        record = registry_pb2.ApiKey(
            key_id=key_id,
            role=req.role,
            model_patterns=req.model_patterns,
            created_at=now_ts(),
            description=req.description,
            rate_limit_rps=req.rate_limit_rps,
            rate_limit_ips=req.rate_limit_ips,
            rate_burst=req.rate_burst,
        )
        if req.ttl_s:
            # Keep sub-second precision: a truncated expiry could end a 1 s key at once.
            record.expires_at.FromNanoseconds(time.time_ns() + int(req.ttl_s) * 1_000_000_000)
        salt = os.urandom(16)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(
                redis_key("apikey", key_id),
                mapping={
                    "record": record.SerializeToString(),
                    "salt": salt,
                    "digest": secrets.digest(salt, secret),
                },
            )
            pipe.sadd(redis_key("apikeys"), key_id)
            await pipe.execute()
        logger.info("created API key %s role=%s", key_id, registry_pb2.Role.Name(req.role))
        return record, secret

    async def list(self) -> list[registry_pb2.ApiKey]:
        ids = sorted(i.decode() for i in await self.redis.smembers(redis_key("apikeys")))
        async with self.redis.pipeline(transaction=False) as pipe:
            for key_id in ids:
                pipe.hget(redis_key("apikey", key_id), "record")
            raws = await pipe.execute()
        return [registry_pb2.ApiKey.FromString(r) for r in raws if r]

    async def revoke(self, key_id: str) -> registry_pb2.ApiKey:
        check_key_id(key_id)
        k = redis_key("apikey", key_id)

        async def change(pipe: Any) -> registry_pb2.ApiKey:
            raw = await pipe.hget(k, "record")
            if raw is None:
                raise NotFound(f"unknown API key id {key_id!r}")
            record = registry_pb2.ApiKey.FromString(raw)
            record.revoked = True
            pipe.multi()
            pipe.hset(k, "record", record.SerializeToString())
            events.append(pipe, KEYS_STREAM, registry_pb2.WatchApiKeysResponse(key_ids=[key_id]).SerializeToString())
            return record

        record = await self.redis.transaction(change, k, value_from_callable=True)
        logger.info("revoked API key %s", key_id)
        return record

    async def verify(self, secret: str) -> registry_pb2.ApiKey:
        """The key's record when the secret is valid, unrevoked and unexpired; else Unauthenticated."""
        key_id = secrets.key_id_of(secret)
        if key_id is None:
            raise Unauthenticated("malformed API key")
        record_raw, salt, stored = await self.redis.hmget(redis_key("apikey", key_id), ["record", "salt", "digest"])
        if record_raw is None or salt is None or stored is None or not secrets.matches(salt, stored, secret):
            raise Unauthenticated("unknown API key")
        record = registry_pb2.ApiKey.FromString(record_raw)
        if record.revoked:
            raise Unauthenticated(f"API key {key_id} was revoked")
        if record.HasField("expires_at") and record.expires_at.ToNanoseconds() <= time.time_ns():
            raise Unauthenticated(f"API key {key_id} expired")
        return record

    async def _snapshot(self) -> registry_pb2.WatchApiKeysResponse:
        return registry_pb2.WatchApiKeysResponse(snapshot=True)

    def watch(self) -> AsyncIterator[registry_pb2.WatchApiKeysResponse]:
        """snapshot=True (drop every cached key), then the ids of keys revoked or changed."""
        return events.follow(self.redis, KEYS_STREAM, self._snapshot, registry_pb2.WatchApiKeysResponse.FromString)
