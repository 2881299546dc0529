"""The worker's fast port: a C++ gRPC front (worker/native/front.cc) for ModelInfer on raw tensors.

The front validates calls and batches them. On the CPU, each model instance's batch loop runs in C++
on ONNX Runtime's C API (worker/native/ort_loop.cc, sessions from NativeSession); otherwise Python
runs ONNX Runtime on each batch and hands the outputs back. Everything else (images, typed contents,
the other calls) stays on the main port. ctypes releases the GIL around every fv_* call, so a thread
blocked waiting for a batch, or running the C++ loop, does not hold up the event loop.
"""

from __future__ import annotations

import asyncio
import ctypes as C
import logging
import os
import pathlib
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import numpy as np

from fovea import oip
from fovea.errors import FoveaError

logger = logging.getLogger(__name__)

# FOVEA_NATIVE_BUILD picks another build folder: build-asan is the sanitizer build (scripts/sanitize.sh).
BUILD = os.environ.get("FOVEA_NATIVE_BUILD", "") or "build"
LIBRARY = pathlib.Path(__file__).parent / "native" / BUILD / "libfovea_front.so"
MAX_TENSORS, MAX_RANK = 8, 8
INTERNAL = 13


CODES = {c.value[0]: c for c in grpc.StatusCode}


class Refused(FoveaError):
    """The native queue's answer to a submitted call that is not OK: its status code and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        # The native queue answers UNAVAILABLE only before any compute (a version unloading).
        self.unserved = code == grpc.StatusCode.UNAVAILABLE


@dataclass
class Timing:
    """Where a submitted call's batch ran (time.perf_counter() seconds; both clocks are CLOCK_MONOTONIC)."""

    enqueued: float = 0.0
    taken: float = 0.0
    compute_start: float = 0.0
    compute_end: float = 0.0
    batch_size: int = 0
    """Samples in the batch the call ran in."""
    batch_calls: int = 0
    """Calls in that batch."""
    batch: int = 0
    """The batch's number on the native front, the same for every call in it."""


class FvBatch(C.Structure):
    _fields_ = [
        ("id", C.c_int64),
        ("samples", C.c_int32),
        ("calls", C.c_int32),
        ("ninputs", C.c_int32),
        ("expired", C.c_int32),
        ("cancelled", C.c_int32),
        ("queued", C.c_int32),
        ("data", C.c_void_p * MAX_TENSORS),
        ("nbytes", C.c_int64 * MAX_TENSORS),
        ("rank", C.c_int32 * MAX_TENSORS),
        ("dims", (C.c_int64 * MAX_RANK) * MAX_TENSORS),
    ]


def _strings(items: Sequence[str]) -> Any:
    return (C.c_char_p * len(items))(*[s.encode() for s in items])


def available() -> bool:
    return LIBRARY.exists()


def _load() -> C.CDLL:
    if not LIBRARY.exists():
        raise RuntimeError(f"{LIBRARY} is missing: run worker/native/build.sh (scripts/setup.sh does)")
    lib = C.CDLL(str(LIBRARY))
    p, i, i64, s = C.c_void_p, C.c_int, C.c_int64, C.c_char_p
    lib.fv_start.restype = p
    lib.fv_start.argtypes = [s, i, s, i64, s, s, s, s, C.POINTER(i)]
    lib.fv_add_model.argtypes = [p, s, s, i, i, i64, i, p, i, p, p, p, p, i, p, p, p, p, s, i]
    lib.fv_codes.argtypes = [p, p]
    lib.fv_route.argtypes = [p, s, i, p, p]
    lib.fv_close_model.argtypes = [p, i]
    lib.fv_release_model.argtypes = [p, i]
    lib.fv_next_batch.argtypes = [p, i, i, C.POINTER(FvBatch), p]
    lib.fv_complete.argtypes = [p, i64, i64, i, p, p, p, p]
    lib.fv_fail.argtypes = [p, i64, i, s]
    lib.fv_depth.argtypes = [p, i, C.POINTER(C.c_int32), C.POINTER(C.c_int32)]
    lib.fv_statistics.argtypes = [p, i, p, i]
    lib.fv_request_times.argtypes = [p, i, p, p, C.POINTER(i64)]
    lib.fv_set_accepting.argtypes = [p, i]
    lib.fv_set_trace_sampled.argtypes = [p, i]
    lib.fv_submit.argtypes = [p, i, s, i64, i64, C.POINTER(p), C.POINTER(i64), C.POINTER(i64), s, i]
    lib.fv_free_buffer.argtypes = [p]
    lib.fv_shutdown.argtypes = [p, C.c_double]
    lib.fv_free.argtypes = [p]
    lib.fv_ort_init.argtypes = [s, s, i]
    lib.fv_ort_version.restype = s
    lib.fv_ort_session.restype = p
    lib.fv_ort_session.argtypes = [s, i64, i, i, i, i, i, p, p, i, p, p, i, p, s, i]
    lib.fv_ort_run.argtypes = [p, C.POINTER(FvBatch), s, i]
    lib.fv_ort_free.argtypes = [p]
    lib.fv_ort_runs.restype = i64
    lib.fv_ort_runs.argtypes = [p]
    lib.fv_instances_new.restype = p
    lib.fv_instances_new.argtypes = [p]
    lib.fv_instances_free.argtypes = [p]
    lib.fv_serve.argtypes = [p, i, p, p, i]
    lib.fv_take_records.argtypes = [p, p, i, C.POINTER(i64), s, i]
    return lib


