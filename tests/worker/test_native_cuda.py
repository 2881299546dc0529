"""The C++ batch loop's sessions on the GPU providers, CUDA and TensorRT (worker/native/ort_loop.cc), as far as a
machine without a GPU can take them: the spec's limits, the CPU build's refusal, and onnxruntime-gpu's library
(the release pyproject.toml pins, fetched by scripts/ort_gpu_library.sh) loading each provider with the worker's
options, which fails here only for want of CUDA's own libraries. bench/worker/gpu_check.py runs the rest on a GPU.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.worker.slowmodels import busy_model
from tests.worker.test_ort_api import gpu_library
from worker.config import WorkerConfig
from worker.fast_port import NativeFront, NativeOptions, NativeSession
from worker.loading import provider_for
from worker.runtime import ProviderFallback, gpu_options, native_options, native_providers

ROOT = pathlib.Path(__file__).parents[2]


@pytest.fixture
def front() -> Iterator[NativeFront]:
    f = NativeFront("127.0.0.1:0", 1 << 20, ["t"], 1000, "unix:/nonexistent/python.sock")
    assert f.ort_unavailable() == ""
    try:
        yield f
    finally:
        f.shutdown(1)
        f.close()


def session(front: NativeFront, options: NativeOptions) -> NativeSession:
    return NativeSession(front, busy_model(), options, [("input", "FP32")], ["output"])


def on(*providers: str, **changes: object) -> NativeOptions:
    """The worker's options for a session on these providers, as a GPU build would give them, batch buckets 1, 2, 4."""
    config = WorkerConfig(**changes)  # type: ignore[arg-type]
    return NativeOptions(
        **{**vars(native_options(config, [1, 2, 4])), "providers": [(p, gpu_options(config, p)) for p in providers]}
    )


def test_the_spec_is_checked_before_onnx_runtime_sees_it(front: NativeFront) -> None:
    cpu = native_options(WorkerConfig())
    for options, why in [
        (NativeOptions(**{**vars(cpu), "providers": [("CPUExecutionProvider", {})]}), "not CPUExecutionProvider"),
        (NativeOptions(**{**vars(cpu), "providers": [("DmlExecutionProvider", {})]}), "not DmlExecutionProvider"),
        (on("TensorrtExecutionProvider", "CUDAExecutionProvider", "CUDAExecutionProvider"), "out of the fast port"),
        (NativeOptions(**{**vars(cpu), "sizes": [4, 2]}), "ascending"),
        (NativeOptions(**{**vars(cpu), "sizes": [0, 2]}), "at least 1"),
        (NativeOptions(**{**vars(cpu), "sizes": list(range(1, 40))}), "out of the fast port's limits"),
    ]:
        with pytest.raises(RuntimeError, match=why):
            session(front, options)
    assert session(front, cpu).sizes == []


def test_the_cpu_build_refuses_a_gpu_session_saying_why(front: NativeFront) -> None:
    with pytest.raises(RuntimeError, match=r"the CUDA provider: CUDA execution provider is not enabled in this build"):
        session(front, on("CUDAExecutionProvider"))
    with pytest.raises(RuntimeError, match=r"the TensorRT provider: TensorRT execution provider is not enabled in"):
        session(front, on("TensorrtExecutionProvider", "CUDAExecutionProvider"))


def test_the_worker_options_reach_the_providers() -> None:
    """gpu_options as ONNX Runtime takes them: text, the user's provider_options on top; the C++ loop's providers
    are those of config.providers this build has, up to the CPU."""
    config = WorkerConfig(
        device_id=1,
        cudnn_conv_algo_search="HEURISTIC",
        trt_cache_dir="/tmp/engines",
        provider_options={"CUDAExecutionProvider": {"arena_extend_strategy": "kSameAsRequested"}},
    )
    assert gpu_options(config, "CUDAExecutionProvider") == {
        "device_id": "1",
        "cudnn_conv_use_max_workspace": "1",
        "cudnn_conv_algo_search": "HEURISTIC",
        "arena_extend_strategy": "kSameAsRequested",
    }
    assert gpu_options(config, "TensorrtExecutionProvider") == {
        "device_id": "1",
        "trt_fp16_enable": "False",
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": "/tmp/engines",
    }
    both = config.model_copy(update={"providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]})
    assert native_providers(both) == []  # this build has no CUDA


def test_a_worker_asking_for_cuda_on_the_cpu_build_runs_on_the_cpu() -> None:
    config = WorkerConfig(providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert provider_for(config) == "CPUExecutionProvider"
    with pytest.raises(ProviderFallback, match="require_gpu"):
        provider_for(config.model_copy(update={"require_gpu": True}))


CUDA_SESSION = """
import sys
from tests.worker.test_native_cuda import on, session
from worker.fast_port import ERROR_CAP, NativeFront, error_text
front = NativeFront("127.0.0.1:0", 1 << 20, ["t"], 1000, "unix:/nonexistent/python.sock")
err = front.ffi.new("char[]", ERROR_CAP)
assert front.lib.fv_ort_init(sys.argv[1].encode(), err, ERROR_CAP) == 0, error_text(front.ffi, err)
front._ort = ""
try:
    session(front, on(*sys.argv[2:]))
except RuntimeError as exc:
    print(exc)
front.shutdown(1)
front.close()
"""


@pytest.mark.parametrize(
    ("providers", "library"),
    [(["CUDAExecutionProvider"], "cuda"), (["TensorrtExecutionProvider", "CUDAExecutionProvider"], "tensorrt")],
)
def test_onnxruntime_gpu_loads_the_provider_for_a_cpp_session(providers: list[str], library: str) -> None:
    """On onnxruntime-gpu's library (in a process of its own: the library is opened once per process), the
    session's options are handed to the first provider's library, which ONNX Runtime loads from beside itself;
    here that fails for want of CUDA, and the refusal says so."""
    out = subprocess.run(
        [sys.executable, "-c", CUDA_SESSION, str(gpu_library()), *providers],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    message = out.stdout.strip()
    name = {"cuda": "CUDA", "tensorrt": "TensorRT"}[library]
    assert message.startswith(f"ONNX Runtime's C API could not open the model: the {name} provider: "), message
    assert "Failed to load library" in message and f"libonnxruntime_providers_{library}.so" in message, message


def test_the_resnet50_sized_model_for_the_gpu_check_is_resnet50s_size_and_runs(tmp_path: pathlib.Path) -> None:
    """bench/gpu/resnet50_onnx.py, which a lent GPU machine runs to make acceptance 4's second model: ResNet-50's
    25.5 million parameters, a free batch axis, finite outputs."""
    import numpy as np
    import onnxruntime as ort

    out = tmp_path / "resnet50.onnx"
    subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu" / "resnet50_onnx.py"), str(out)], check=True, timeout=120
    )
    import onnx

    model = onnx.load(str(out))
    params = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    assert 25.4e6 < params < 25.7e6, params
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"input": np.random.default_rng(0).standard_normal((2, 3, 224, 224), np.float32)})
    assert y.shape == (2, 1000) and np.isfinite(y).all()
