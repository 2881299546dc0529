"""Dynamic batching for one model version.

submit() puts a request of n samples on a bounded queue and returns a future.
Each model instance runs one loop: wait for a request, then keep taking queued
requests until the batch holds max_batch_size samples, reaches a preferred size,
or max_queue_delay_us has passed (with a zero delay it takes only what is
already queued, so a lone request never waits). Expired and cancelled requests
are dropped before compute. ONNX Runtime's run() blocks, so each instance runs
it on its own executor thread; outputs are split back by sample counts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from fovea.errors import DeadlineExpired, FoveaError, InvalidArgument, ModelNotReady, QueueFull

logger = logging.getLogger(__name__)

RunFn = Callable[[list[np.ndarray]], list[np.ndarray]]
# on_batch(samples, queue waits of its requests in seconds, compute seconds)
BatchHook = Callable[[int, list[float], float], None]
# on_drop(reason): "expired" or "cancelled", for a request dropped before compute
DropHook = Callable[[str], None]


@dataclass
class Timing:
    """When a request's batch left the queue and ran (time.perf_counter()), filled in for calls that are traced."""

    enqueued: float = 0.0
    taken: float = 0.0
    compute_start: float = 0.0
    compute_end: float = 0.0
    batch_size: int = 0
    """Samples in the batch the request ran in."""
    batch_calls: int = 0
    """Requests in that batch."""
    batch: int = 0
    """The batch's number on this model's batcher, the same for every request in it."""


@dataclass
class Item:
    inputs: list[np.ndarray]
    n: int
    deadline: float
    future: asyncio.Future[list[np.ndarray]]
    enqueued: float = field(default_factory=time.perf_counter)
    timing: Timing | None = None


class BatchFailed(FoveaError):
    """The model raised while running a batch; only that batch's requests fail."""


