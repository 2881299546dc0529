"""The worker's fast port: a C++ gRPC front (worker/native/front.cc) for ModelInfer on raw tensors.

The front validates calls and batches them; each model instance's batch loop runs in C++ on ONNX Runtime's
C API (worker/native/ort_loop.cc, sessions from NativeSession), on the CPU, CUDA or TensorRT provider. Calls
with encoded images wait on the front's image queue for the decode threads (worker/decoding.py, through
image_jobs and images_done), and then take the same queue; typed contents the front reads into raw tensors
itself. The other calls (calls to trace, versions it does not hold, streams, metadata) it relays to the Python
server.

Python reaches the C++ through one binding, _fovea_worker: cffi (API mode) generates it from
worker/native/api.h, the one declaration of every fv_* function and of the structs they exchange, and the
C compiler checks each call against it; a Python value of the wrong type is a TypeError, not a corrupted
argument. cffi releases the GIL around every fv_* call, so a thread blocked waiting for a batch, or running
the C++ loop, does not hold up the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import pathlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import numpy as np

from fovea import oip
from fovea.errors import FoveaError
from fovea.native import binding_path, load_binding

logger = logging.getLogger(__name__)

PART = pathlib.Path(__file__).parent
MODULE = "_fovea_worker"  # built into worker/native/<build folder>/ (fovea/native.py finds it)
INTERNAL = 13
ERROR_CAP = 512


CODES = {c.value[0]: c for c in grpc.StatusCode}


class Refused(FoveaError):
    """The native queue's answer to a submitted call that is not OK: its status code and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        # The native queue answers UNAVAILABLE only before any compute (a version unloading).
        self.unserved = code == grpc.StatusCode.UNAVAILABLE


@dataclass
class ImageJob:
    """An image call the front queued for decoding (api.h fv_image_job), copied out of it."""

    id: int
    slot: int
    tensor: bytes
    """Its BYTES input, a serialized InferInputTensor."""
    raw: bytes | None
    """That input's raw_input_contents entry, if it came as one."""


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


def binding() -> tuple[Any, Any]:
    """(ffi, lib) of the worker's binding; RuntimeError saying how to build it when it is missing."""
    return load_binding(PART, MODULE)


def binding_file() -> pathlib.Path:
    """Where the binding is, or would be (FOVEA_NATIVE_BUILD picks the build folder)."""
    return binding_path(PART, MODULE)


def available() -> bool:
    return binding_file().exists()


class CStrings:
    """C strings and arrays for the structs of one call: cffi frees each with its Python object, and a struct's
    pointer field does not keep what it points to alive, so they are kept here until the call returns."""

    def __init__(self, ffi: Any) -> None:
        self.ffi = ffi
        self.kept: list[Any] = []

    def keep(self, cdata: Any) -> Any:
        self.kept.append(cdata)
        return cdata

    def one(self, text: str | bytes) -> Any:
        return self.keep(self.ffi.new("char[]", text.encode() if isinstance(text, str) else text))

    def many(self, items: Sequence[str]) -> Any:
        return self.keep(self.ffi.new("char *[]", [self.one(t) for t in items]))


def error_text(ffi: Any, buf: Any) -> str:
    return ffi.string(buf).decode(errors="replace")


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
    providers: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    """GPU providers (TensorrtExecutionProvider, CUDAExecutionProvider) in order, each with its options as ONNX
    Runtime names them; ONNX Runtime's CPU provider comes after them."""
    sizes: list[int] = field(default_factory=list)
    """Batch buckets, ascending: a session each, batches padded up to the first that holds them."""


