"""Every entry of ONNX Runtime's C API table that the worker's native code calls (worker/native/ort_api.h)
is the function it is believed to be, proven against the real libonnxruntime by behaviour distinctive to
that function; the library's version is checked at start and pyproject.toml pins the release checked.

worker/native/ort_probe.cc calls the entries as ort_loop.cc does and prints what it saw; each proof here
compares that with ONNX Runtime's Python API on the same models, or with what only that function does.
The two fake libraries in the version tests are fault injection: real ONNX Runtime has one version.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from fovea.native import binding_path, build_folder
from worker.fast_port import MODULE, PART, ort_library

ROOT = pathlib.Path(__file__).parents[2]
NATIVE = ROOT / "worker" / "native"
BUILD = build_folder()
PROBE = NATIVE / BUILD / "ort_probe"
BIG_FLOATS = 32 * 1024 * 1024  # the arena proof's intermediate: 128 MB

pytestmark = pytest.mark.skipif(not PROBE.exists(), reason="worker/native/build.sh has not built ort_probe")


def checked_versions() -> dict[str, str]:
    """ort_api.h's kCpuRelease and kGpuRelease."""
    text = (NATIVE / "ort_api.h").read_text()
    found = dict(re.findall(r'k(Cpu|Gpu)Release = "([^"]+)"', text))
    assert set(found) == {"Cpu", "Gpu"}, "ort_api.h declares kCpuRelease and kGpuRelease"
    return {"cpu": found["Cpu"], "gpu": found["Gpu"]}


def header_entries() -> list[tuple[str, int]]:
    """(name, position) of each X(...) line in ort_api.h's FV_ORT_ENTRIES."""
    text = (NATIVE / "ort_api.h").read_text()
    return [(m.group(1), int(m.group(2))) for m in re.finditer(r"^\s*X\((\w+), (\d+),", text, re.M)]


def save(graph: onnx.GraphProto, path: pathlib.Path) -> pathlib.Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def run_model(path: pathlib.Path) -> pathlib.Path:
    """x FP32 [N,3,5] -> doubled = 2x (FP32), truncated = Cast(x, INT64): two outputs, two element types."""
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["x", "two"], ["doubled"]),
            helper.make_node("Cast", ["x"], ["truncated"], to=TensorProto.INT64),
        ],
        "run",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, 5])],
        [
            helper.make_tensor_value_info("doubled", TensorProto.FLOAT, [-1, 3, 5]),
            helper.make_tensor_value_info("truncated", TensorProto.INT64, [-1, 3, 5]),
        ],
        [numpy_helper.from_array(np.array(2.0, np.float32), "two")],
    )
    return save(graph, path)


def big_model(path: pathlib.Path) -> pathlib.Path:
    """x FP32 [1] -> ReduceSum(Expand(x, [BIG_FLOATS])): 128 MB that exists only during the run."""
    graph = helper.make_graph(
        [
            helper.make_node("Expand", ["x", "shape"], ["big"]),
            helper.make_node("ReduceSum", ["big"], ["s"], keepdims=0),
        ],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
        [numpy_helper.from_array(np.array([BIG_FLOATS], np.int64), "shape")],
    )
    return save(graph, path)


def weights_model(path: pathlib.Path) -> pathlib.Path:
    """A 1024x1024 FP32 MatMul: 4 MB of weights per session."""
    w = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "weights",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1024])],
        [numpy_helper.from_array(w, "w")],
    )
    return save(graph, path)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    d = tmp_path_factory.mktemp("ort_api")
    return {"run": run_model(d / "run.onnx"), "big": big_model(d / "big.onnx"), "weights": weights_model(d / "w.onnx")}


def probe_env() -> dict[str, str]:
    env = dict(os.environ)
    # The memory proofs read RSS: ASan's quarantine (scripts/sanitize.sh) would hold freed memory back.
    if env.get("ASAN_OPTIONS") is not None or "asan" in BUILD:
        env["ASAN_OPTIONS"] = env.get("ASAN_OPTIONS", "") + ":quarantine_size_mb=0:detect_leaks=0"
    return env