def ort_library() -> pathlib.Path | None:
    """ONNX Runtime's shared library (C API) in the onnxruntime package Python imports, if it ships one."""
    import onnxruntime

    found = sorted((pathlib.Path(onnxruntime.__file__).parent / "capi").glob("libonnxruntime.so*"))
    return found[0] if found else None


@dataclass
class NativeOptions:
    """Session options for NativeSession: worker.runtime.native_options makes them from the worker's config."""

    intra_op_threads: int
    inter_op_threads: int
    optimization_level: int
    cpu_mem_arena: bool
    entries: dict[str, str]


class NativeSession:
    """A CPU session opened through ONNX Runtime's C API, for the fast port's C++ batch loop.

    It is a second session on the same verified model bytes as the Python one the main port uses."""

    def __init__(
        self,
        front: NativeFront,
        model: bytes,
        options: NativeOptions,
        inputs: Sequence[tuple[str, str]],
        outputs: Sequence[str],
    ) -> None:
        self.lib = front.lib
        err = C.create_string_buffer(512)
        keys, values = list(options.entries), list(options.entries.values())
        handle = self.lib.fv_ort_session(
            model,
            len(model),
            options.intra_op_threads,
            options.inter_op_threads,
            options.optimization_level,
            int(options.cpu_mem_arena),
            len(keys),
            _strings(keys),
            _strings(values),
            len(inputs),
            _strings([n for n, _ in inputs]),
            _strings([d for _, d in inputs]),
            len(outputs),
            _strings(list(outputs)),
            err,
            len(err),
        )
        if not handle:
            raise RuntimeError(f"ONNX Runtime's C API could not open the model: {err.value.decode(errors='replace')}")
        self.handle: int | None = handle

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Runs a batch and drops its outputs (warm-up; the fast port's loop gets them in C++)."""
        if len(arrays) > MAX_TENSORS:
            raise ValueError(f"at most {MAX_TENSORS} inputs")
        batch = FvBatch()
        batch.ninputs = len(arrays)
        kept = [np.ascontiguousarray(a) for a in arrays]
        for i, a in enumerate(kept):
            if a.ndim > MAX_RANK:
                raise ValueError(f"input of rank {a.ndim}; at most {MAX_RANK}")
            batch.data[i], batch.nbytes[i], batch.rank[i] = a.ctypes.data, a.nbytes, a.ndim
            for d, n in enumerate(a.shape):
                batch.dims[i][d] = n
        err = C.create_string_buffer(512)
        if self.lib.fv_ort_run(self.handle, C.byref(batch), err, len(err)) != 0:
            raise RuntimeError(err.value.decode(errors="replace"))
        return []

    @property
    def runs(self) -> int:
        """Batches run so far, warm-up included."""
        return int(self.lib.fv_ort_runs(self.handle)) if self.handle else 0

    def close(self) -> None:
        if self.handle:
            self.lib.fv_ort_free(self.handle)
            self.handle = None


RunFn = Callable[[list[np.ndarray]], list[np.ndarray]]
BatchHook = Callable[[int, list[float], float], None]
DropHook = Callable[[str], None]


class Batching(Protocol):
    max_batch_size: int
    max_queue_len: int
    max_queue_delay_us: int
    preferred_batch_sizes: list[int]


class Instances:
    """Which session computes a batch. Each model instance has its own session; with an `alone`
    session (more intra-op threads), a batch that would run by itself (no other instance computing,
    nothing queued) runs there instead, and the others wait for it. Under load, one-thread instances
    run side by side and never wait on each other's threads; a lone request gets all the threads."""

    def __init__(self, alone: RunFn | None) -> None:
        self.alone = alone
        self.cond = threading.Condition()
        self.busy = 0
        self.alone_busy = False

    def acquire(self, queued: int) -> bool:
        """Blocks while an alone run is on; True when this batch should run alone.

        queued: calls left in the queue when the batch was taken (no call back into C here: each
        one releases the GIL, and taking it back can wait for another thread)."""
        with self.cond:
            while self.alone_busy:
                self.cond.wait()
            self.busy += 1
            if self.alone is not None and self.busy == 1 and queued == 0:
                self.alone_busy = True
                return True
            return False

    def release(self, alone: bool) -> None:
        with self.cond:
            self.busy -= 1
            if alone:
                self.alone_busy = False
            self.cond.notify_all()


@dataclass
class Slot:
    id: int
    name: str
    threads: list[threading.Thread] = field(default_factory=list)
    instances: int | None = None
    """The C++ loops' shared state (fv_instances_new), when they run the batches."""
    sessions: list[NativeSession] = field(default_factory=list)
    on_batch: BatchHook | None = None
    on_drop: DropHook | None = None
    records: Any = None
    """The buffer the C++ loops' batch records are read into (made once per slot, with room for whole
    records: a batch's record is 3 doubles plus one per call)."""


class NativeFront:
    """One C++ gRPC server on its own port, serving every model version the worker adds to it."""

    def __init__(
        self,
        address: str,
        max_message_bytes: int,
        tokens: Sequence[str],
        default_deadline_ms: int,
        upstream: str,
        tls: tuple[bytes, bytes, bytes] | None = None,
    ) -> None:
        self.lib = _load()
        port = C.c_int(0)
        cert, key, client_ca = tls or (b"", b"", b"")
        handle = self.lib.fv_start(
            address.encode(),
            max_message_bytes,
            "\n".join(t for t in tokens if t).encode(),
            default_deadline_ms,
            upstream.encode(),
            cert,
            key,
            client_ca,
            C.byref(port),
        )
        if not handle:
            raise OSError(f"native front cannot listen on {address}")
        self.handle = handle
        self.port = port.value
        self.slots: dict[int, Slot] = {}
        self.batch_records: deque[tuple[BatchHook, int, list[float], float]] = deque()
        self._records_lock = threading.Lock()  # the C++ loops' records are read and freed under it
        self._ort: str | None = None  # "" once ONNX Runtime's C API is open, else why not
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._flush_every, args=(0.5,), name="fast-port-metrics", daemon=True)
        self._flusher.start()

    def ort_unavailable(self) -> str:
        """Why the C++ batch loop cannot run (ONNX Runtime's C API could not be opened); "" when it can."""
        if self._ort is None:
            path = ort_library()
            err = C.create_string_buffer(512)
            if path is None:
                self._ort = "the onnxruntime package ships no libonnxruntime.so"
            elif self.lib.fv_ort_init(str(path).encode(), err, len(err)) != 0:
                self._ort = f"{path}: {err.value.decode(errors='replace')}"
            else:
                self._ort = ""
                logger.info(
                    "fast port runs batches on ONNX Runtime %s's C API (%s)",
                    self.lib.fv_ort_version().decode(),
                    path.name,
                )
        return self._ort

    def _take_records(self, entry: Slot) -> None:
        """Hands a C++ loop's batch records and drops to the slot's hooks (under _records_lock)."""
        buf = entry.records
        counts, err = (C.c_int64 * 4)(), C.create_string_buffer(512)
        while True:
            n = self.lib.fv_take_records(entry.instances, buf, len(buf), counts, err, len(err))
            expired, cancelled, failed, lost = counts
            for kind, k in (("expired", expired), ("cancelled", cancelled)):
                for _ in range(k):
                    entry.on_drop(kind)  # type: ignore[misc]
            if failed:
                logger.warning(
                    "%d batch(es) of %s failed on the fast port; the last: %s",
                    failed,
                    entry.name,
                    err.value.decode(errors="replace"),
                )
            if lost:
                logger.warning("%d fast-port batch record(s) of %s were lost (nobody read them)", lost, entry.name)
            i, values = 0, buf[:n]
            while i < n:
                calls = int(values[i + 1])
                try:
                    entry.on_batch(int(values[i]), values[i + 3 : i + 3 + calls], values[i + 2])  # type: ignore[misc]
                except Exception:  # noqa: BLE001 - as in flush_metrics
                    logger.exception("fast-port batch metrics could not be recorded")
                i += 3 + calls
            if n == 0:
                return

    def flush_metrics(self) -> None:
        """Hands the batches run since the last flush to their metric hooks."""
        with self._records_lock:
            for entry in list(self.slots.values()):
                if entry.instances:
                    self._take_records(entry)
        while True:
            try:
                hook, samples, waits_s, compute_s = self.batch_records.popleft()
            except IndexError:
                return
            try:
                hook(samples, waits_s, compute_s)
            except Exception:  # noqa: BLE001 - a failing metric must not stop the flusher (and grow the queue)
                logger.exception("fast-port batch metrics could not be recorded")

    def _flush_every(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            self.flush_metrics()

    def add(
        self,
        name: str,
        version: int,
        inputs: Sequence[Any],
        input_dtypes: Sequence[Any],
        outputs: Sequence[Any],
        labels: Sequence[str],
        probabilities: bool,
        batching: Batching,
        runners: Sequence[RunFn],
        on_batch: BatchHook,
        on_drop: DropHook,
        alone: RunFn | None = None,
        sessions: Sequence[NativeSession] = (),
        alone_session: NativeSession | None = None,
    ) -> int:
        """Register a warmed-up version and start one batch loop per runner (model instance).

        With sessions (NativeSession, warmed up), the loops run in C++ on them instead, and alone_session
        takes the place of alone; the slot owns them from here on. inputs and outputs are the model's
        tensor specs (name, datatype, shape), as declared in the model file."""
        ranks = (C.c_int32 * len(inputs))(*[len(t.shape) for t in inputs])
        dims = [int(d) for t in inputs for d in t.shape]
        out_ranks = (C.c_int32 * len(outputs))(*[len(t.shape) for t in outputs])
        out_dims = [int(d) for t in outputs for d in t.shape]
        preferred = list(batching.preferred_batch_sizes)
        slot = self.lib.fv_add_model(
            self.handle,
            name.encode(),
            str(version).encode(),
            batching.max_batch_size,
            batching.max_queue_len,
            batching.max_queue_delay_us,
            len(preferred),
            (C.c_int32 * max(1, len(preferred)))(*preferred),
            len(inputs),
            _strings([t.name for t in inputs]),
            _strings([t.datatype for t in inputs]),
            ranks,
            (C.c_int64 * len(dims))(*dims),
            len(outputs),
            _strings([t.name for t in outputs]),
            _strings([t.datatype for t in outputs]),
            out_ranks,
            (C.c_int64 * max(1, len(out_dims)))(*out_dims),
            "\n".join(labels).encode(),
            int(probabilities),
        )
        if slot < 0:
            raise ValueError(f"the native front cannot serve {name} v{version} (inputs or outputs out of its limits)")
        entry = Slot(slot, f"{name}:{version}", on_batch=on_batch, on_drop=on_drop)
        if sessions:
            entry.records = (C.c_double * max(65536, 3 + batching.max_batch_size))()
            entry.sessions = [*sessions, *([alone_session] if alone_session else [])]
            entry.instances = self.lib.fv_instances_new(alone_session.handle if alone_session else None)
            for i, session in enumerate(sessions):
                t = threading.Thread(
                    target=self.lib.fv_serve,
                    args=(self.handle, slot, session.handle, entry.instances, batching.max_batch_size),
                    name=f"fast-{name}-{version}-{i}",
                    daemon=True,
                )
                entry.threads.append(t)
                t.start()
            self.slots[slot] = entry
            return slot
        instances = Instances(alone)
        for i, run in enumerate(runners):
            t = threading.Thread(
                target=self._loop,
                args=(slot, run, instances, list(input_dtypes), on_batch, on_drop, batching.max_batch_size),
                name=f"fast-{name}-{version}-{i}",
                daemon=True,
            )
            entry.threads.append(t)
            t.start()
        self.slots[slot] = entry
        return slot

    def route(self, name: str, targets: Sequence[tuple[int, int]]) -> None:
        """Where calls for `name` without a version go: (slot, weight) pairs."""
        slots = (C.c_int32 * len(targets))(*[s for s, _ in targets])
        weights = (C.c_int32 * len(targets))(*[w for _, w in targets])
        if self.lib.fv_route(self.handle, name.encode(), len(targets), slots, weights) != 0:
            raise ValueError(f"unknown slot in route for {name}")

    async def remove(self, slot: int) -> None:
        """Stop taking calls for a version, answer what it has queued, then forget it."""
        entry = self.slots.pop(slot, None)
        if entry is None:
            return
        self.lib.fv_close_model(self.handle, slot)
        for t in entry.threads:
            await asyncio.to_thread(t.join)
        self._free(entry)
        self.lib.fv_release_model(self.handle, slot)

    def _free(self, entry: Slot) -> None:
        """After its loops ended: the last records to the hooks, then the C++ state and sessions freed."""
        with self._records_lock:
            if entry.instances:
                self._take_records(entry)
                self.lib.fv_instances_free(entry.instances)
                entry.instances = None
            for session in entry.sessions:
                session.close()
            entry.sessions.clear()

    def depth(self, slot: int) -> tuple[int, int]:
        """(queued calls, batches in compute)."""
        if not self.handle:
            return 0, 0
        queued, busy = C.c_int32(0), C.c_int32(0)
        self.lib.fv_depth(self.handle, slot, C.byref(queued), C.byref(busy))
        return queued.value, busy.value

    def statistics(self, slot: int) -> bytes:
        """The slot's serialized inference.ModelStatistics (fast-port calls only)."""
        if not self.handle:
            return b""
        buf = C.create_string_buffer(1 << 16)
        size = self.lib.fv_statistics(self.handle, slot, buf, len(buf))
        return buf.raw[:size] if size > 0 else b""

    def submit(self, slot: int, request: bytes, timeout_ms: int, timing: Timing | None = None) -> bytes:
        """Queue a ModelInferRequest (raw tensors) made by the Python server for a version's slot, with the calls
        the front takes itself; blocks until it is answered (ctypes releases the GIL), and returns the
        serialized ModelInferResponse. Refused carries any other status, with the message of the one validator
        (check.cc) or of the batch."""
        out, size, times = C.c_void_p(), C.c_int64(0), (C.c_int64 * 6)()
        message = C.create_string_buffer(1024)
        code = self.lib.fv_submit(
            self.handle, slot, request, len(request), timeout_ms, C.byref(out), C.byref(size), times, message, 1024
        )
        if code != 0:
            raise Refused(CODES.get(code, grpc.StatusCode.UNKNOWN), message.value.decode(errors="replace"))
        try:
            body = C.string_at(out, size.value)
        finally:
            self.lib.fv_free_buffer(out)
        if timing is not None:
            timing.enqueued, timing.taken, timing.compute_end = (t / 1e9 for t in times[:3])
            timing.compute_start = timing.taken
            timing.batch_size, timing.batch_calls, timing.batch = times[3], times[4], times[5]
        return body

    def set_trace_sampled(self, on: bool) -> None:
        """Relay ModelInfer calls with a sampled traceparent to the Python server, which traces them."""
        self.lib.fv_set_trace_sampled(self.handle, int(on))

    def set_accepting(self, accepting: bool) -> None:
        """While not accepting, new calls get UNAVAILABLE (a gateway retries elsewhere); queued ones still answered."""
        self.lib.fv_set_accepting(self.handle, int(accepting))

    def shutdown(self, grace_s: float) -> None:
        """Blocks until every accepted call is answered (calls still open after grace_s are cancelled)."""
        self.lib.fv_shutdown(self.handle, grace_s)

    def close(self) -> None:
        """After shutdown(): end the batch loops and free the front."""
        for slot in list(self.slots):
            self.lib.fv_close_model(self.handle, slot)
        for entry in self.slots.values():
            for t in entry.threads:
                t.join(5)
            if not any(t.is_alive() for t in entry.threads):
                self._free(entry)
        self.slots.clear()
        self._stop.set()
        self._flusher.join(5)
        self.flush_metrics()
        if self.handle:
            self.lib.fv_free(self.handle)
            self.handle = None

    def request_times(self) -> list[tuple[str, str, list[float], list[int], float]]:
        """Per version served: (model, version, bucket bounds in s, calls per bucket with +Inf last,
        sum in s) of the calls answered OK, from arrival to answer."""
        out: list[tuple[str, str, list[float], list[int], float]] = []
        if not self.handle:
            return out
        bounds, counts, total = (C.c_int64 * 64)(), (C.c_int64 * 64)(), C.c_int64(0)
        for slot, entry in list(self.slots.items()):
            n = self.lib.fv_request_times(self.handle, slot, bounds, counts, C.byref(total))
            if n > 0:
                name, version = entry.name.rsplit(":", 1)
                out.append((name, version, [b / 1e9 for b in bounds[: n - 1]], list(counts[:n]), total.value / 1e9))
        return out

    def codes(self) -> list[int]:
        """ModelInfer calls answered on the fast port, indexed by gRPC status code."""
        out = (C.c_int64 * 17)()
        if not self.handle:
            return list(out)
        self.lib.fv_codes(self.handle, out)
        return list(out)

    def _loop(
        self,
        slot: int,
        run: RunFn,
        instances: Instances,
        dtypes: list[Any],
        on_batch: BatchHook,
        on_drop: DropHook,
        max_batch: int,
    ) -> None:
        lib, handle = self.lib, self.handle
        batch = FvBatch()
        waits = (C.c_double * max_batch)()
        out_dtypes: dict[tuple[str, ...], Any] = {}  # the C strings of each output dtype list, made once
        while True:
            got = lib.fv_next_batch(handle, slot, 250, C.byref(batch), waits)
            for _ in range(batch.expired):
                on_drop("expired")
            for _ in range(batch.cancelled):
                on_drop("cancelled")
            if got < 0:
                return
            if got == 0:
                continue
            try:
                arrays = []
                for i in range(batch.ninputs):
                    shape = tuple(batch.dims[i][: batch.rank[i]])
                    buf = (C.c_char * batch.nbytes[i]).from_address(batch.data[i])
                    arrays.append(np.frombuffer(buf, dtype=dtypes[i]).reshape(shape))
                alone = instances.acquire(batch.queued)
                try:
                    t0 = time.perf_counter()
                    use = instances.alone if alone and instances.alone is not None else run
                    outputs = [np.ascontiguousarray(o) for o in use(arrays)]
                    compute_s = time.perf_counter() - t0
                finally:
                    instances.release(alone)
            except Exception as exc:  # noqa: BLE001 - a failing batch fails only its own requests
                logger.warning("batch of %d samples failed on the fast port: %s", batch.samples, exc)
                lib.fv_fail(handle, batch.id, INTERNAL, f"model failed on this batch: {str(exc)[:200]}".encode())
                continue
            n = len(outputs)
            dims = [int(d) for o in outputs for d in o.shape]
            names = tuple(o.dtype.str for o in outputs)
            if names not in out_dtypes:
                out_dtypes[names] = _strings([oip.oip_dtype(o) for o in outputs])
            lib.fv_complete(
                handle,
                batch.id,
                int(compute_s * 1e9),
                n,
                out_dtypes[names],
                (C.c_void_p * n)(*[o.ctypes.data for o in outputs]),
                (C.c_int32 * n)(*[o.ndim for o in outputs]),
                (C.c_int64 * max(1, len(dims)))(*dims),
            )
            # Metrics wait for flush_metrics (another thread, or a scrape): observing them here took
            # ~40 us of GIL per batch, which the next call's thread then waited for.
            self.batch_records.append((on_batch, batch.samples, list(waits[: batch.calls]), compute_s))
