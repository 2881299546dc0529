"""Change events in Redis streams, and the watch loop that follows them.

Every change appends its event to a stream inside the same Redis transaction as
the change itself, so a watcher cannot miss one: it notes the stream's last id,
reads a snapshot, then reads on from that id (an event may arrive twice, which
is harmless because each event carries whole records). Streams live in Redis
(and its append-only file), so a watcher resumes where it was after Redis
restarts; after any Redis error it still sends a fresh snapshot, in case Redis
came back with less than it had.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

logger = logging.getLogger(__name__)

FIELD = "e"
STREAM_MAX_LEN = 10_000
T = TypeVar("T")
REDIS_DOWN = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


def append(pipe: Any, stream: str, event: bytes) -> None:
    """Queue an XADD on a pipeline (call it between multi() and execute())."""
    pipe.xadd(stream, {FIELD: event}, maxlen=STREAM_MAX_LEN, approximate=True)


async def last_id(redis: Any, stream: str) -> bytes:
    newest = await redis.xrevrange(stream, count=1)
    return newest[0][0] if newest else b"0-0"


async def follow(
    redis: Any,
    stream: str,
    snapshot: Callable[[], Awaitable[T]],
    decode: Callable[[bytes], T],
    block_ms: int = 1000,
    retry_max_s: float = 0.5,
) -> AsyncIterator[T]:
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
                found = await redis.xread({stream: cursor}, block=block_ms, count=100)
                for _, entries in found or []:
                    for entry_id, fields in entries:
                        cursor = entry_id
                        yield decode(fields[FIELD.encode()])
        except REDIS_DOWN as exc:
            logger.warning("watch on %s lost Redis (%s); resuming with a snapshot", stream, exc)
            await asyncio.sleep(backoff)
