"""A watcher that falls behind further than the capped event stream keeps must not silently lose
the trimmed events (for keys, that would be a revocation a gateway never hears of): it starts
over with a snapshot. Runs follow() itself against the session's real Valkey."""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from registry import events

STREAM = "test:watch-gap"


async def _setup(redis_url: str) -> Any:
    r = aioredis.Redis.from_url(redis_url)
    await r.delete(STREAM)
    return r


def numbered_snapshots() -> Any:
    """A snapshot function whose answers say how many snapshots were taken: "snapshot 1", ..."""
    taken = 0

    async def snapshot() -> str:
        nonlocal taken
        taken += 1
        return f"snapshot {taken}"

    return snapshot


async def test_watcher_trimmed_past_starts_over_with_a_snapshot(redis_url: str) -> None:
    r = await _setup(redis_url)
    snapshot = numbered_snapshots()
    await r.xadd(STREAM, {events.FIELD: b"before"})
    watch = events.follow(r, STREAM, snapshot, bytes.decode, block_ms=100)
    assert await anext(watch) == "snapshot 1"
    await r.xadd(STREAM, {events.FIELD: b"e0"})
    assert await anext(watch) == "e0"
    # The watcher stalls while far more events arrive than the stream keeps (exact trim to 150).
    for i in range(1, 1000):
        await r.xadd(STREAM, {events.FIELD: f"e{i}".encode()}, maxlen=150, approximate=False)
    assert await anext(watch) == "snapshot 2"  # not e850, the oldest survivor
    await r.xadd(STREAM, {events.FIELD: b"after"})
    assert await anext(watch) == "after"
    await watch.aclose()
    await r.aclose()


async def test_watcher_with_a_long_backlog_that_was_not_trimmed_reads_it_all(redis_url: str) -> None:
    r = await _setup(redis_url)

    async def snapshot() -> str:
        return "snapshot"

    watch = events.follow(r, STREAM, snapshot, bytes.decode, block_ms=100)  # stream missing: cursor 0-0
    assert await anext(watch) == "snapshot"
    for i in range(450):
        await r.xadd(STREAM, {events.FIELD: f"e{i}".encode()})
    assert [await anext(watch) for _ in range(450)] == [f"e{i}" for i in range(450)]
    await watch.aclose()
    await r.aclose()


async def test_empty_stream_trimmed_after_the_snapshot_is_noticed(redis_url: str) -> None:
    r = await _setup(redis_url)
    watch = events.follow(r, STREAM, numbered_snapshots(), bytes.decode, block_ms=100)
    assert await anext(watch) == "snapshot 1"
    for i in range(500):
        await r.xadd(STREAM, {events.FIELD: f"e{i}".encode()}, maxlen=120, approximate=False)
    assert await anext(watch) == "snapshot 2"
    await watch.aclose()
    await r.aclose()
