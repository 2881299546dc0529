"""Change events in Redis streams, and the watch loop that follows them.

Every change appends its event to a stream inside the same Redis transaction as
the change itself, so a watcher cannot miss one: it notes the stream's last id,
reads a snapshot, then reads on from that id (an event may arrive twice, which
is harmless because each event carries whole records). Streams live in Redis
(and its append-only file), so a watcher resumes where it was after Redis
restarts; after any Redis error it still sends a fresh snapshot, in case Redis
came back with less than it had. Streams are capped at about STREAM_MAX_LEN
events: a watcher that falls further behind than that (a stalled client) would
lose the trimmed events, so it notices the gap and starts over with a snapshot.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

logger = logging.getLogger(__name__)

FIELD = "e"
STREAM_MAX_LEN = 10_000
READ_BATCH = 100
T = TypeVar("T")
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


def append(pipe: Any, stream: str, event: bytes) -> None:
    """Queue an XADD on a pipeline (call it between multi() and execute())."""
    pipe.xadd(stream, {FIELD: event}, maxlen=STREAM_MAX_LEN, approximate=True)


async def last_id(redis: Any, stream: str) -> bytes:
    newest = await redis.xrevrange(stream, count=1)
    return newest[0][0] if newest else b"0-0"


def parse_id(entry_id: bytes | str) -> tuple[int, int]:
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


async def trimmed_past(redis: Any, stream: str, cursor: bytes) -> bool:
    """True when events after cursor may have been trimmed away before this watcher read them."""
    info = await redis.xinfo_stream(stream)
    first = info.get("recorded-first-entry-id") or (info.get("first-entry") or [b"0-0"])[0]
    if parse_id(cursor) == (0, 0):  # the stream was empty or missing at the snapshot
        return int(info.get("entries-added", 0)) > int(info.get("length", 0))
    return parse_id(first) > parse_id(cursor)


async def follow(
    redis: Any,
    stream: str,
    snapshot: Callable[[], Awaitable[T]],
    decode: Callable[[bytes], T],
    block_ms: int = 1000,
    retry_max_s: float = 0.5,
) -> AsyncGenerator[T, None]:
    """Yield snapshot(), then every event appended to the stream, forever.

    Redis errors never end the stream: it waits with backoff and starts over
    with a fresh snapshot once Redis answers again.
    """
    backoff = 0.05
    while True:
        try:
            cursor = await last_id(redis, stream)
            first = await snapshot()
        except REDIS_DOWN as exc:
            logger.warning("watch on %s: Redis unavailable (%s); retrying in %.2fs", stream, exc, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, retry_max_s)
            continue
        yield first
        backoff = 0.05
        try:
            while True:
                found = await redis.xread({stream: cursor}, block=block_ms, count=READ_BATCH)
                entries = found[0][1] if found else []
                # Only a watcher with a backlog (a full batch) can have been trimmed past.
                if len(entries) == READ_BATCH and await trimmed_past(redis, stream, cursor):
                    logger.warning(
                        "watch on %s fell more than %d events behind; starting over with a snapshot",
                        stream,
                        STREAM_MAX_LEN,
                    )
                    break
                for entry_id, fields in entries:
                    cursor = entry_id
                    yield decode(fields[FIELD.encode()])
        except REDIS_DOWN as exc:
            logger.warning("watch on %s lost Redis (%s); resuming with a snapshot", stream, exc)
            await asyncio.sleep(backoff)
