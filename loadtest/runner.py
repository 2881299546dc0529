"""The load loops: closed (N requests in flight) and open (Poisson arrivals at a fixed rate),
in one process or spread over several.

Open loop and coordinated omission: each request gets an *intended* send time drawn from a
Poisson process before the run, and its latency is measured from that time, not from when the
client got around to sending it. When the server stalls, requests keep arriving on schedule and
every one of them waits out the stall, so the stall shows in the percentiles. A closed loop
measures from the actual send, and during a stall it only has N requests outstanding; it is the
right tool for "how much can this serve", not for "how long do users wait".

Several processes: each process takes an equal share of the concurrency (or of the rate; the sum
of independent Poisson processes is a Poisson process at the summed rate), all start at one
common CLOCK_MONOTONIC instant, and their raw samples are concatenated. Percentiles are then
computed on the merged samples, never averaged across processes.

The client measures itself: CPU seconds (os.times, all threads) over the measured window, and in
open loop how late it sends (lag behind the intended time). A process above
`saturation_cpu_fraction` of a core, or lagging, is flagged: its numbers measure the client.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
import numpy as np

from fovea.config import channel_options
from loadtest.targets import Target

CLIENT_OVERFLOW = -1
"""Status recorded for an open-loop arrival dropped because max_in_flight requests were pending."""
CONNECT_TIMEOUT_S = 15.0
LAG_LIMIT_MS = 5.0
"""Open loop: a p99 send lag above this flags the client as saturated."""


@dataclass
class LoadSpec:
    """How to load the target."""

    mode: str = "closed"
    """closed: `concurrency` requests always in flight; open: Poisson arrivals at `rate_rps`."""
    concurrency: int = 8
    rate_rps: float = 0.0
    duration_s: float = 10.0
    """Measured window."""
    warmup_s: float = 2.0
    """Load before the window, not recorded (connections, caches, JIT, batcher)."""
    processes: int = 1
    """Client processes; 1 runs in the calling process."""
    timeout_s: float = 30.0
    """Deadline of each request."""
    max_in_flight: int = 20_000
    """Open loop: pending requests per process before new arrivals are dropped (and counted)."""
    saturation_cpu_fraction: float = 0.9
    seed: int = 0

    def check(self) -> None:
        if self.mode not in ("closed", "open"):
            raise ValueError("mode must be 'closed' or 'open'")
        if self.processes < 1:
            raise ValueError("processes must be at least 1")
        if self.mode == "closed" and self.concurrency < self.processes:
            raise ValueError(f"concurrency {self.concurrency} is below processes {self.processes}")
        if self.mode == "open" and self.rate_rps <= 0:
            raise ValueError("open loop needs a rate above 0 requests/s")
        if self.duration_s <= 0 or self.warmup_s < 0 or self.timeout_s <= 0:
            raise ValueError("duration_s and timeout_s must be positive, warmup_s not negative")


@dataclass
class Samples:
    """One row per request sent in the measured window."""

    start_s: np.ndarray
    """Send time (intended send time in open loop), seconds from the window's start."""
    latency_s: np.ndarray
    code: np.ndarray
    """gRPC status code value (0 = OK); CLIENT_OVERFLOW for dropped open-loop arrivals."""

    @staticmethod
    def merge(parts: list[Samples]) -> Samples:
        order = np.argsort(np.concatenate([p.start_s for p in parts]), kind="stable")
        return Samples(
            np.concatenate([p.start_s for p in parts])[order],
            np.concatenate([p.latency_s for p in parts])[order],
            np.concatenate([p.code for p in parts])[order],
        )


@dataclass
class ClientReport:
    """What one client process spent."""

    index: int
    cpu_s: float
    wall_s: float
    sent: int
    lag_p99_ms: float = 0.0
    lag_max_ms: float = 0.0
    overflow: int = 0
    error_messages: dict[str, str] = field(default_factory=dict)
    """The first message seen for each error status."""

    @property
    def cpu_fraction(self) -> float:
        return self.cpu_s / self.wall_s if self.wall_s > 0 else 0.0

    def saturated(self, limit: float) -> bool:
        return self.cpu_fraction > limit or self.lag_p99_ms > LAG_LIMIT_MS

    def to_dict(self, limit: float) -> dict[str, Any]:
        out = asdict(self)
        out.update(cpu_fraction=round(self.cpu_fraction, 3), saturated=self.saturated(limit))
        return out


@dataclass
class RunResult:
    spec: LoadSpec
    samples: Samples
    clients: list[ClientReport] = field(default_factory=list)

    @property
    def client_saturated(self) -> bool:
        return any(c.saturated(self.spec.saturation_cpu_fraction) for c in self.clients)


def run(target: Target, spec: LoadSpec, requests: list[bytes]) -> RunResult:
    """Load `target` with `requests` (serialized, cycled) as `spec` says; blocks until done."""
    spec.check()
    if not requests:
        raise ValueError("no requests to send")
    if spec.processes == 1:
        samples, report = asyncio.run(_drive(target, spec, requests, 0, lambda: time.monotonic() + 0.05))
        return RunResult(spec, samples, [report])
    return _run_processes(target, spec, requests)


