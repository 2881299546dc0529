"""Calls the Python server routes through the native front (fg_forward_send in native/api.h).

The Python server admits what the front relays to it (streams, REST, keys with rate limits, Classify calls it
splits, aliases other than production, sampled traces) and resolves the version; the front then sends the call
to a worker exactly as it sends its own: the power of two choices, the deadline, one retry of a call no worker
ran, and the count that ejects a worker live in native/front.cc only. Each call's end comes back through an
eventfd that the event loop watches, so no thread waits on the front.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
from typing import Any

from fovea.errors import Draining

BATCH = 256  # ended calls taken per fg_forward_take


@dataclasses.dataclass(frozen=True)
class Routed:
    """A routed call's end."""

    code: int  # its gRPC status code
    data: bytes  # code 0: the worker's answer (serialized); else the status message
    worker: str  # the address of the last worker tried; "" when none was
    unrouted: bool  # no worker had the version ready: nothing was sent

    @property
    def message(self) -> str:
        return self.data.decode(errors="replace")


@dataclasses.dataclass(frozen=True)
class ImageTensors:
    """What a Classify's worker call needs of its version: first input and output, the output's width (0 when
    unknown), and the most labels per image."""

    input: str
    output: str
    width: int
    top_k: int


class Forwards:
    """Routed calls of one front, awaited on one event loop."""

    def __init__(self, ffi: Any, lib: Any, handle: Any) -> None:
        self.ffi, self.lib, self.handle = ffi, lib, handle
        self.fd = int(lib.fg_forward_fd(handle))
        self.ids = itertools.count(1)
        self.waiting: dict[int, asyncio.Future[Routed]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self._results = ffi.new("struct fg_forward_result[]", BATCH)

    async def send(
        self,
        model: str,
        version: int,
        request: bytes,
        timeout_s: float,
        *,
        tensors: bool = False,
        request_id: str = "",
        metadata: tuple[tuple[str, str], ...] = (),
        images: ImageTensors | None = None,
    ) -> Routed:
        """Route one call: request is a ModelInferRequest naming model and version, or with images a
        ClassifyRequest whose images go to the worker (the answer is then a ClassifyResponse)."""
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
            self.loop.add_reader(self.fd, self._take)
        ffi = self.ffi
        call_id = next(self.ids)
        owned = [ffi.new("char[]", model.encode()), ffi.new("char[]", request_id.encode())]
        md = [ffi.new("char[]", s.encode()) for pair in metadata for s in pair]
        fields: dict[str, Any] = {
            "id": call_id,
            "kind": self.lib.FG_FORWARD_CLASSIFY if images else self.lib.FG_FORWARD_INFER,
            "tensors": int(tensors),
            "model": owned[0],
            "version": version,
            "request": ffi.from_buffer(request),
            "request_bytes": len(request),
            "timeout_ms": max(0, int(timeout_s * 1000)),
            "request_id": owned[1],
            "metadata": ffi.new("char*[]", md) if md else ffi.NULL,
            "n_metadata": len(metadata),
        }
        if images is not None:
            owned += [ffi.new("char[]", images.input.encode()), ffi.new("char[]", images.output.encode())]
            fields.update(input=owned[2], output=owned[3], width=images.width, top_k=images.top_k)
        future: asyncio.Future[Routed] = self.loop.create_future()
        self.waiting[call_id] = future
        rc = self.lib.fg_forward_send(self.handle, ffi.new("struct fg_forward*", fields))
        if rc != 0:
            del self.waiting[call_id]
            if rc == -2:
                raise Draining("gateway is stopping; retry on another replica")
            raise RuntimeError(f"the native front refused a routed call to {model} v{version} (out of its bounds)")
        try:
            return await future
        except asyncio.CancelledError:  # the caller went away: so does the worker's call
            self.lib.fg_forward_cancel(self.handle, call_id)
            raise

    def _take(self) -> None:
        try:
            os.read(self.fd, 8)  # resets the eventfd: calls ending from now on write it again
        except BlockingIOError:
            pass
        ffi, results = self.ffi, self._results
        while True:
            n = self.lib.fg_forward_take(self.handle, results, BATCH)
            for i in range(n):
                r = results[i]
                future = self.waiting.pop(r.id, None)
                if future is not None and not future.done():
                    future.set_result(
                        Routed(
                            code=r.code,
                            data=bytes(ffi.buffer(r.data, r.size)) if r.size else b"",
                            worker=ffi.string(r.worker).decode(errors="replace"),
                            unrouted=bool(r.unrouted),
                        )
                    )
            self.lib.fg_forward_release(self.handle, results, n)
            if n < BATCH:
                return

    def close(self) -> None:
        """After the front shut down (every routed call has ended): take what is left, stop watching."""
        if self.loop is not None:
            self._take()
            self.loop.remove_reader(self.fd)
        for future in self.waiting.values():
            if not future.done():
                future.set_exception(RuntimeError("the gateway stopped"))
        self.waiting.clear()
