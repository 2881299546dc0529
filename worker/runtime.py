"""ONNX Runtime sessions: provider choice, options, and an honest report of what was really used."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from fovea.errors import ModelNotReady
from fovea.oip import ORT_TO_NUMPY
from worker.config import WorkerConfig
from worker.fast_port import NativeOptions

logger = logging.getLogger(__name__)

OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


class ProviderFallback(ModelNotReady):
    """A GPU was required but ONNX Runtime could only give the CPU."""


def provider_list(config: WorkerConfig) -> list[Any]:
    available = set(ort.get_available_providers())
    out: list[Any] = []
    for name in config.providers:
        if name not in available:
            logger.warning("execution provider %s is not in this onnxruntime build; skipping", name)
            continue
        if name in GPU_PROVIDERS:
            out.append((name, gpu_options(config, name)))
        elif name in config.provider_options:
            out.append((name, dict(config.provider_options[name])))
        else:
            out.append(name)
    return out or ["CPUExecutionProvider"]


def gpu_options(config: WorkerConfig, name: str) -> dict[str, str]:
    """A GPU provider's options (CUDAExecutionProvider's or TensorrtExecutionProvider's) as ONNX Runtime names
    them, the user's provider_options on top, as text: for Python's sessions and the C++ loop's."""
    opts: dict[str, Any] = {"device_id": config.device_id}
    if name == "CUDAExecutionProvider":
        opts["cudnn_conv_use_max_workspace"] = "1" if config.cudnn_max_workspace else "0"
        opts["cudnn_conv_algo_search"] = config.cudnn_conv_algo_search
        if config.gpu_mem_limit_bytes:
            opts["gpu_mem_limit"] = config.gpu_mem_limit_bytes
    elif name == "TensorrtExecutionProvider":
        opts["trt_fp16_enable"] = config.trt_fp16
        if config.trt_cache_dir:
            opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=config.trt_cache_dir)
        if config.trt_max_workspace_bytes:
            opts["trt_max_workspace_size"] = config.trt_max_workspace_bytes
    # ONNX Runtime reads booleans as True/False, 1/0 or true/false: str() of Python's gives the first
    return {k: str(v) for k, v in {**opts, **config.provider_options.get(name, {})}.items()}


def native_providers(config: WorkerConfig) -> list[tuple[str, dict[str, str]]]:
    """The GPU providers, with their options, that the C++ loop appends to a session: those of config.providers
    this onnxruntime build has, in order, up to the CPU (ONNX Runtime puts its CPU provider after them)."""
    built = set(ort.get_available_providers())
    out = []
    for name in config.providers:
        if name == "CPUExecutionProvider":
            break
        if name in built and name in GPU_PROVIDERS:
            out.append((name, gpu_options(config, name)))
    return out


def session_options(config: WorkerConfig) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = config.intra_op_threads
    so.inter_op_num_threads = config.inter_op_threads
    so.graph_optimization_level = OPT_LEVELS.get(config.graph_optimization, OPT_LEVELS["all"])
    so.enable_cpu_mem_arena = config.cpu_mem_arena
    so.log_severity_level = 3
    # Spinning pool threads take CPU from the event loop that feeds them when cores are few.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if config.thread_spinning else "0")
    so.add_session_config_entry("session.force_spinning_stop", "1" if config.spin_only_in_run else "0")
    return so


def native_options(config: WorkerConfig, sizes: list[int] | None = None) -> NativeOptions:
    """session_options' settings, and provider_list's providers, for a session opened through the C API (the
    fast port's C++ loop), with a session per batch size in sizes."""
    return NativeOptions(
        providers=native_providers(config),
        sizes=list(sizes or []),
        intra_op_threads=config.intra_op_threads,
        inter_op_threads=config.inter_op_threads,
        optimization_level=int(OPT_LEVELS.get(config.graph_optimization, OPT_LEVELS["all"])),
        cpu_mem_arena=config.cpu_mem_arena,
        entries={
            "session.intra_op.allow_spinning": "1" if config.thread_spinning else "0",
            "session.force_spinning_stop": "1" if config.spin_only_in_run else "0",
        },
    )


