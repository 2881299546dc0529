"""ONNX Runtime sessions: provider choice, options, and an honest report of what was really used."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort

from fovea.errors import ModelNotReady
from fovea.oip import ONNX_TO_NUMPY
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
class ModelInfo:
    """What the worker needs to know of a model before its C++ sessions open: the provider they run on, the
    input and output names and types, whether the batch axis is free, and the batch buckets."""

    provider: str
    input_names: list[str]
    input_dtypes: list[Any]
    output_names: list[str]
    dynamic_batch: bool = True
    """Every input's and output's first axis is free in the model: a batch axis, safe to pad and cut back."""
    first_input_free: bool = True
    """The first input's first axis is free (a model whose outputs are not per sample still batches)."""
    sizes: list[int] = field(default_factory=list)
    """Batch sizes with a session each (pad_batches); empty: one session runs every size."""


def describe(model: Any, provider: str) -> ModelInfo:
    """A model's input and output names and types and its batch axes, read from the file (onnx), as ONNX Runtime
    reports them, without opening a session: a model some of whose kernels only a GPU provider has (FP16
    convolutions, say) is described all the same, and no session of Python's copy of ONNX Runtime loads the CUDA
    provider's library, which serves one copy per process (the C++ loop's, libonnxruntime.so). model: the file's
    bytes, or the onnx.ModelProto they parse to."""
    import onnx

    graph = (onnx.load_model_from_string(model) if isinstance(model, bytes) else model).graph
    weights = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    outputs = list(graph.output)

    def free_first_axis(value: onnx.ValueInfoProto) -> bool:
        tensor = value.type.tensor_type
        return tensor.HasField("shape") and len(tensor.shape.dim) > 0 and not tensor.shape.dim[0].HasField("dim_value")

    return ModelInfo(
        provider=provider,
        input_names=[i.name for i in inputs],
        input_dtypes=[ONNX_TO_NUMPY.get(i.type.tensor_type.elem_type, np.float32) for i in inputs],
        output_names=[o.name for o in outputs],
        dynamic_batch=all(free_first_axis(t) for t in [*inputs, *outputs]),
        first_input_free=bool(inputs) and free_first_axis(inputs[0]),
    )


def bucket_sizes(config: WorkerConfig, provider: str) -> list[int]:
    """Batch sizes that get a session each (WorkerConfig.pad_batches); [] for one session of any size."""
    if config.pad_batches == "never" or (config.pad_batches == "gpu" and provider not in GPU_PROVIDERS):
        return []
    top = config.max_batch_size
    sizes = config.batch_buckets or [1 << i for i in range(top.bit_length())]
    return sorted({n for n in sizes if 1 <= n < top} | {top})


def buckets_for(config: WorkerConfig, info: ModelInfo) -> list[int]:
    """The batch sizes a model gets a session each on its provider (see bucket_sizes), or [] for one session:
    also where the model's batch axis is not free on every input and output, so a padded batch could not be cut
    back."""
    sizes = bucket_sizes(config, info.provider)
    if len(sizes) > 1 and not info.dynamic_batch:
        if info.first_input_free:
            logger.warning(
                "not padding batches: an output's first axis is fixed, so it is not per sample; "
                "batch sizes that change from run to run will be slow on %s",
                info.provider,
            )
        return []
    return sizes if len(sizes) > 1 else []


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