class Batcher:
    def __init__(
        self,
        runners: Sequence[RunFn],
        max_batch_size: int,
        max_queue_delay_us: int = 0,
        preferred_batch_sizes: Sequence[int] = (),
        max_queue_len: int = 1024,
        on_batch: BatchHook | None = None,
        name: str = "",
        on_drop: DropHook | None = None,
        inline_compute_us: int = 0,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be at least 1")
        self.runners = list(runners)
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_us / 1e6
        self.preferred = frozenset(preferred_batch_sizes)
        self.max_queue_len = max_queue_len
        self.on_batch = on_batch
        self.on_drop = on_drop
        self.inline_compute_s = inline_compute_us / 1e6
        # Unknown until the first batch (the warm-up), which goes to the executor.
        self.compute_ewma_s = float("inf")
        self.name = name
        self.queue: asyncio.Queue[Item] | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.executors: list[ThreadPoolExecutor] = []
        self.accepting = False
        self.in_compute = 0
        self.batches = 0

    def start(self) -> None:
        # The queue must be made inside the running loop that will use it.
        self.queue = asyncio.Queue(self.max_queue_len)
        for i, run in enumerate(self.runners):
            ex = ThreadPoolExecutor(1, thread_name_prefix=f"ort-{self.name}-{i}")
            self.executors.append(ex)
            self.tasks.append(asyncio.create_task(self._loop(run, ex), name=f"batcher-{self.name}-{i}"))
        self.accepting = True

    @property
    def depth(self) -> int:
        return self.queue.qsize() if self.queue else 0

    def submit(
        self, inputs: list[np.ndarray], n: int, deadline: float, timing: Timing | None = None
    ) -> asyncio.Future[list[np.ndarray]]:
        """Queue n samples; deadline is a time.perf_counter() value. Raises QueueFull at once when full.
        timing, when given, is filled in with the batch's times before the future is done."""
        if not self.accepting or self.queue is None:
            raise ModelNotReady(f"model {self.name} is not accepting requests (loading or draining)")
        if n > self.max_batch_size:
            raise InvalidArgument(
                f"request has {n} samples; this model takes at most {self.max_batch_size} per request"
            )
        fut: asyncio.Future[list[np.ndarray]] = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(Item(inputs, n, deadline, fut, timing=timing))
        except asyncio.QueueFull:
            raise QueueFull(
                f"queue of model {self.name} is full ({self.max_queue_len} requests); retry later"
            ) from None
        return fut

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Stop accepting, finish what is queued, then end the loops."""
        self.accepting = False
        deadline = time.monotonic() + timeout_s
        while self.queue is not None and (self.queue.qsize() or self.in_compute) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self._fail_pending(ModelNotReady(f"model {self.name} was unloaded"))
        for ex in self.executors:
            ex.shutdown(wait=False)

    def _fail_pending(self, exc: Exception) -> None:
        while self.queue is not None and not self.queue.empty():
            item = self.queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(exc)

    async def _collect(self, carry: Item | None) -> tuple[list[Item], Item | None]:
        assert self.queue is not None
        first = carry or await self.queue.get()
        batch, total = [first], first.n
        until = time.perf_counter() + self.max_queue_delay_s
        while total < self.max_batch_size and total not in self.preferred:
            try:
                item = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                remaining = until - time.perf_counter()
                if remaining <= 0:
                    break
                try:
                    item = await asyncio.wait_for(self.queue.get(), remaining)
                except TimeoutError:
                    break
            if total + item.n > self.max_batch_size:
                return batch, item
            batch.append(item)
            total += item.n
        return batch, None

    async def _loop(self, run: RunFn, executor: ThreadPoolExecutor) -> None:
        loop = asyncio.get_running_loop()
        carry: Item | None = None
        try:
            while True:
                batch, carry = await self._collect(carry)
                now = time.perf_counter()
                live = []
                for item in batch:
                    if item.future.done():  # cancelled by the caller
                        self._dropped("cancelled")
                        continue
                    if item.deadline <= now:
                        item.future.set_exception(DeadlineExpired("deadline passed while queued; not computed"))
                        self._dropped("expired")
                        continue
                    live.append(item)
                if not live:
                    continue
                await self._run(loop, run, executor, live, now)
        except asyncio.CancelledError:
            if carry is not None and not carry.future.done():
                carry.future.set_exception(ModelNotReady(f"model {self.name} was unloaded"))
            raise
        except Exception as exc:  # noqa: BLE001 - the loop died: fail everything still waiting
            logger.exception("batcher loop for %s died", self.name)
            self.accepting = False
            self._fail_pending(ModelNotReady(f"model {self.name} failed: {exc}"))

    def _dropped(self, reason: str) -> None:
        if self.on_drop is not None:
            self.on_drop(reason)

    async def _run(
        self,
        loop: asyncio.AbstractEventLoop,
        run: RunFn,
        executor: ThreadPoolExecutor,
        live: list[Item],
        started: float,
    ) -> None:
        n_inputs = len(live[0].inputs)
        if len(live) == 1:
            inputs = live[0].inputs
        else:
            inputs = [np.concatenate([it.inputs[i] for it in live]) for i in range(n_inputs)]
        total = sum(it.n for it in live)
        self.in_compute += 1
        t0 = time.perf_counter()
        try:
            if self.compute_ewma_s < self.inline_compute_s and len(self.runners) == 1:
                # A batch this short costs less than the two thread hops an executor adds.
                outputs = run(inputs)
            else:
                outputs = await loop.run_in_executor(executor, run, inputs)
        except Exception as exc:  # noqa: BLE001 - a failing batch fails only its own requests
            logger.warning("batch of %d samples failed on %s: %s", total, self.name, exc)
            err = BatchFailed(f"model {self.name} failed on this batch: {str(exc)[:200]}")
            for it in live:
                if not it.future.done():
                    it.future.set_exception(err)
            return
        finally:
            self.in_compute -= 1
        t1 = time.perf_counter()
        compute_s = t1 - t0
        self.batches += 1
        for it in live:
            if it.timing is not None:
                it.timing.enqueued, it.timing.taken = it.enqueued, started
                it.timing.compute_start, it.timing.compute_end = t0, t1
                it.timing.batch_size, it.timing.batch_calls, it.timing.batch = total, len(live), self.batches
        if self.compute_ewma_s == float("inf"):
            self.compute_ewma_s = compute_s
        else:
            self.compute_ewma_s += 0.1 * (compute_s - self.compute_ewma_s)
        if self.on_batch is not None:
            self.on_batch(total, [started - it.enqueued for it in live], compute_s)
        if any(o.shape[0] != total for o in outputs):
            err = BatchFailed(f"model {self.name} returned {[o.shape for o in outputs]} for {total} samples")
            for it in live:
                if not it.future.done():
                    it.future.set_exception(err)
            return
        offset = 0
        for it in live:
            if not it.future.done():
                it.future.set_result([o[offset : offset + it.n] for o in outputs])
            offset += it.n