@dataclass
class Session:
    """One loaded ONNX Runtime session and the provider it really got."""

    session: ort.InferenceSession
    provider: str
    input_names: list[str]
    input_dtypes: list[Any]
    output_names: list[str]
    device_id: int = 0
    bind: bool = False
    """Run through I/O binding (only ever true on the CUDA provider)."""
    dynamic_batch: bool = True
    """Every input's and output's first axis is free in the model: a batch axis, safe to pad and cut back."""
    sizes: list[int] = field(default_factory=list)
    """Batch sizes with a session each (Bucketed); empty here: one session runs every size."""

    def size_for(self, n: int) -> int:
        """The batch size a batch of n samples runs at."""
        return n

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self.bind:
            return self.run_bound(inputs)
        return self.session.run(self.output_names, inputs)

    def run_bound(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """I/O binding on CUDA: inputs go host->device once, outputs stay on the device until one copy back.

        Without it, ONNX Runtime stages every input and output through extra host buffers.
        """
        binding = self.session.io_binding()
        for name, array in inputs.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in self.output_names:
            binding.bind_output(name, "cuda", self.device_id)
        self.session.run_with_iobinding(binding)
        return list(binding.copy_outputs_to_cpu())


def load_session(model_bytes: bytes, config: WorkerConfig) -> Session:
    wanted = provider_list(config)
    session = ort.InferenceSession(model_bytes, sess_options=session_options(config), providers=wanted)
    got = session.get_providers()
    provider = got[0]
    asked_gpu = [p for p in config.providers if p in GPU_PROVIDERS]
    built_gpu = [p for p in asked_gpu if p in ort.get_available_providers()]
    if config.require_gpu and provider not in GPU_PROVIDERS:
        raise ProviderFallback(f"require_gpu is set but ONNX Runtime gave {got} (asked for {config.providers})")
    if built_gpu and provider not in GPU_PROVIDERS:
        # ONNX Runtime falls back to the CPU silently when CUDA libraries are missing.
        message = f"asked for {built_gpu} but ONNX Runtime gave {got}: running on the CPU"
        logger.error("UNEXPECTED CPU FALLBACK: %s", message)
    return Session(
        session=session,
        provider=provider,
        input_names=[i.name for i in session.get_inputs()],
        input_dtypes=[ORT_TO_NUMPY.get(i.type, np.float32) for i in session.get_inputs()],
        output_names=[o.name for o in session.get_outputs()],
        device_id=config.device_id,
        bind=config.io_binding and provider == "CUDAExecutionProvider",
        dynamic_batch=all(
            t.shape and not isinstance(t.shape[0], int) for t in [*session.get_inputs(), *session.get_outputs()]
        ),
    )


def bucket_sizes(config: WorkerConfig, provider: str) -> list[int]:
    """Batch sizes that get a session each (WorkerConfig.pad_batches); [] for one session of any size."""
    if config.pad_batches == "never" or (config.pad_batches == "gpu" and provider not in GPU_PROVIDERS):
        return []
    top = config.max_batch_size
    sizes = config.batch_buckets or [1 << i for i in range(top.bit_length())]
    return sorted({n for n in sizes if 1 <= n < top} | {top})


def pad(array: np.ndarray, size: int) -> np.ndarray:
    out = np.empty((size, *array.shape[1:]), array.dtype)
    out[: len(array)] = array
    out[len(array) :] = 0
    return out


@dataclass
class Bucketed:
    """One session per batch size; a batch is padded up to the next size and its outputs cut back.

    Each session then always sees one input shape, so the CUDA provider never re-plans its convolutions.
    """

    sessions: dict[int, Session]
    """By batch size, ascending."""

    def __post_init__(self) -> None:
        first = next(iter(self.sessions.values()))
        self.sizes = list(self.sessions)
        self.provider, self.input_names, self.input_dtypes = first.provider, first.input_names, first.input_dtypes
        self.output_names = first.output_names

    def size_for(self, n: int) -> int:
        return next((s for s in self.sizes if s >= n), self.sizes[-1])

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        n = len(next(iter(inputs.values())))
        size = self.size_for(n)
        if size <= n:
            return self.sessions[size].run(inputs)
        outputs = self.sessions[size].run({k: pad(v, size) for k, v in inputs.items()})
        return [o[:n] for o in outputs]


def buckets_for(config: WorkerConfig, provider: str, first: Session) -> list[int]:
    """The batch sizes a model gets a session each on provider (see bucket_sizes), or [] for one session: also
    where the model's batch axis is not free on every input and output, so a padded batch could not be cut back."""
    sizes = bucket_sizes(config, provider)
    if len(sizes) > 1 and not first.dynamic_batch:
        inputs = first.session.get_inputs()
        if inputs and inputs[0].shape and not isinstance(inputs[0].shape[0], int):
            logger.warning(
                "not padding batches: an output's first axis is fixed, so it is not per sample; "
                "batch sizes that change from run to run will be slow on %s",
                provider,
            )
        return []
    return sizes if len(sizes) > 1 else []


def load_model(model_bytes: bytes, config: WorkerConfig) -> Session | Bucketed:
    """A session, or one per batch size where pad_batches applies to the provider ONNX Runtime gave."""
    first = load_session(model_bytes, config)
    sizes = buckets_for(config, first.provider, first)
    if not sizes:
        return first
    sessions = {sizes[-1]: first}
    for size in sizes[:-1]:
        sessions[size] = load_session(model_bytes, config)
    return Bucketed(dict(sorted(sessions.items())))


@functools.lru_cache(maxsize=8)
def device_info(provider: str, device_id: int) -> tuple[str, str, int]:
    """(kind, name, memory bytes) of the device a provider runs on; cached, since heartbeats ask every second."""
    if provider in GPU_PROVIDERS:
        try:
            import subprocess

            out = (
                subprocess.run(
                    [
                        "nvidia-smi",
                        f"--id={device_id}",
                        "--query-gpu=name,memory.total",
                        "--format=csv,noheader,nounits",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=5,
                    check=True,
                )
                .stdout.strip()
                .split(", ")
            )
            return "GPU", out[0], int(float(out[1]) * 1024 * 1024)
        except Exception:  # noqa: BLE001 - report what we know
            return "GPU", f"cuda:{device_id}", 0
    import platform

    return "CPU", platform.processor() or platform.machine(), 0
