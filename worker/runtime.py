"""ONNX Runtime sessions: provider choice, options, and an honest report of what was really used."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnxruntime as ort

from worker.config import WorkerConfig

logger = logging.getLogger(__name__)

OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")

ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


class ProviderFallback(RuntimeError):
    pass


def provider_list(config: WorkerConfig) -> list[Any]:
    available = set(ort.get_available_providers())
    out: list[Any] = []
    for name in config.providers:
        if name not in available:
            logger.warning("execution provider %s is not in this onnxruntime build; skipping", name)
            continue
        if name == "CUDAExecutionProvider":
            opts: dict[str, Any] = {"device_id": config.device_id}
            if config.cudnn_workspace_bytes:
                opts["cudnn_conv_use_max_workspace"] = "1"
                opts["gpu_mem_limit"] = config.cudnn_workspace_bytes
            out.append((name, opts))
        elif name == "TensorrtExecutionProvider":
            opts = {"device_id": config.device_id, "trt_fp16_enable": config.trt_fp16}
            if config.trt_cache_dir:
                opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=config.trt_cache_dir)
            out.append((name, opts))
        else:
            out.append(name)
    return out or ["CPUExecutionProvider"]


def session_options(config: WorkerConfig) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = config.intra_op_threads
    so.inter_op_num_threads = config.inter_op_threads
    so.graph_optimization_level = OPT_LEVELS.get(config.graph_optimization, OPT_LEVELS["all"])
    so.enable_cpu_mem_arena = config.cpu_mem_arena
    so.log_severity_level = 3
    return so


@dataclass
class Session:
    """One loaded ONNX Runtime session and the provider it really got."""

    session: ort.InferenceSession
    provider: str
    input_names: list[str]
    input_dtypes: list[Any]
    output_names: list[str]

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(self.output_names, inputs)


def load_session(model_bytes: bytes, config: WorkerConfig) -> Session:
    wanted = provider_list(config)
    session = ort.InferenceSession(model_bytes, sess_options=session_options(config), providers=wanted)
    got = session.get_providers()
    provider = got[0]
    asked_gpu = [p if isinstance(p, str) else p[0] for p in wanted if (p if isinstance(p, str) else p[0]) in GPU_PROVIDERS]
    if asked_gpu and provider not in GPU_PROVIDERS:
        # ONNX Runtime falls back to the CPU silently when CUDA libraries are missing.
        message = f"asked for {asked_gpu} but ONNX Runtime gave {got}: running on the CPU"
        if config.require_gpu:
            raise ProviderFallback(message)
        logger.error("UNEXPECTED CPU FALLBACK: %s", message)
    return Session(
        session=session,
        provider=provider,
        input_names=[i.name for i in session.get_inputs()],
        input_dtypes=[ORT_TO_NUMPY.get(i.type, np.float32) for i in session.get_inputs()],
        output_names=[o.name for o in session.get_outputs()],
    )


def device_info(provider: str, device_id: int) -> tuple[str, str, int]:
    """(kind, name, memory bytes) of the device a provider runs on."""
    if provider in GPU_PROVIDERS:
        try:
            import subprocess

            out = subprocess.run(
                ["nvidia-smi", f"--id={device_id}", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                capture_output=True, text=True, timeout=5, check=True,
            ).stdout.strip().split(", ")
            return "GPU", out[0], int(float(out[1]) * 1024 * 1024)
        except Exception:  # noqa: BLE001 - report what we know
            return "GPU", f"cuda:{device_id}", 0
    import platform

    return "CPU", platform.processor() or platform.machine(), 0
