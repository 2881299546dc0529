"""Fault-injection OIP servers for the harness's own tests, run as separate processes so that the
server and the harness never share an event loop or a GIL.

    python -m tests.loadtest.servers sleeping --delay-ms 20
    python -m tests.loadtest.servers stalling --stall-at-s 1.5 --stall-s 1.0
    python -m tests.loadtest.servers zero
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from typing import Any

from loadtest.zero_server import ZeroComputeServicer, echo, serve


class SleepingOipServer(ZeroComputeServicer):
    """Fault injection: every ModelInfer holds the request for exactly delay_ms.

    asyncio.sleep alone overshoots (the selector rounds its timeout up to a millisecond, and on a
    busy machine the woken process waits for a core), so it sleeps until SPIN_S before the
    deadline and spins the rest: the delay is then known, and the process is on a core when it
    answers. Meant for one request at a time (the spin blocks the event loop briefly).
    """

    SPIN_S = 0.003

    def __init__(self, delay_ms: float) -> None:
        self.delay_s = delay_ms / 1000

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        deadline = time.monotonic() + self.delay_s
        await asyncio.sleep(max(0.0, self.delay_s - self.SPIN_S))
        while time.monotonic() < deadline:
            pass
        return echo(request)


class StallingOipServer(ZeroComputeServicer):
    """Fault injection: answers at once, except that once, stall_at_s after its first request,
    the whole process freezes for stall_s (the event loop is blocked, as in a long GC pause)."""

    def __init__(self, stall_at_s: float, stall_s: float) -> None:
        self.stall_at_s = stall_at_s
        self.stall_s = stall_s
        self.first: float | None = None
        self.stalled = False

    async def ModelInfer(self, request: Any, context: Any) -> Any:
        now = time.monotonic()
        if self.first is None:
            self.first = now
        if not self.stalled and now - self.first >= self.stall_at_s:
            self.stalled = True
            time.sleep(self.stall_s)  # blocks every request in the process, on purpose
        return echo(request)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["sleeping", "stalling", "zero"])
    p.add_argument("--delay-ms", type=float, default=20.0)
    p.add_argument("--stall-at-s", type=float, default=1.5)
    p.add_argument("--stall-s", type=float, default=1.0)
    args = p.parse_args(argv)
    if args.kind == "sleeping":
        asyncio.run(serve(SleepingOipServer(args.delay_ms), "127.0.0.1", 0))
    elif args.kind == "stalling":
        asyncio.run(serve(StallingOipServer(args.stall_at_s, args.stall_s), "127.0.0.1", 0))
    else:
        asyncio.run(serve(ZeroComputeServicer(), "127.0.0.1", 0, raw_infer=True))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
