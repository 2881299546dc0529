"""Bidirectional streams answered in request order with a bounded window in flight.

While the window is full the gateway stops reading the stream, so gRPC's HTTP/2 flow control
slows the sender down. Each item is answered by `one`, which turns its own failure into an
answer, so one bad item never ends the stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


async def ordered(
    requests: AsyncIterator[In], window: int, one: Callable[[In], Coroutine[object, None, Out]]
) -> AsyncIterator[Out]:
    slots = asyncio.Semaphore(window)
    answers: asyncio.Queue[asyncio.Task[Out] | None] = asyncio.Queue()

    async def reader() -> None:
        try:
            async for item in requests:
                await slots.acquire()  # a slot is held until the answer has been written
                answers.put_nowait(asyncio.create_task(one(item)))
        finally:
            answers.put_nowait(None)

    read_task = asyncio.create_task(reader())
    try:
        while (task := await answers.get()) is not None:
            yield await task
            slots.release()
        await read_task  # surfaces a broken request stream
    finally:
        read_task.cancel()
        while not answers.empty():
            pending = answers.get_nowait()
            if pending is not None:
                pending.cancel()