def _run_processes(target: Target, spec: LoadSpec, requests: list[bytes]) -> RunResult:
    # spawn, not fork: a forked child inherits gRPC's threads and polling state half-copied.
    ctx = multiprocessing.get_context("spawn")
    pipes, procs = [], []
    for index in range(spec.processes):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_child, args=(child, target, spec, requests, index), daemon=True)
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    try:
        budget_s = 120.0
        for conn in pipes:
            if not conn.poll(budget_s):
                raise RuntimeError("a client process did not start in time")
            message = conn.recv()
            if message != "ready":
                raise RuntimeError(f"client process failed: {message}")
        start_at = time.monotonic() + 0.1
        for conn in pipes:
            conn.send(start_at)
        parts, reports = [], []
        wait_s = spec.warmup_s + spec.duration_s + spec.timeout_s + 60
        for conn in pipes:
            if not conn.poll(wait_s):
                raise RuntimeError("a client process did not report in time")
            message = conn.recv()
            if isinstance(message, str):
                raise RuntimeError(f"client process failed: {message}")
            samples, report = message
            parts.append(samples)
            reports.append(report)
        return RunResult(spec, Samples.merge(parts), reports)
    finally:
        for proc in procs:
            proc.join(5)
            if proc.is_alive():
                proc.kill()


def _child(conn: Any, target: Target, spec: LoadSpec, requests: list[bytes], index: int) -> None:
    def start_at() -> float:
        conn.send("ready")
        return float(conn.recv())

    try:
        conn.send(asyncio.run(_drive(target, spec, requests, index, start_at)))
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(f"{type(exc).__name__}: {exc}")


def _share(total: int | float, parts: int, index: int) -> Any:
    if isinstance(total, int):
        return total // parts + (1 if index < total % parts else 0)
    return total / parts


async def _drive(
    target: Target, spec: LoadSpec, requests: list[bytes], index: int, start_at_fn: Callable[[], float]
) -> tuple[Samples, ClientReport]:
    """One process's share of the load; returns its samples and what it spent."""
    channel = grpc.aio.insecure_channel(target.address, options=channel_options(target.max_message_bytes))
    try:
        try:
            await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT_S)
        except TimeoutError:
            raise RuntimeError(f"cannot connect to {target.address} within {CONNECT_TIMEOUT_S:.0f} s") from None
        call = channel.unary_unary(target.method)  # bytes in, bytes out: no protobuf work per call
        metadata = target.call_metadata() or None
        start_at = start_at_fn()
        window_start = start_at + spec.warmup_s
        end = window_start + spec.duration_s
        rec = _Recorder(window_start)
        loop = asyncio.get_running_loop()
        cpu: dict[str, float] = {}

        def snapshot(name: str) -> None:
            t = os.times()
            cpu[name] = t.user + t.system
            cpu[name + "_wall"] = time.monotonic()

        loop.call_at(window_start, snapshot, "start")
        loop.call_at(end, snapshot, "end")
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))

        async def send(request: bytes) -> int:
            try:
                await call(request, timeout=spec.timeout_s, metadata=metadata)
                return 0
            except grpc.aio.AioRpcError as exc:
                code = int(exc.code().value[0])
                report_messages.setdefault(exc.code().name, (exc.details() or "")[:300])
                return code

        report_messages: dict[str, str] = {}
        lag = array("d")
        overflow = 0
        if spec.mode == "closed":
            n = _share(spec.concurrency, spec.processes, index)

            async def loop_one(k: int) -> None:
                i = k + index * 7919  # processes start at different requests
                while (t := time.monotonic()) < end:
                    code = await send(requests[i % len(requests)])
                    rec.add(t, time.monotonic() - t, code)
                    i += n

            await asyncio.gather(*(loop_one(k) for k in range(n)))
        else:
            rate = _share(float(spec.rate_rps), spec.processes, index)
            rng = np.random.default_rng(spec.seed * 1000 + index)
            pending: set[asyncio.Task[None]] = set()

            async def one(request: bytes, intended: float) -> None:
                code = await send(request)
                rec.add(intended, time.monotonic() - intended, code)

            i = index * 7919
            intended = start_at + rng.exponential(1 / rate)
            while intended < end:
                now = time.monotonic()
                if intended > now:
                    await asyncio.sleep(intended - now)
                    now = time.monotonic()
                while intended <= now and intended < end:
                    if intended >= window_start:
                        lag.append(now - intended)
                    if len(pending) >= spec.max_in_flight:
                        overflow += 1
                        rec.add(intended, float("nan"), CLIENT_OVERFLOW)
                    else:
                        task = asyncio.create_task(one(requests[i % len(requests)], intended))
                        pending.add(task)
                        task.add_done_callback(pending.discard)
                        i += 1
                    intended += rng.exponential(1 / rate)
            if pending:
                await asyncio.gather(*pending)
        if "end" not in cpu:
            snapshot("end")
        lags = np.frombuffer(lag, dtype=np.float64) * 1e3 if len(lag) else np.zeros(1)
        report = ClientReport(
            index=index,
            cpu_s=cpu["end"] - cpu["start"],
            wall_s=cpu["end_wall"] - cpu["start_wall"],
            sent=rec.count,
            lag_p99_ms=float(np.percentile(lags, 99)),
            lag_max_ms=float(lags.max()),
            overflow=overflow,
            error_messages=report_messages,
        )
        return rec.samples(), report
    finally:
        await channel.close()


class _Recorder:
    """Appends to flat typed arrays: cheap per request, and only window requests are kept."""

    def __init__(self, window_start: float) -> None:
        self.window_start = window_start
        self.start = array("d")
        self.latency = array("d")
        self.code = array("h")

    @property
    def count(self) -> int:
        return len(self.code)

    def add(self, start: float, latency: float, code: int) -> None:
        if start >= self.window_start:
            self.start.append(start - self.window_start)
            self.latency.append(latency)
            self.code.append(code)

    def samples(self) -> Samples:
        return Samples(
            np.array(self.start, dtype=np.float64),
            np.array(self.latency, dtype=np.float64),
            np.array(self.code, dtype=np.int16),
        )
