"""A verified artifact into warmed-up sessions: one job of a version's load (worker/models.py downloads and
verifies before it, and wires the sessions to the native front after it).

Where the C++ batch loop runs a version's batches (the CPU provider, ONNX Runtime's C API open), its sessions
are the only ones: Python's first session only tells the provider, the names and the types, and is freed
before the C++ sessions open, so each instance's weights exist once."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from fovea.onnxfile import refuse_external_data_bytes
from fovea.v1 import model_pb2
from worker.config import WorkerConfig
from worker.fast_port import NativeFront, NativeSession
from worker.runtime import (
    GPU_PROVIDERS,
    Bucketed,
    ProviderFallback,
    Session,
    buckets_for,
    load_model,
    load_session,
    native_options,
)

logger = logging.getLogger(__name__)

RunFn = Callable[[list[np.ndarray]], list[np.ndarray]]


@dataclass
class Opened:
    """A version's sessions: Python's (a GPU, batch buckets) or the C++ loop's, never both."""

    first: Session | Bucketed
    """Tells the provider, the input and output names and types, the batch buckets (its session is None where
    the C++ loop runs the batches)."""
    sessions: list[Session | Bucketed] = field(default_factory=list)
    alone: Session | Bucketed | None = None
    """Python's session with more threads for a batch that runs by itself (alone_threads)."""
    fast: list[NativeSession] = field(default_factory=list)
    fast_alone: NativeSession | None = None

    def runners(self) -> list[RunFn]:
        """Every session's run, for the warm-up: Python's, then the C++ ones."""
        python = [runner(s) for s in [*self.sessions, *([self.alone] if self.alone else [])]]
        return python + [s.run for s in [*self.fast, *([self.fast_alone] if self.fast_alone else [])]]

    def close(self) -> None:
        """Frees the C++ sessions now (Python's go with their last reference)."""
        for s in [*self.fast, *([self.fast_alone] if self.fast_alone else [])]:
            s.close()


def runner(session: Session | Bucketed) -> RunFn:
    names = session.input_names
    return lambda inputs: session.run(dict(zip(names, inputs, strict=False)))


async def open_sessions(
    data: bytes,
    config: WorkerConfig,
    mv: model_pb2.ModelVersion,
    native: NativeFront | None,
    alone_threads: int,
    trim_heap: Callable[[], Awaitable[None]],
) -> Opened:
    """The sessions of config.instances instances on data (refused first if it names external-data files, which
    ONNX Runtime would read). trim_heap returns freed copies to the system between the steps."""
    await asyncio.to_thread(refuse_external_data_bytes, data)
    await trim_heap()  # the parsed copy
    count = max(1, config.instances)
    provider = native_provider(native, config)
    if provider is not None:
        assert native is not None
        # The names, types and batch axes only, from a CPU session freed before the C++ sessions open: a CUDA
        # session here would load the CUDA provider's library for Python's copy of ONNX Runtime, and that
        # library serves one copy per process.
        probe = await asyncio.to_thread(load_session, data, metadata_config(config))
        first = dataclasses.replace(
            probe,
            session=None,
            provider=provider,
            sizes=buckets_for(config, provider, probe),  # type: ignore[arg-type]
        )
        del probe
        await trim_heap()
        if provider in GPU_PROVIDERS:
            alone_threads = 0  # intra-op threads do not speed up a GPU's batch
        fast, fast_alone = await asyncio.to_thread(open_native, native, data, config, mv, first, count, alone_threads)
        if fast:
            return Opened(first, fast=fast, fast_alone=fast_alone)
    # Python runs the batches, on sessions of its own
    loaded = await asyncio.to_thread(load_model, data, config)
    opened = Opened(loaded, sessions=[loaded])
    opened.sessions += await asyncio.gather(*(asyncio.to_thread(load_model, data, config) for _ in range(count - 1)))
    if native is not None and alone_threads:
        opened.alone = await asyncio.to_thread(
            load_model, data, config.model_copy(update={"intra_op_threads": alone_threads})
        )
    return opened


