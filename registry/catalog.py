"""Model versions and aliases in Redis.

Redis layout (every Redis key built by fovea.names.redis_key from validated names):
  models                          set of model names
  model:NAME:seq                  last version number
  model:NAME:v:N                  ModelVersion, protobuf bytes
  model:NAME:aliases              hash alias -> Alias bytes
  model:NAME:history:ALIAS        list of the alias's earlier states, newest first
  events:models                   stream of WatchModelsResponse changes

Every change, with its event, is one optimistic transaction (WATCH/MULTI/EXEC,
retried on conflict), so concurrent callers on any number of registry replicas
never see or leave half a change: versions are numbered without gaps or
collisions, and an alias moves from one whole state to another.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Iterator
from typing import Any

import redis.asyncio as aioredis
from google.protobuf.timestamp_pb2 import Timestamp

from fovea.canary import pick_version
from fovea.errors import InvalidArgument, InvalidState, ModelNotFound, NotFound, VersionNotFound
from fovea.names import check_name, redis_key
from fovea.v1 import model_pb2, registry_pb2
from registry import events
from registry.artifacts import ArtifactStore, Upload
from registry.validate import check_labels_and_card, validate_upload

logger = logging.getLogger(__name__)

DEFAULT_ALIAS = "production"
MODELS_STREAM = redis_key("events", "models")
MAX_TAGS = 64
MAX_METRICS = 64


def now_ts() -> Timestamp:
    ts = Timestamp()
    ts.GetCurrentTime()
    return ts


def _targets_text(alias: model_pb2.Alias | None) -> str:
    return "/".join(f"v{t.version}:{t.weight}%" for t in alias.targets) if alias else "none"


def check_metadata(mv: model_pb2.ModelVersion) -> None:
    """Bounds on the free-form parts of uploaded metadata."""
    check_name(mv.name)
    if len(mv.tags) > MAX_TAGS or any(len(k) > 128 or len(v) > 1024 for k, v in mv.tags.items()):
        raise InvalidArgument(f"at most {MAX_TAGS} tags, keys up to 128 characters and values up to 1024")
    if len(mv.metrics) > MAX_METRICS or any(len(k) > 128 or not math.isfinite(v) for k, v in mv.metrics.items()):
        raise InvalidArgument(f"at most {MAX_METRICS} metrics, names up to 128 characters, finite values")
    # Checked again once the ONNX file's own labels and card are filled in (validate_artifact).
    check_labels_and_card(mv, "declared")


class Catalog:
    def __init__(self, redis: aioredis.Redis, store: ArtifactStore, max_history: int = 20) -> None:
        # Any: redis-py types replies as bytes | str; with decode_responses off they are bytes.
        self.redis: Any = redis
        self.store = store
        self.max_history = max_history

    # ---- versions -------------------------------------------------------

    async def register(
        self, declared: model_pb2.ModelVersion, upload: Upload, published_by: str
    ) -> model_pb2.ModelVersion:
        """Validate the received upload, store it by digest, then number the version atomically.

        Nothing reaches Redis or the artifact store unless validation passed. The upload's file
        becomes the stored artifact (or is removed by the caller's Upload.discard()).
        """
        check_metadata(declared)
        upload.finish()
        if not upload.size:
            raise InvalidArgument("empty artifact: send the ONNX file as chunks after the metadata")
        mv = await asyncio.to_thread(validate_upload, upload.path, declared)
        sha, size = upload.sha256, upload.size
        mv.encrypted = await asyncio.to_thread(self.store.put_upload, upload)
        mv.sha256 = sha
        mv.size_bytes = size
        mv.created_at.CopyFrom(now_ts())
        mv.published_by = published_by
        mv.state = model_pb2.VERSION_STATE_READY
        seq_key = redis_key("model", mv.name, "seq")

        async def commit(pipe: Any) -> None:
            mv.version = int(await pipe.get(seq_key) or 0) + 1
            pipe.multi()
            pipe.set(seq_key, mv.version)
            pipe.set(redis_key("model", mv.name, "v", mv.version), mv.SerializeToString())
            pipe.sadd(redis_key("models"), mv.name)
            events.append(pipe, MODELS_STREAM, registry_pb2.WatchModelsResponse(versions=[mv]).SerializeToString())

        await self.redis.transaction(commit, seq_key)
        logger.info("registered %s v%d sha256=%s (%d bytes)", mv.name, mv.version, sha[:12], size)
        return mv

    async def _require_model(self, model: str) -> None:
        if not await self.redis.sismember(redis_key("models"), model):
            raise ModelNotFound(f"unknown model {model!r}")

    async def get_version(self, model: str, version: int) -> model_pb2.ModelVersion:
        check_name(model)
        if version <= 0:
            raise InvalidArgument("version numbers start at 1")
        raw = await self.redis.get(redis_key("model", model, "v", version))
        if raw is None:
            await self._require_model(model)
            raise VersionNotFound(f"model {model!r} has no version {version}")
        return model_pb2.ModelVersion.FromString(raw)

    async def resolve(
        self, model: str, version: int, alias: str
    ) -> tuple[model_pb2.ModelVersion, model_pb2.Alias | None]:
        """A version by number, or through an alias (default production, then the latest ready version)."""
        check_name(model)
        if version:
            return await self.get_version(model, version), None
        name = check_name(alias or DEFAULT_ALIAS, "alias")
        raw = await self.redis.hget(redis_key("model", model, "aliases"), name)
        if raw is not None:
            al = model_pb2.Alias.FromString(raw)
            return await self.get_version(model, pick_version(al)), al
        await self._require_model(model)
        if alias:
            raise VersionNotFound(f"model {model!r} has no alias {alias!r}")
        for mv in reversed(await self.list_versions(model)):
            if mv.state == model_pb2.VERSION_STATE_READY:
                return mv, None
        raise VersionNotFound(f"model {model!r} has no servable version")

    async def list_versions(self, model: str) -> list[model_pb2.ModelVersion]:
        check_name(model)
        latest = await self.redis.get(redis_key("model", model, "seq"))
        if latest is None:
            raise ModelNotFound(f"unknown model {model!r}")
        keys = [redis_key("model", model, "v", v) for v in range(1, int(latest) + 1)]
        raws = await self.redis.mget(keys) if keys else []
        return [model_pb2.ModelVersion.FromString(r) for r in raws if r is not None]

    async def list_models(self) -> list[model_pb2.ModelSummary]:
        names = sorted(n.decode() for n in await self.redis.smembers(redis_key("models")))
        async with self.redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.get(redis_key("model", name, "seq"))
                pipe.hgetall(redis_key("model", name, "aliases"))
            replies = await pipe.execute()
        out = []
        for i, name in enumerate(names):
            seq = int(replies[2 * i] or 0)
            aliases = [model_pb2.Alias.FromString(v) for _, v in sorted(replies[2 * i + 1].items())]
            out.append(model_pb2.ModelSummary(name=name, latest_version=seq, version_count=seq, aliases=aliases))
        return out

    async def archive(self, model: str, version: int) -> model_pb2.ModelVersion:
        """Mark a version archived; refused while any alias points at it."""
        check_name(model)
        alias_key = redis_key("model", model, "aliases")
        vkey = redis_key("model", model, "v", version)

        async def change(pipe: Any) -> model_pb2.ModelVersion:
            raw = await pipe.get(vkey)
            if raw is None:
                await self.get_version(model, version)  # raises the right NOT_FOUND
            for al_raw in (await pipe.hgetall(alias_key)).values():
                al = model_pb2.Alias.FromString(al_raw)
                if any(t.version == version for t in al.targets):
                    raise InvalidState(
                        f"alias {al.name!r} of {model!r} points at version {version}; "
                        "promote another version or delete the alias first"
                    )
            mv = model_pb2.ModelVersion.FromString(raw)
            if mv.state == model_pb2.VERSION_STATE_ARCHIVED:
                pipe.multi()
                return mv
            mv.state = model_pb2.VERSION_STATE_ARCHIVED
            pipe.multi()
            pipe.set(vkey, mv.SerializeToString())
            events.append(pipe, MODELS_STREAM, registry_pb2.WatchModelsResponse(versions=[mv]).SerializeToString())
            return mv

        mv = await self.redis.transaction(change, alias_key, vkey, value_from_callable=True)
        logger.info("archived %s v%d", model, version)
        return mv

    def artifact_chunks(self, mv: model_pb2.ModelVersion, chunk_bytes: int) -> Iterator[bytes]:
        if mv.state == model_pb2.VERSION_STATE_ARCHIVED:
            raise InvalidState(f"{mv.name} v{mv.version} is archived and cannot be served")
        return self.store.read_chunks(mv.sha256, chunk_bytes)

    # ---- aliases --------------------------------------------------------

    @staticmethod
    def _check_targets(targets: list[model_pb2.AliasTarget]) -> list[model_pb2.AliasTarget]:
        if not 1 <= len(targets) <= 2:
            raise InvalidArgument("an alias points at one version, or two for a canary")
        if any(t.version == 0 for t in targets):
            raise InvalidArgument("alias targets need a version number (versions start at 1)")
        if len(targets) == 1:
            if targets[0].weight not in (0, 100):
                raise InvalidArgument("a single alias target takes all the traffic: weight 100 (or 0 for the default)")
            return [model_pb2.AliasTarget(version=targets[0].version, weight=100)]
        if any(t.weight == 0 for t in targets) or sum(t.weight for t in targets) != 100:
            raise InvalidArgument("a canary's two weights must both be above 0 and sum to 100")
        if len({t.version for t in targets}) != len(targets):
            raise InvalidArgument("alias targets must be distinct versions")
        return list(targets)

    async def _check_servable(self, pipe: Any, model: str, targets: Any) -> None:
        # Watched too, so that an archive racing with this change makes one of them retry.
        await pipe.watch(*[redis_key("model", model, "v", t.version) for t in targets])
        for t in targets:
            raw = await pipe.get(redis_key("model", model, "v", t.version))
            if raw is None:
                await self.get_version(model, t.version)  # raises the right NOT_FOUND
            if model_pb2.ModelVersion.FromString(raw).state != model_pb2.VERSION_STATE_READY:
                raise InvalidState(f"version {t.version} of {model!r} is archived and cannot be served")

    async def set_alias(
        self, model: str, alias: str, targets: list[model_pb2.AliasTarget]
    ) -> tuple[model_pb2.Alias, model_pb2.Alias | None]:
        """Point an alias at one version (weight 100) or two (weights summing to 100), atomically.

        The state it replaces goes on the alias's history, for rollback_alias().
        """
        check_name(model)
        check_name(alias, "alias")
        targets = self._check_targets(targets)
        alias_key = redis_key("model", model, "aliases")
        history_key = redis_key("model", model, "history", alias)

        async def change(pipe: Any) -> tuple[model_pb2.Alias, model_pb2.Alias | None]:
            await self._check_servable(pipe, model, targets)
            prev_raw = await pipe.hget(alias_key, alias)
            previous = model_pb2.Alias.FromString(prev_raw) if prev_raw else None
            new = model_pb2.Alias(model=model, name=alias, targets=targets, updated_at=now_ts())
            pipe.multi()
            pipe.hset(alias_key, alias, new.SerializeToString())
            if previous is not None and list(previous.targets) != list(new.targets):
                pipe.lpush(history_key, prev_raw)
                pipe.ltrim(history_key, 0, self.max_history - 1)
            events.append(pipe, MODELS_STREAM, registry_pb2.WatchModelsResponse(aliases=[new]).SerializeToString())
            return new, previous

        new, previous = await self.redis.transaction(change, alias_key, history_key, value_from_callable=True)
        logger.info("alias %s/%s: %s -> %s", model, alias, _targets_text(previous), _targets_text(new))
        return new, previous

    async def rollback_alias(self, model: str, alias: str) -> tuple[model_pb2.Alias, model_pb2.Alias | None]:
        """Restore the alias's state before its last change (or deletion), atomically."""
        check_name(model)
        alias = check_name(alias or DEFAULT_ALIAS, "alias")
        alias_key = redis_key("model", model, "aliases")
        history_key = redis_key("model", model, "history", alias)

        async def change(pipe: Any) -> tuple[model_pb2.Alias, model_pb2.Alias | None]:
            earlier_raw = await pipe.lindex(history_key, 0)
            if earlier_raw is None:
                await self._require_model(model)
                raise InvalidState(f"alias {alias!r} of {model!r} has no earlier state to roll back to")
            earlier = model_pb2.Alias.FromString(earlier_raw)
            await self._check_servable(pipe, model, earlier.targets)
            cur_raw = await pipe.hget(alias_key, alias)
            restored = model_pb2.Alias(model=model, name=alias, targets=earlier.targets, updated_at=now_ts())
            pipe.multi()
            pipe.hset(alias_key, alias, restored.SerializeToString())
            pipe.lpop(history_key)
            events.append(pipe, MODELS_STREAM, registry_pb2.WatchModelsResponse(aliases=[restored]).SerializeToString())
            return restored, model_pb2.Alias.FromString(cur_raw) if cur_raw else None

        restored, previous = await self.redis.transaction(change, alias_key, history_key, value_from_callable=True)
        logger.info("alias %s/%s rolled back: %s -> %s", model, alias, _targets_text(previous), _targets_text(restored))
        return restored, previous

    async def delete_alias(self, model: str, alias: str) -> model_pb2.Alias:
        """Remove an alias; its last state goes on the history, so a rollback brings it back."""
        check_name(model)
        check_name(alias, "alias")
        alias_key = redis_key("model", model, "aliases")
        history_key = redis_key("model", model, "history", alias)

        async def change(pipe: Any) -> model_pb2.Alias:
            raw = await pipe.hget(alias_key, alias)
            if raw is None:
                await self._require_model(model)
                raise NotFound(f"model {model!r} has no alias {alias!r}")
            pipe.multi()
            pipe.hdel(alias_key, alias)
            pipe.lpush(history_key, raw)
            pipe.ltrim(history_key, 0, self.max_history - 1)
            events.append(
                pipe,
                MODELS_STREAM,
                registry_pb2.WatchModelsResponse(removed_aliases=[f"{model}/{alias}"]).SerializeToString(),
            )
            return model_pb2.Alias.FromString(raw)

        removed = await self.redis.transaction(change, alias_key, history_key, value_from_callable=True)
        logger.info("alias %s/%s deleted (was %s)", model, alias, _targets_text(removed))
        return removed

    async def alias_history(self, model: str, alias: str) -> tuple[model_pb2.Alias | None, list[model_pb2.Alias]]:
        check_name(model)
        alias = check_name(alias or DEFAULT_ALIAS, "alias")
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hget(redis_key("model", model, "aliases"), alias)
            pipe.lrange(redis_key("model", model, "history", alias), 0, -1)
            current, history = await pipe.execute()
        if current is None and not history:
            await self._require_model(model)
            raise NotFound(f"model {model!r} has no alias {alias!r}")
        return (
            model_pb2.Alias.FromString(current) if current else None,
            [model_pb2.Alias.FromString(h) for h in history],
        )

    # ---- watch ----------------------------------------------------------

    async def snapshot(self) -> registry_pb2.WatchModelsResponse:
        snap = registry_pb2.WatchModelsResponse(snapshot=True)
        for summary in await self.list_models():
            snap.aliases.extend(summary.aliases)
        return snap

    def watch(self) -> AsyncIterator[registry_pb2.WatchModelsResponse]:
        """A snapshot of every alias, then every change, surviving Redis restarts."""
        return events.follow(self.redis, MODELS_STREAM, self.snapshot, registry_pb2.WatchModelsResponse.FromString)