@pytest.fixture(scope="module")
def seen(models: dict[str, pathlib.Path]) -> dict[str, list[dict[str, Any]]]:
    """The probe's observations by proof name (a proof may be seen more than once)."""
    library = ort_library()
    assert library is not None, "the onnxruntime package ships libonnxruntime.so"
    out = subprocess.run(
        [str(PROBE), str(library), str(models["run"]), str(models["big"]), str(models["weights"])],
        capture_output=True,
        text=True,
        timeout=300,
        env=probe_env(),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    found: dict[str, list[dict[str, Any]]] = {}
    for line in out.stdout.splitlines():
        item = json.loads(line)
        found.setdefault(item.pop("proof"), []).append(item)
    assert "done" in found, out.stdout[-2000:]
    return found


def gpu_library() -> pathlib.Path:
    """onnxruntime-gpu's libonnxruntime at the pinned release (scripts/ort_gpu_library.sh fetches it; the README's
    test command runs that), or FOVEA_ORT_GPU_LIBRARY."""
    default = ROOT / ".venv" / "ort-gpu" / f"libonnxruntime.so.{checked_versions()['gpu']}"
    path = pathlib.Path(os.environ.get("FOVEA_ORT_GPU_LIBRARY", default))
    assert path.exists(), f"{path} is missing: run scripts/ort_gpu_library.sh (scripts/test.sh does)"
    return path


@functools.cache
def cuda_seen(library: str) -> dict[str, dict[str, Any]]:
    """The probe's GPU providers' observations (`ort_probe cuda LIBRARY`) on one library, by proof name."""
    out = subprocess.run([str(PROBE), "cuda", library], capture_output=True, text=True, timeout=120, env=probe_env())
    assert out.returncode == 0, out.stderr[-3000:]
    found = {item.pop("proof"): item for item in map(json.loads, out.stdout.splitlines())}
    assert "done" in found, out.stdout[-2000:]
    return found


def one(seen: dict[str, list[dict[str, Any]]], proof: str) -> dict[str, Any]:
    (item,) = seen[proof]
    return item


def python_session(path: pathlib.Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def python_error(call: Callable[[], object]) -> str:
    with pytest.raises(Exception) as info:  # noqa: PT011 - onnxruntime's own exception classes vary
        call()
    return str(info.value)


def probe_input() -> np.ndarray:
    return (np.arange(30, dtype=np.float32) * 0.5 - 3.0).reshape(2, 3, 5)


# Each entry and the proof that it is the function named: a check of the probe's observations.


def prove_status_entries(seen: dict[str, list[dict[str, Any]]], models: dict[str, pathlib.Path]) -> None:
    """CreateStatus, GetErrorCode, GetErrorMessage: a status made with code 10 and a message reads back both
    (no neighbour of these three takes or gives a code and a message so)."""
    assert one(seen, "status_round_trip") == {"code": 10, "message": "fovea probe: made by CreateStatus"}


def prove_release_status(seen: dict[str, list[dict[str, Any]]], models: dict[str, pathlib.Path]) -> None:
    """A million statuses (about 100 MB if kept) made and released: RSS grows by under 8 MB."""
    assert one(seen, "release_status")["rss_growth_kb"] < 8 * 1024


def prove_create_env(seen: dict[str, list[dict[str, Any]]], models: dict[str, pathlib.Path]) -> None:
    """The environment is ONNX Runtime's process-wide singleton: a second CreateEnv hands back the same one."""
    assert one(seen, "create_env") == {"code": 0, "non_null": True, "same_instance": True}


def prove_create_session_from_array(seen: dict[str, list[dict[str, Any]]], models: dict[str, pathlib.Path]) -> None:
    """Bytes that are no model: INVALID_PROTOBUF (7) with the message Python's InferenceSession gives for them."""
    bad = one(seen, "bad_model")
    assert bad["code"] == 7
    message = python_error(lambda: ort.InferenceSession(b"not a model at all", providers=["CPUExecutionProvider"]))
    assert "INVALID_PROTOBUF" in message and message.endswith(bad["message"]), (message, bad)


def prove_run_and_outputs(seen: dict[str, list[dict[str, Any]]], models: dict[str, pathlib.Path]) -> None:
    """Run, CreateTensorWithDataAsOrtValue, CreateCpuMemoryInfo, GetTensorTypeAndShape, GetTensorElementType,
    GetDimensionsCount, GetDimensions, GetTensorMutableData: the probe's outputs, their element types (1 FP32,
    7 INT64), ranks (3, where the neighbouring GetTensorShapeElementCount would say 30), shapes and values are
    Python's on the same model and input."""
    session = python_session(models["run"])
    names = [o.name for o in session.get_outputs()]
    want = dict(zip(names, session.run(names, {"x": probe_input()}), strict=True))
    got = {o["name"]: o for o in seen["run_output"]}
    assert set(got) == set(want) == {"doubled", "truncated"}
    types = {np.dtype(np.float32): 1, np.dtype(np.int64): 7}
    for name, array in want.items():
        assert got[name]["element_type"] == types[array.dtype]
        assert got[name]["rank"] == array.ndim == 3
        assert got[name]["dims"] == list(array.shape) == [2, 3, 5]
        assert np.array_equal(np.asarray(got[name]["values"], array.dtype).reshape(array.shape), array)


def prove_element_type_argument(seen: dict[str, list[dict[str, Any]]], models: dict[str, pathlib.Path]) -> None:
    """CreateTensorWithDataAsOrtValue takes the element type it is given (6, INT32): Run refuses that input
    with the message Python's run gives an int32 array."""
    got = one(seen, "run_wrong_type")
    message = python_error(lambda: python_session(models["run"]).run(None, {"x": np.zeros((2, 3, 5), np.int32)}))
    assert got["code"] == 2 and "tensor(int32)" in got["message"] and got["message"] in message, (got, message)


def prove_release_type_info(seen: dict[str, list[dict[str, Any]]], models: dict[str, pathlib.Path]) -> None:
    """200,000 shape infos (tens of MB if kept) made and released: RSS grows by under 4 MB."""
    assert one(seen, "release_type_info")["rss_growth_kb"] < 4 * 1024


def prove_release_value(seen: dict[str, list[dict[str, Any]]], models: dict[str, pathlib.Path]) -> None:
    """300 runs' outputs of 12.6 MB each (3.8 GB if kept), released: RSS grows by under a tenth of that."""
    got = one(seen, "release_value")
    assert got["rss_growth_kb"] * 1024 < 0.1 * got["count"] * got["bytes_each"], got


def prove_release_session(seen: dict[str, list[dict[str, Any]]], models: dict[str, pathlib.Path]) -> None:
    """40 sessions on 4 MB of weights (160 MB if kept), released: RSS grows by under a quarter of that."""
    got = one(seen, "release_session")
    assert got["rss_growth_kb"] * 1024 < 0.25 * got["count"] * got["model_bytes"], got


def prove_release_session_options(seen: dict[str, list[dict[str, Any]]], models: dict[str, pathlib.Path]) -> None:
    """CreateSessionOptions and ReleaseSessionOptions: 100,000 options (each a config map: tens of MB if
    kept) made, configured and released: RSS grows by under 4 MB. Options made by CreateSessionOptions
    carry every setting the proofs below see take effect."""
    assert one(seen, "release_session_options")["rss_growth_kb"] < 4 * 1024


GPU_PROVIDERS = {"cuda": ("CUDA", "Cuda"), "tensorrt": ("TensorRT", "TensorRT")}
"""The probe's tag of each GPU provider: (its name in ONNX Runtime's messages, in its append function's name)."""


def prove_create_options(tag: str) -> None:
    """Create*ProviderOptions: on the CPU build, refused saying that provider is not in it; on onnxruntime-gpu's
    library (no GPU needed), options are made. That library is the pinned release and has the same table."""
    name = GPU_PROVIDERS[tag][0]
    assert cuda_seen(str(ort_library()))[f"create_{tag}_options"] == {
        "code": 1,
        "message": f"{name} execution provider is not enabled in this build.",
        "made": False,
    }
    gpu = cuda_seen(str(gpu_library()))
    assert gpu["version"]["version"] == checked_versions()["gpu"]
    assert gpu[f"create_{tag}_options"] == {"code": 0, "message": "", "made": True}


def prove_update_options(tag: str) -> None:
    """Update*ProviderOptions parses its options in the provider's own library, so with no CUDA here it fails
    loading that library (naming it: each provider's is its own), where creating the options did not load it."""
    gpu = cuda_seen(str(gpu_library()))[f"update_{tag}_options"]
    assert gpu["code"] == 1
    assert "Failed to load library" in gpu["message"] and f"libonnxruntime_providers_{tag}.so" in gpu["message"]
    assert "AppendExecutionProvider" not in gpu["message"]


def prove_append(tag: str) -> None:
    """SessionOptionsAppendExecutionProvider_*_V2: its own message, naming the append that failed."""
    gpu = cuda_seen(str(gpu_library()))[f"append_{tag}"]
    assert gpu["code"] == 1
    function = GPU_PROVIDERS[tag][1]
    assert gpu["message"].startswith(
        f"OrtSessionOptionsAppendExecutionProvider_{function}: Failed to load shared library"
    )


def prove_release_options(tag: str) -> None:
    """Release*ProviderOptions: 1,000,000 options made and released grow RSS by under 4 MB, where 200,000 kept
    grow it by more than 10 MB."""
    gpu = cuda_seen(str(gpu_library()))[f"release_{tag}_options"]
    assert gpu["kept_growth_kb"] > 10 * 1024 and gpu["rss_growth_kb"] < 4 * 1024, gpu


def on_provider(prove: Callable[[str], None], tag: str) -> Callable[..., None]:
    return lambda seen, models: prove(tag)


def prove_optimization_level(seen: dict[str, list[dict[str, Any]]], models: dict[str, pathlib.Path]) -> None:
    """SetSessionGraphOptimizationLevel: level 7 is refused by name; level 0 (ORT_DISABLE_ALL) is taken."""
    assert one(seen, "option_refusals")["optimization_level_7"] == "2 graph_optimization_level is not valid"
    assert one(seen, "optimization_level_0")["code"] == 0


def prove_config_entry(seen: dict[str, list[dict[str, Any]]], models: dict[str, pathlib.Path]) -> None:
    """AddSessionConfigEntry: an empty key is refused with the message Python's add_session_config_entry
    gives; a known key is taken."""
    refusals = one(seen, "option_refusals")
    message = python_error(lambda: ort.SessionOptions().add_session_config_entry("", "1"))
    code, _, text = refusals["config_empty_key"].partition(" ")
    assert code == "2" and text.startswith("Config key is empty") and text in message, (refusals, message)
    assert refusals["config_good_key"] == "0 "


def prove_thread_counts(seen: dict[str, list[dict[str, Any]]], models: dict[str, pathlib.Path]) -> None:
    """SetIntraOpNumThreads: 4 intra-op threads start 3 threads with the session (the caller's is the
    fourth), 1 starts none; SetInterOpNumThreads at 4 starts none in sequential execution, so the two
    entries are not each other."""
    assert one(seen, "threads_started") == {"intra_1_inter_1": 0, "intra_4_inter_1": 3, "intra_1_inter_4": 0}


def prove_arena(seen: dict[str, list[dict[str, Any]]], models: dict[str, pathlib.Path]) -> None:
    """DisableCpuMemArena: a run's 128 MB intermediate goes back once the run ends; EnableCpuMemArena,
    called after Disable, turns the arena back on and the arena keeps it."""
    got = one(seen, "arena")
    assert got["no_arena_sum"] == got["arena_sum"] == BIG_FLOATS  # the model ran: Expand of 1.0, summed
    assert got["no_arena_kept_kb"] < 16 * 1024, got
    assert got["arena_kept_kb"] > 100 * 1024, got


PROOFS: dict[str, Callable[[dict[str, list[dict[str, Any]]], dict[str, pathlib.Path]], None]] = {
    "CreateStatus": prove_status_entries,
    "GetErrorCode": prove_status_entries,
    "GetErrorMessage": prove_status_entries,
    "CreateEnv": prove_create_env,
    "CreateSessionFromArray": prove_create_session_from_array,
    "Run": prove_run_and_outputs,
    "CreateSessionOptions": prove_release_session_options,
    "EnableCpuMemArena": prove_arena,
    "DisableCpuMemArena": prove_arena,
    "SetSessionGraphOptimizationLevel": prove_optimization_level,
    "SetIntraOpNumThreads": prove_thread_counts,
    "SetInterOpNumThreads": prove_thread_counts,
    "CreateTensorWithDataAsOrtValue": prove_element_type_argument,
    "GetTensorMutableData": prove_run_and_outputs,
    "GetTensorElementType": prove_run_and_outputs,
    "GetDimensionsCount": prove_run_and_outputs,
    "GetDimensions": prove_run_and_outputs,
    "GetTensorTypeAndShape": prove_run_and_outputs,
    "CreateCpuMemoryInfo": prove_run_and_outputs,
    "ReleaseStatus": prove_release_status,
    "ReleaseSession": prove_release_session,
    "ReleaseValue": prove_release_value,
    "ReleaseTensorTypeAndShapeInfo": prove_release_type_info,
    "ReleaseSessionOptions": prove_release_session_options,
    "AddSessionConfigEntry": prove_config_entry,
    "CreateCUDAProviderOptions": on_provider(prove_create_options, "cuda"),
    "UpdateCUDAProviderOptions": on_provider(prove_update_options, "cuda"),
    "SessionOptionsAppendExecutionProvider_CUDA_V2": on_provider(prove_append, "cuda"),
    "ReleaseCUDAProviderOptions": on_provider(prove_release_options, "cuda"),
    "CreateTensorRTProviderOptions": on_provider(prove_create_options, "tensorrt"),
    "UpdateTensorRTProviderOptions": on_provider(prove_update_options, "tensorrt"),
    "SessionOptionsAppendExecutionProvider_TensorRT_V2": on_provider(prove_append, "tensorrt"),
    "ReleaseTensorRTProviderOptions": on_provider(prove_release_options, "tensorrt"),
}


def test_every_entry_in_the_table_has_a_proof(seen: dict[str, list[dict[str, Any]]]) -> None:
    """The header's table, the probe's copy of it and the proofs here name the same entries."""
    table = [tuple(e) for e in one(seen, "table")["entries"]]
    assert table == header_entries()
    assert {name for name, _ in table} == set(PROOFS)
    assert len({position for _, position in table}) == len(table)


@pytest.mark.parametrize("entry", sorted(PROOFS))
def test_entry_is_the_function_named(
    entry: str, seen: dict[str, list[dict[str, Any]]], models: dict[str, pathlib.Path]
) -> None:
    PROOFS[entry](seen, models)


def test_the_library_is_a_release_checked_and_pyproject_pins_them(seen: dict[str, list[dict[str, Any]]]) -> None:
    """The proofs above ran on the installed release, which must be one of those the table names; the
    extras pin exactly those. (Run this file with each pinned release installed to check it.)"""
    versions = checked_versions()
    version = one(seen, "version")
    assert version["checked"] == f"{versions['cpu']}, {versions['gpu']}"
    assert version["version"] == ort.__version__ and ort.__version__ in versions.values()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["cpu"] == [f"onnxruntime=={versions['cpu']}"]
    assert extras["gpu"] == [f"onnxruntime-gpu=={versions['gpu']}"]


FAKE = """
#include <stdint.h>
#include <stddef.h>
static const void* get_api(uint32_t v) { (void)v; return NULL; }
static const char* version(void) { return VERSION; }
static const struct { const void* (*get_api)(uint32_t); const char* (*version)(void); } base = {get_api, version};
const void* OrtGetApiBase(void) { return &base; }
"""

INIT = """
import sys
from worker.fast_port import binding
ffi, lib = binding()
err = ffi.new("char[]", 512)
rc = lib.fv_ort_init(sys.argv[1].encode(), err, 512)
print(rc, repr(ffi.string(lib.fv_ort_version()).decode()), ffi.string(err).decode())
"""


def fv_ort_init(library: pathlib.Path) -> str:
    """fv_ort_init on library in a fresh process (it opens ONNX Runtime once per process)."""
    out = subprocess.run(
        [sys.executable, "-c", INIT, str(library)], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def fake_library(tmp_path: pathlib.Path, version: str) -> pathlib.Path:
    """Fault injection: a library whose OrtGetApiBase says `version` and offers no API table."""
    src, lib = tmp_path / f"fake-{version}.c", tmp_path / f"libfake-{version}.so"
    src.write_text(FAKE)
    subprocess.run(["gcc", "-shared", "-fPIC", f'-DVERSION="{version}"', "-o", str(lib), str(src)], check=True)
    return lib


@pytest.mark.skipif(not binding_path(PART, MODULE).exists(), reason="scripts/native.sh has not built the binding")
def test_another_release_is_refused_at_start_naming_the_versions(tmp_path: pathlib.Path) -> None:
    versions = checked_versions()
    got = fv_ort_init(fake_library(tmp_path, "1.31.9"))
    assert got.startswith("-1 '' ")
    checked = f"{versions['cpu']}, {versions['gpu']}"
    assert f"is ONNX Runtime 1.31.9; the native part's C API table was checked against {checked} only" in got
    assert f"onnxruntime=={versions['cpu']} or onnxruntime-gpu=={versions['gpu']}" in got
    # A checked release passes the version check (and this fake then fails on its missing table).
    for version in versions.values():
        assert "does not offer ONNX Runtime's C API version 16" in fv_ort_init(fake_library(tmp_path, version))
    library = ort_library()
    assert library is not None
    assert fv_ort_init(library) == f"0 '{ort.__version__}'"


START = """
import asyncio, pathlib, sys
import worker.fast_port
from worker.config import WorkerConfig
from worker.server import build_server

worker.fast_port.ort_library = lambda: pathlib.Path(sys.argv[1])  # fault injection: the fake library
try:
    asyncio.run(build_server(WorkerConfig(port=0, models="m", registry_address="127.0.0.1:9")))
except RuntimeError as exc:
    print(exc)
else:
    print("started")
"""


def test_a_worker_on_another_release_refuses_to_start(tmp_path: pathlib.Path) -> None:
    """The refusal reaches the service: a worker whose ONNX Runtime is not a checked release does not start
    (no silent Python batch loop instead). In a fresh process, since the library is opened once per process."""
    out = subprocess.run(
        [sys.executable, "-c", START, str(fake_library(tmp_path, "1.31.9"))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "the worker cannot run models on ONNX Runtime's C API" in out.stdout, out.stdout + out.stderr[-2000:]
    assert "is ONNX Runtime 1.31.9" in out.stdout
