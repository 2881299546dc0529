"""A verified artifact into warmed-up sessions: one job of a version's load (worker/models.py downloads and
verifies before it, and wires the sessions to the native front after it).

The C++ batch loop's sessions (ONNX Runtime's C API, worker/native/ort_loop.cc) are a version's only ones:
Python reads the names, types and batch axes from the file (runtime.describe) and opens no session, so each
instance's weights exist once (once per batch bucket where batches are padded)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fovea.onnxfile import refuse_external_data_bytes
from fovea.v1 import model_pb2
from worker.config import WorkerConfig
from worker.fast_port import NativeFront, NativeSession
from worker.runtime import (
    GPU_PROVIDERS,
    ModelInfo,
    ProviderFallback,
    buckets_for,
    describe,
    native_options,
    native_providers,
)

logger = logging.getLogger(__name__)


@dataclass
class Opened:
    """A version's C++ sessions: one per instance, and the alone one if configured."""

    info: ModelInfo
    sessions: list[NativeSession]
    alone: NativeSession | None = None

    def all(self) -> list[NativeSession]:
        return [*self.sessions, *([self.alone] if self.alone else [])]

    def close(self) -> None:
        """Frees the sessions now (before the native front owns them)."""
        for s in self.all():
            s.close()


async def open_sessions(
    data: bytes,
    config: WorkerConfig,
    mv: model_pb2.ModelVersion,
    native: NativeFront,
    alone_threads: int,
    trim_heap: Callable[[], Awaitable[None]],
) -> Opened:
    """The sessions of config.instances instances on data (refused first if it names external-data files, which
    ONNX Runtime would read). trim_heap returns freed copies to the system between the steps. RuntimeError,
    with ONNX Runtime's reason, when they cannot be opened."""
    parsed = await asyncio.to_thread(refuse_external_data_bytes, data)
    info = await asyncio.to_thread(describe, parsed, provider_for(config))
    info.sizes = buckets_for(config, info)
    del parsed
    await trim_heap()  # the parsed copy
    if info.provider in GPU_PROVIDERS:
        alone_threads = 0  # intra-op threads do not speed up a GPU's batch
    sessions, alone = await asyncio.to_thread(open_native, native, data, config, mv, info, alone_threads)
    return Opened(info, sessions, alone)


def provider_for(config: WorkerConfig) -> str:
    """The provider a worker's sessions run on: the first GPU provider the C++ loop appends (native_providers),
    else the CPU's. ProviderFallback when require_gpu is set and that is the CPU."""
    providers = native_providers(config)
    wanted = providers[0][0] if providers else "CPUExecutionProvider"
    if config.require_gpu and wanted not in GPU_PROVIDERS:
        raise ProviderFallback(f"require_gpu is set but this onnxruntime build has none of {config.providers}")
    return wanted


def open_native(
    native: NativeFront,
    data: bytes,
    config: WorkerConfig,
    mv: model_pb2.ModelVersion,
    info: ModelInfo,
    alone_threads: int,
) -> tuple[list[NativeSession], NativeSession | None]:
    """The C API sessions of the C++ loops: one per instance, and the alone one if configured."""
    inputs = [(n, t.datatype) for n, t in zip(info.input_names, mv.inputs, strict=False)]
    made: list[NativeSession] = []
    try:
        for _ in range(max(1, config.instances)):
            made.append(NativeSession(native, data, native_options(config, info.sizes), inputs, info.output_names))
        if alone_threads:
            alone_config = config.model_copy(update={"intra_op_threads": alone_threads})
            made.append(
                NativeSession(native, data, native_options(alone_config, info.sizes), inputs, info.output_names)
            )
            return made[:-1], made[-1]
    except RuntimeError:
        for s in made:
            s.close()
        raise
    return made, None


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
    info = opened.info
    sizes = warmup_sizes(config, info.provider, mv, info.sizes)
    sessions = opened.all()
    t0 = time.perf_counter()
    for session in sessions:
        for n in sizes:
            await asyncio.to_thread(session.run, zeros(mv, info.input_dtypes, n))
    logger.info(
        "warmed up %s v%d: batch sizes %s on %d instance(s) in %.2fs",
        mv.name,
        mv.version,
        sizes if len(sizes) < 4 else f"{sizes[0]}..{sizes[-1]}",
        len(sessions),
        time.perf_counter() - t0,
    )
