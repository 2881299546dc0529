"""Worker heartbeats in Redis, and the live view built from them.

Redis layout:
  worker:ID    WorkerStatus bytes; Redis expires it after the heartbeat TTL
  workers      sorted set id -> expiry time, an index to find the keys (pruned lazily)

A worker is alive exactly while its key exists: Redis's own clock decides, so
registry replicas on hosts whose clocks differ still agree.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import redis.asyncio as aioredis

from fovea.errors import InvalidArgument
from fovea.names import check_name, check_worker_id, redis_key
from fovea.v1 import registry_pb2
from registry.catalog import now_ts
from registry.events import REDIS_DOWN

logger = logging.getLogger(__name__)

MAX_LOADED_MODELS = 1024
INDEX_GRACE_S = 60.0
MAX_LABELS = 32
MAX_BYTES = 1 << 50  # 1 PiB: larger memory figures are a bug or a lie, and would skew placement
MAX_IDLE_S = 10 * 365 * 86400.0


def check_status(status: registry_pb2.WorkerStatus) -> None:
    check_worker_id(status.worker_id)
    if not status.address or len(status.address) > 256 or not status.address.isprintable():
        raise InvalidArgument("heartbeat needs the worker's host:port address (up to 256 characters)")
    if status.state not in registry_pb2.WorkerState.values() or status.state == registry_pb2.WORKER_STATE_UNSPECIFIED:
        raise InvalidArgument("heartbeat needs a state: starting, ready or draining")
    if len(status.models) > MAX_LOADED_MODELS:
        raise InvalidArgument(f"a heartbeat lists at most {MAX_LOADED_MODELS} loaded models")
    for m in status.models:
        check_name(m.name)
        if m.version == 0 or len(m.provider) > 128:
            raise InvalidArgument(
                f"loaded model {m.name!r} needs a version and a provider name of up to 128 characters"
            )
        if m.memory_bytes > MAX_BYTES or m.device_memory_bytes > MAX_BYTES:
            raise InvalidArgument(f"loaded model {m.name!r}: memory figures are limited to {MAX_BYTES} bytes")
        if not 0 <= m.idle_s <= MAX_IDLE_S:  # also refuses NaN
            raise InvalidArgument(f"loaded model {m.name!r}: idle_s must be between 0 and {MAX_IDLE_S:.0f}")
    check_capacity(status)
    if len(status.device.kind) > 64 or len(status.device.name) > 256:
        raise InvalidArgument("device kind and name are limited to 64 and 256 characters")


def check_capacity(status: registry_pb2.WorkerStatus) -> None:
    """Bounds on what a pool worker offers placement: its labels and budgets."""
    if len(status.labels) > MAX_LABELS:
        raise InvalidArgument(f"a heartbeat carries at most {MAX_LABELS} labels, not {len(status.labels)}")
    for k, v in status.labels.items():
        check_name(k, "label key")
        check_name(v, "label value")
    if status.memory_budget_bytes > MAX_BYTES or status.device_memory_budget_bytes > MAX_BYTES:
        raise InvalidArgument(f"memory budgets are limited to {MAX_BYTES} bytes")
    if status.pooled and status.memory_budget_bytes == 0:
        raise InvalidArgument(
            "a pool worker's heartbeat needs memory_budget_bytes (the host memory it offers models; "
            "FOVEA_WORKER_MEMORY_BUDGET_BYTES, 0 there computes one)"
        )


def _signature(w: registry_pb2.WorkerStatus) -> bytes:
    """What a watcher is told about: everything but the time and the load figures."""
    c = registry_pb2.WorkerStatus()
    c.CopyFrom(w)
    c.ClearField("updated_at")
    c.queue_depth = 0
    c.in_flight = 0
    for m in c.models:  # per-model load changes with every heartbeat too
        m.queue_depth = 0
        m.idle_s = 0.0
        m.requests = 0
    return c.SerializeToString(deterministic=True)


class WorkerTable:
    def __init__(self, redis: aioredis.Redis, ttl_s: float, poll_s: float) -> None:
        # Any: redis-py types replies as bytes | str; with decode_responses off they are bytes.
        self.redis: Any = redis
        self.ttl_s = ttl_s
        self.poll_s = poll_s

    async def heartbeat(self, status: registry_pb2.WorkerStatus) -> float:
        """Record the status until the TTL runs out; returns the TTL."""
        check_status(status)
        status.updated_at.CopyFrom(now_ts())
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(redis_key("worker", status.worker_id), status.SerializeToString(), px=int(self.ttl_s * 1000))
            pipe.zadd(redis_key("workers"), {status.worker_id: time.time() + self.ttl_s})
            await pipe.execute()
        return self.ttl_s

    async def live(self) -> list[registry_pb2.WorkerStatus]:
        ids = [i.decode() for i in await self.redis.zrange(redis_key("workers"), 0, -1)]
        if not ids:
            return []
        raws = await self.redis.mget([redis_key("worker", i) for i in ids])
        # Index entries long past their expiry (by any replica's clock, give or take a minute) go.
        await self.redis.zremrangebyscore(redis_key("workers"), "-inf", time.time() - INDEX_GRACE_S)
        return [registry_pb2.WorkerStatus.FromString(r) for r in raws if r is not None]

    async def list(self, model: str, version: int, ready_only: bool) -> list[registry_pb2.WorkerStatus]:
        """Live workers; with a model, those that loaded it (and, if ready_only, are ready to serve it)."""
        if model:
            check_name(model)
        out = []
        for w in await self.live():
            if ready_only and w.state != registry_pb2.WORKER_STATE_READY:
                continue
            if model:
                loaded = [m for m in w.models if m.name == model and (not version or m.version == version)]
                if not loaded or (ready_only and not any(m.ready for m in loaded)):
                    continue
            out.append(w)
        return sorted(out, key=lambda w: w.worker_id)

    async def watch(self) -> AsyncIterator[registry_pb2.WatchWorkersResponse]:
        """A snapshot, then changes found by polling the live set every poll_s (which catches expiry).

        While Redis is down the stream stays open and quiet; once it answers again
        the next message is a fresh snapshot.
        """
        seen: dict[str, bytes] = {}
        snapshot = True
        backoff = self.poll_s
        while True:
            try:
                current = {w.worker_id: w for w in await self.live()}
            except REDIS_DOWN as exc:
                logger.warning("worker watch: Redis unavailable (%s)", exc)
                snapshot = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = self.poll_s
            event = registry_pb2.WatchWorkersResponse(snapshot=snapshot)
            if snapshot:
                seen.clear()
            for wid, w in sorted(current.items()):
                sig = _signature(w)
                if seen.get(wid) != sig:
                    event.workers.append(w)
                    seen[wid] = sig
            for wid in sorted(seen):
                if wid not in current:
                    event.removed_worker_ids.append(wid)
                    del seen[wid]
            if snapshot or event.workers or event.removed_worker_ids:
                yield event
            snapshot = False
            await asyncio.sleep(self.poll_s)