class NativeSession:
    """A model instance's session for the C++ batch loop, opened through ONNX Runtime's C API on the CPU or the
    CUDA provider: one session, or one per batch bucket (NativeOptions.sizes)."""

    def __init__(
        self,
        front: NativeFront,
        model: bytes,
        options: NativeOptions,
        inputs: Sequence[tuple[str, str]],
        outputs: Sequence[str],
    ) -> None:
        self.ffi, self.lib = front.ffi, front.lib
        c = CStrings(self.ffi)
        spec = self.ffi.new("fv_session_spec *")
        spec.model = c.keep(self.ffi.from_buffer(model))
        spec.model_len = len(model)
        spec.intra_op_threads = options.intra_op_threads
        spec.inter_op_threads = options.inter_op_threads
        spec.optimization_level = options.optimization_level
        spec.cpu_mem_arena = int(options.cpu_mem_arena)
        spec.nentries = len(options.entries)
        spec.keys = c.many(list(options.entries))
        spec.values = c.many(list(options.entries.values()))
        spec.ninputs = len(inputs)
        spec.input_names = c.many([n for n, _ in inputs])
        spec.input_dtypes = c.many([d for _, d in inputs])
        spec.noutputs = len(outputs)
        spec.output_names = c.many(list(outputs))
        providers = c.keep(self.ffi.new("fv_provider[]", len(options.providers)))
        for provider, (name, opts) in zip(providers, options.providers, strict=True):
            provider.name, provider.noptions = c.one(name), len(opts)
            provider.keys, provider.values = c.many(list(opts)), c.many(list(opts.values()))
        spec.nproviders, spec.providers = len(options.providers), providers
        spec.nsizes = len(options.sizes)
        spec.sizes = c.keep(self.ffi.new("int32_t[]", list(options.sizes)))
        self.providers, self.sizes = [name for name, _ in options.providers], list(options.sizes)
        err = self.ffi.new("char[]", ERROR_CAP)
        handle = self.lib.fv_ort_session(spec, err, ERROR_CAP)
        if not handle:
            raise RuntimeError(f"ONNX Runtime's C API could not open the model: {error_text(self.ffi, err)}")
        self.handle: Any = handle

    def run(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Runs a batch and drops its outputs (warm-up; the fast port's loop gets them in C++)."""
        max_tensors, max_rank = self.lib.FV_MAX_TENSORS, self.lib.FV_MAX_RANK
        if len(arrays) > max_tensors:
            raise ValueError(f"at most {max_tensors} inputs")
        batch = self.ffi.new("fv_batch *")
        batch.ninputs = len(arrays)
        kept = [np.ascontiguousarray(a) for a in arrays]
        batch.samples = kept[0].shape[0] if kept and kept[0].ndim else 0  # picks the bucket
        buffers = []  # alive until the call returns
        for i, a in enumerate(kept):
            if a.ndim > max_rank:
                raise ValueError(f"input of rank {a.ndim}; at most {max_rank}")
            buffers.append(self.ffi.from_buffer(a))
            batch.data[i], batch.nbytes[i], batch.rank[i] = buffers[-1], a.nbytes, a.ndim
            batch.dims[i][0 : a.ndim] = a.shape
        err = self.ffi.new("char[]", ERROR_CAP)
        if self.lib.fv_ort_run(self.handle, batch, err, ERROR_CAP) != 0:
            raise RuntimeError(error_text(self.ffi, err))
        return []

    @property
    def runs(self) -> int:
        """Batches run so far, warm-up included."""
        return int(self.lib.fv_ort_runs(self.handle)) if self.handle else 0

    def bucket_runs(self, size: int) -> int:
        """Batches run so far on the bucket of that batch size (-1: no such bucket)."""
        return int(self.lib.fv_ort_bucket_runs(self.handle, size)) if self.handle else -1

    def close(self) -> None:
        if self.handle:
            self.lib.fv_ort_free(self.handle)
            self.handle = None


BatchHook = Callable[[int, list[float], float, int], None]
"""(samples, each call's queue wait, compute seconds, the batch size it ran at: samples plus padding)."""
DropHook = Callable[[str], None]


class Batching(Protocol):
    max_batch_size: int
    max_queue_len: int
    max_queue_delay_us: int
    preferred_batch_sizes: list[int]


@dataclass
class Slot:
    id: int
    name: str
    threads: list[threading.Thread] = field(default_factory=list)
    instances: Any = None
    """The C++ loops' shared state (fv_instances_new)."""
    sessions: list[NativeSession] = field(default_factory=list)
    on_batch: BatchHook | None = None
    on_drop: DropHook | None = None
    records: Any = None
    """The fv_records the C++ loops' batch records are read into (made once per slot, with room for whole
    records: the waits hold at least max_batch calls), and the arrays it points to."""
    record_arrays: tuple[Any, ...] = ()


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
        self.ffi, self.lib = binding()
        c = CStrings(self.ffi)
        cert, key, client_ca = tls or (b"", b"", b"")
        accepted = [t for t in tokens if t]
        options = self.ffi.new("fv_front_options *")
        options.address = c.one(address)
        options.max_message_bytes = max_message_bytes
        options.ntokens = len(accepted)
        options.tokens = c.many(accepted)
        options.default_deadline_ms = default_deadline_ms
        options.upstream = c.one(upstream)
        options.cert_pem, options.key_pem, options.client_ca_pem = c.one(cert), c.one(key), c.one(client_ca)
        port = self.ffi.new("int32_t *")
        handle = self.lib.fv_start(options, port)
        if not handle:
            raise OSError(f"native front cannot listen on {address}")
        self.handle: Any = handle
        self.port = int(port[0])
        self.slots: dict[int, Slot] = {}
        self._records_lock = threading.Lock()  # the C++ loops' records are read and freed under it
        self._ort: str | None = None  # "" once ONNX Runtime's C API is open, else why not
        self._stop = threading.Event()
        self._flusher = threading.Thread(target=self._flush_every, args=(0.5,), name="fast-port-metrics", daemon=True)
        self._flusher.start()

    def ort_unavailable(self) -> str:
        """Why the C++ batch loop cannot run (ONNX Runtime's C API could not be opened); "" when it can."""
        if self._ort is None:
            path = ort_library()
            err = self.ffi.new("char[]", ERROR_CAP)
            if path is None:
                self._ort = "the onnxruntime package ships no libonnxruntime.so"
            elif self.lib.fv_ort_init(str(path).encode(), err, ERROR_CAP) != 0:
                self._ort = f"{path}: {error_text(self.ffi, err)}"
            else:
                self._ort = ""
                logger.info(
                    "fast port runs batches on ONNX Runtime %s's C API (%s)",
                    self.ffi.string(self.lib.fv_ort_version()).decode(),
                    path.name,
                )
        return self._ort

    def _take_records(self, entry: Slot) -> None:
        """Hands a C++ loop's batch records and drops to the slot's hooks (under _records_lock)."""
        io = entry.records
        while True:
            n = self.lib.fv_take_records(entry.instances, io)
            for kind, k in (("expired", io.expired), ("cancelled", io.cancelled)):
                for _ in range(k):
                    entry.on_drop(kind)  # type: ignore[misc]
            if io.failed:
                logger.warning(
                    "%d batch(es) of %s failed on the fast port; the last: %s",
                    io.failed,
                    entry.name,
                    error_text(self.ffi, io.last_error),
                )
            if io.lost:
                logger.warning("%d fast-port batch record(s) of %s were lost (nobody read them)", io.lost, entry.name)
            waits, at = self.ffi.unpack(io.waits, io.nwaits), 0
            for r in range(n):
                record = io.records[r]
                try:
                    entry.on_batch(record.samples, waits[at : at + record.calls], record.compute_s, record.run_samples)  # type: ignore[misc]
                except Exception:  # noqa: BLE001 - as in flush_metrics
                    logger.exception("fast-port batch metrics could not be recorded")
                at += record.calls
            if n == 0:
                return

    def flush_metrics(self) -> None:
        """Hands the batches run since the last flush to their metric hooks."""
        with self._records_lock:
            for entry in list(self.slots.values()):
                if entry.instances:
                    self._take_records(entry)

    def _flush_every(self, period_s: float) -> None:
        while not self._stop.wait(period_s):
            self.flush_metrics()

    def add(
        self,
        name: str,
        version: int,
        inputs: Sequence[Any],
        outputs: Sequence[Any],
        labels: Sequence[str],
        probabilities: bool,
        batching: Batching,
        sessions: Sequence[NativeSession],
        on_batch: BatchHook,
        on_drop: DropHook,
        alone_session: NativeSession | None = None,
    ) -> int:
        """Register a warmed-up version and start one C++ batch loop per session (model instance); alone_session,
        if any, runs a batch that would run by itself. The slot owns the sessions from here on. inputs and
        outputs are the model's tensor specs (name, datatype, shape), as declared in the model file. With no
        sessions the front queues the version's calls and nothing computes them (tests)."""
        c = CStrings(self.ffi)
        preferred = list(batching.preferred_batch_sizes)
        spec = self.ffi.new("fv_model_spec *")
        spec.name, spec.version = c.one(name), c.one(str(version))
        spec.max_batch = batching.max_batch_size
        spec.max_queue = batching.max_queue_len
        spec.max_queue_delay_us = batching.max_queue_delay_us
        spec.npreferred, spec.preferred = len(preferred), c.keep(self.ffi.new("int32_t[]", preferred))
        spec.ninputs, spec.inputs = len(inputs), self._tensor_specs(c, inputs)
        spec.noutputs, spec.outputs = len(outputs), self._tensor_specs(c, outputs)
        spec.nlabels, spec.labels = len(labels), c.many(list(labels))
        spec.probabilities = int(probabilities)
        slot = self.lib.fv_add_model(self.handle, spec)
        if slot < 0:
            raise ValueError(f"the native front cannot serve {name} v{version} (inputs or outputs out of its limits)")
        entry = Slot(slot, f"{name}:{version}", on_batch=on_batch, on_drop=on_drop)
        entry.records, entry.record_arrays = self._records(batching.max_batch_size)
        entry.sessions = [*sessions, *([alone_session] if alone_session else [])]
        entry.instances = self.lib.fv_instances_new(alone_session.handle if alone_session else self.ffi.NULL)
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

    def _tensor_specs(self, c: CStrings, tensors: Sequence[Any]) -> Any:
        """fv_tensor_spec[] of tensor specs (name, datatype, shape); a rank past FV_MAX_RANK is passed on as
        it is, for the front to refuse with the rest of its limits."""
        out = c.keep(self.ffi.new("fv_tensor_spec[]", len(tensors)))
        for spec, t in zip(out, tensors, strict=True):
            spec.name, spec.dtype, spec.rank = c.one(t.name), c.one(t.datatype), len(t.shape)
            dims = [int(d) for d in t.shape][: self.lib.FV_MAX_RANK]
            spec.dims[0 : len(dims)] = dims
        return out

    def _records(self, max_batch: int) -> tuple[Any, tuple[Any, ...]]:
        """An fv_records with room for many records, and for any one (waits for max_batch calls)."""
        records = self.ffi.new("fv_batch_record[]", 4096)
        waits = self.ffi.new("double[]", max(65536, max_batch))
        io = self.ffi.new("fv_records *")
        io.records, io.records_cap = records, len(records)
        io.waits, io.waits_cap = waits, len(waits)
        return io, (records, waits)

    def route(self, name: str, targets: Sequence[tuple[int, int]]) -> None:
        """Where calls for `name` without a version go: (slot, weight) pairs."""
        chosen = self.ffi.new("fv_route_target[]", [(s, w) for s, w in targets])
        if self.lib.fv_route(self.handle, name.encode(), len(targets), chosen) != 0:
            raise ValueError(f"unknown slot in route for {name}")

    def pick_version(self, name: str) -> int:
        """The version a call for name without one goes to: the front's pick by the route's weights (0: no route)."""
        return int(self.lib.fv_pick_version(self.handle, name.encode()))

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
                entry.records, entry.record_arrays = None, ()
            for session in entry.sessions:
                session.close()
            entry.sessions.clear()

    def depth(self, slot: int) -> tuple[int, int]:
        """(queued calls, batches in compute)."""
        if not self.handle:
            return 0, 0
        depth = self.ffi.new("fv_queue_depth *")
        self.lib.fv_depth(self.handle, slot, depth)
        return depth.queued, depth.busy

    def statistics(self, slot: int) -> bytes:
        """The slot's serialized inference.ModelStatistics (fast-port calls only)."""
        if not self.handle:
            return b""
        cap = 1 << 16
        buf = self.ffi.new("char[]", cap)
        size = self.lib.fv_statistics(self.handle, slot, buf, cap)
        return self.ffi.buffer(buf, size)[:] if size > 0 else b""

    def submit(self, slot: int, request: bytes, timeout_ms: int, timing: Timing | None = None) -> bytes:
        """Queue a ModelInferRequest (raw tensors) made by the Python server for a version's slot, with the calls
        the front takes itself; blocks until it is answered (cffi releases the GIL), and returns the
        serialized ModelInferResponse. Refused carries any other status, with the message of the one validator
        (check.cc) or of the batch."""
        answer = self.ffi.new("fv_answer *")
        code = self.lib.fv_submit(self.handle, slot, request, len(request), timeout_ms, answer)
        if code != 0:
            raise Refused(CODES.get(code, grpc.StatusCode.UNKNOWN), error_text(self.ffi, answer.message))
        try:
            body = self.ffi.buffer(answer.response, answer.response_len)[:]
        finally:
            self.lib.fv_free_buffer(answer.response)
        if timing is not None:
            t = answer.timing
            timing.enqueued, timing.taken, timing.compute_end = (
                t.enqueued_ns / 1e9,
                t.taken_ns / 1e9,
                t.computed_ns / 1e9,
            )
            timing.compute_start = timing.taken
            timing.batch_size, timing.batch_calls, timing.batch = t.batch_samples, t.batch_calls, t.batch_id
        return body

    def image_jobs(self) -> Iterator[ImageJob]:
        """The image calls the front queues (fv_next_images), each copied out of the front, until it shuts down.
        Each must be answered: images_done or images_fail."""
        job = self.ffi.new("fv_image_job *")
        while self.handle:
            got = self.lib.fv_next_images(self.handle, 250, job)
            if got < 0:
                return
            if got > 0:
                raw = self.ffi.buffer(job.raw, job.raw_len)[:] if job.has_raw else None
                yield ImageJob(int(job.id), int(job.slot), self.ffi.buffer(job.tensor, job.tensor_len)[:], raw)

    def images_done(self, job_id: int, array: np.ndarray) -> None:
        """An image call's tensor (dimension 0 = images): checked, queued and batched like any other call."""
        array = np.ascontiguousarray(array)
        if not 1 <= array.ndim <= self.lib.FV_MAX_RANK:
            self.images_fail(job_id, INTERNAL, f"decoded images of rank {array.ndim}")
            return
        out = self.ffi.new("fv_output *")
        dtype = self.ffi.new("char[]", oip.oip_dtype(array).encode())
        view = self.ffi.from_buffer(array)  # alive until fv_images_done, which copies it
        out.dtype, out.data, out.rank = dtype, view, array.ndim
        out.dims[0 : array.ndim] = array.shape
        self.lib.fv_images_done(self.handle, job_id, out)

    def images_fail(self, job_id: int, code: int, message: str) -> None:
        self.lib.fv_images_fail(self.handle, job_id, code, message.encode()[: ERROR_CAP * 2])

    def set_trace_sampled(self, on: bool) -> None:
        """Relay ModelInfer calls with a sampled traceparent to the Python server, which traces them."""
        self.lib.fv_set_trace_sampled(self.handle, int(on))

    def trim_heap(self) -> None:
        """Give the heap's free memory back to the system: after a load's transient copies (the front keeps
        freed memory for serving, fv_start's mallopt, which would keep them resident)."""
        self.lib.fv_trim_heap()

    def set_accepting(self, accepting: bool) -> None:
        """While not accepting, new calls get UNAVAILABLE (a gateway retries elsewhere); queued ones still answered."""
        self.lib.fv_set_accepting(self.handle, int(accepting))

    def shutdown(self, grace_s: float) -> None:
        """Blocks until every accepted call is answered (calls still open after grace_s are cancelled)."""
        self.lib.fv_shutdown(self.handle, grace_s)

    def close(self, free: bool = True) -> None:
        """After shutdown(): end the batch loops and free the front (not when free is False: a thread may still
        call into it)."""
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
        if self.handle and free:
            self.lib.fv_free(self.handle)
            self.handle = None

    def request_times(self) -> list[tuple[str, str, list[float], list[int], float]]:
        """Per version served: (model, version, bucket bounds in s, calls per bucket with +Inf last,
        sum in s) of the calls answered OK, from arrival to answer."""
        out: list[tuple[str, str, list[float], list[int], float]] = []
        if not self.handle:
            return out
        times = self.ffi.new("fv_time_buckets *")
        for slot, entry in list(self.slots.items()):
            if self.lib.fv_request_times(self.handle, slot, times) == 0:
                name, version = entry.name.rsplit(":", 1)
                bounds = [b / 1e9 for b in times.bounds_ns]
                out.append((name, version, bounds, list(times.counts), times.sum_ns / 1e9))
        return out

    def codes(self) -> list[int]:
        """ModelInfer calls answered on the fast port, indexed by gRPC status code."""
        counts = self.ffi.new("fv_status_counts *")
        if self.handle:
            self.lib.fv_codes(self.handle, counts)
        return list(counts.by_code)