def native_provider(native: NativeFront | None, config: WorkerConfig) -> str | None:
    """The provider the C++ batch loop runs this worker's models on (see WorkerConfig.native_compute): the first
    of config.providers this onnxruntime build has; None where Python runs the batches."""
    if native is None or not config.native_compute:
        return None
    built = set(ort.get_available_providers())
    wanted = next((p for p in config.providers if p in built), "CPUExecutionProvider")
    if config.require_gpu and wanted not in GPU_PROVIDERS:
        raise ProviderFallback(f"require_gpu is set but this onnxruntime build has none of {config.providers}")
    why = native.ort_unavailable()
    if why:
        logger.warning("fast port batches run in Python: %s", why)
        return None
    return wanted


def metadata_config(config: WorkerConfig) -> WorkerConfig:
    """A cheap CPU session's settings, for reading a model's names and types."""
    return config.model_copy(
        update={
            "providers": ["CPUExecutionProvider"],
            "require_gpu": False,
            "intra_op_threads": 1,
            "inter_op_threads": 1,
            "graph_optimization": "disable",
        }
    )


def open_native(
    native: NativeFront,
    data: bytes,
    config: WorkerConfig,
    mv: model_pb2.ModelVersion,
    first: Session | Bucketed,
    count: int,
    alone_threads: int,
) -> tuple[list[NativeSession], NativeSession | None]:
    """The C API sessions of the C++ loops: one per instance, and the alone one if configured.
    ([], None) when they cannot be opened: Python then runs the batches."""
    inputs = [(n, t.datatype) for n, t in zip(first.input_names, mv.inputs, strict=False)]
    made: list[NativeSession] = []
    try:
        for _ in range(count):
            made.append(
                NativeSession(
                    native, data, native_options(config, first.sizes), inputs, first.output_names
                )
            )
        alone = (
            NativeSession(
                native,
                data,
                native_options(config.model_copy(update={"intra_op_threads": alone_threads}), first.sizes),
                inputs,
                first.output_names,
            )
            if alone_threads
            else None
        )
    except RuntimeError as exc:
        for s in made:
            s.close()
        logger.warning("fast port batches of %s v%d run in Python: %s", mv.name, mv.version, exc)
        return [], None
    return made, alone


def warmup_sizes(
    config: WorkerConfig, provider: str, mv: model_pb2.ModelVersion, buckets: Sequence[int] = ()
) -> list[int]:
    """Batch sizes each instance runs before a version is ready (see WorkerConfig.warmup_batch_sizes);
    with a session per batch size (buckets), each size once."""
    top = config.max_batch_size
    if any(spec.shape and spec.shape[0] > 0 for spec in mv.inputs):
        return [1]  # a fixed batch dimension: only single samples ever run
    if config.warmup_batch_sizes:
        return sorted({n for n in config.warmup_batch_sizes if 1 <= n <= top}) or [1]
    if buckets:
        return list(buckets)
    return list(range(1, top + 1)) if provider in GPU_PROVIDERS else [1]


def zeros(mv: model_pb2.ModelVersion, dtypes: Sequence[Any], n: int = 1) -> list[np.ndarray]:
    """An n-sample input of zeros for each of the model's inputs."""
    inputs = []
    for spec, dtype in zip(mv.inputs, dtypes, strict=False):
        shape = [n] + [d if d > 0 else 1 for d in list(spec.shape)[1:]]
        inputs.append(np.zeros(shape, dtype=dtype))
    return inputs


async def warm_up(config: WorkerConfig, mv: model_pb2.ModelVersion, opened: Opened) -> None:
    """Every instance, every warm-up size: each session keeps its own per-shape state (cuDNN's algorithm
    choices), which the first calls would otherwise pay for."""
    first = opened.first
    sizes = warmup_sizes(config, first.provider, mv, first.sizes)
    runners = opened.runners()
    t0 = time.perf_counter()
    for run in runners:
        for n in sizes:
            await asyncio.to_thread(run, zeros(mv, first.input_dtypes, n))
    logger.info(
        "warmed up %s v%d: batch sizes %s on %d instance(s) in %.2fs",
        mv.name,
        mv.version,
        sizes if len(sizes) < 4 else f"{sizes[0]}..{sizes[-1]}",
        len(runners),
        time.perf_counter() - t0,
    )
