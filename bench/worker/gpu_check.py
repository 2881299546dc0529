"""GPU check: the CUDA provider is really used, and the worker is timed against raw ORT.

On a lent machine scripts/gpu/run_checks.sh runs it (scripts/gpu/README.md).

1. A raw session asked for CUDA must report CUDAExecutionProvider first in session.get_providers()
   (ONNX Runtime silently falls back to the CPU when CUDA libraries are missing).
2. A worker process started with FOVEA_WORKER_REQUIRE_GPU=true must report CUDAExecutionProvider in its
   heartbeat (registry ListWorkers) and in its metrics.
3. Raw ORT on CUDA (b1 latency, batch throughput, plain run and I/O binding) vs the worker over gRPC
   (c=1 latency, throughput at high concurrency from several client processes).
Writes gpu_check.json to --out and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any, TypedDict

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench" / "worker"))

import bench_worker as bw  # noqa: E402
import onnxruntime as ort  # noqa: E402

from fovea.client import RegistryClient  # noqa: E402
from fovea.cluster import Cluster  # noqa: E402
from fovea.redis_server import free_port  # noqa: E402
from fovea.v1 import model_pb2, registry_pb2  # noqa: E402

CUDA: list[str | tuple[str, dict[str, object]]] = [
    ("CUDAExecutionProvider", {"device_id": 0, "cudnn_conv_algo_search": "EXHAUSTIVE"}),
    "CPUExecutionProvider",
]


class Want(TypedDict):
    provider: str
    """The provider the session and the worker must end up on."""
    providers: list[str | tuple[str, dict[str, object]]]
    """What the raw session asks ONNX Runtime for."""
    worker_env: dict[str, str]


# --cpu-rehearsal runs every step on the CPU provider, so the script can be tried here before a GPU is lent.
WANT: Want = {
    "provider": "CUDAExecutionProvider",
    "providers": CUDA,
    "worker_env": {
        "FOVEA_WORKER_PROVIDERS": "CUDAExecutionProvider,CPUExecutionProvider",
        "FOVEA_WORKER_REQUIRE_GPU": "true",
    },
}


def model_file() -> tuple[pathlib.Path, tuple[int, ...], str]:
    eff = bw.CACHE / "efficientnet-lite0.onnx"
    if eff.exists():
        return eff, (3, 224, 224), "efficientnet-lite0"
    try:
        return bw.efficientnet_file(), (3, 224, 224), "efficientnet-lite0"
    except Exception as exc:  # noqa: BLE001 - no torch here: fall back to the model built with onnx.helper
        print(f"EfficientNet not carried and not exportable ({exc}); using the CIFAR-sized CNN", flush=True)
        return bw.cifar_file(), (3, 32, 32), "cifar-cnn"


def raw_cuda(path: pathlib.Path, shape: tuple[int, ...], seconds: float, batch: int) -> dict[str, Any]:
    session = ort.InferenceSession(str(path), providers=WANT["providers"])
    got = session.get_providers()
    out: dict[str, Any] = {"providers": got}
    if got[0] != WANT["provider"]:
        return out
    name = session.get_inputs()[0].name
    out["b1"] = bw.raw_run(session, shape, 1, seconds)
    out["batch"] = bw.raw_run(session, shape, batch, seconds)
    x = np.random.default_rng(1).standard_normal((batch, *shape)).astype(np.float32)
    times = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        binding = session.io_binding()
        binding.bind_cpu_input(name, x)
        for o in session.get_outputs():
            binding.bind_output(o.name, "cuda" if WANT["provider"] == "CUDAExecutionProvider" else "cpu", 0)
        session.run_with_iobinding(binding)
        binding.copy_outputs_to_cpu()
        times.append(time.perf_counter() - t)
    out["batch_iobinding"] = {
        "batch": batch,
        "img_s": batch * len(times) / sum(times),
        "p50_ms": 1e3 * statistics.median(times),
    }
    return out


def fast_front_loads() -> bool:
    """The worker's one port is its native front, which needs its gRPC C++ libraries (a worker that cannot load
    them refuses to start); try loading it in a child first, to say so."""
    from worker.fast_port import available

    code = "from worker.fast_port import binding; binding()"
    return available() and subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


def _client(args: tuple[str, str, bytes, int, float]) -> bw.LoadResult:
    address, token, payload, conc, seconds = args
    return asyncio.run(bw.grpc_load(address, token, payload, conc, seconds))


def perf_analyzer_side(ports: dict[str, str], name: str, token: str, conc: int) -> dict[str, Any]:
    """Triton's C++ load tool, where it runs: a Python client may be the ceiling at saturation."""
    from loadtest import perf_analyzer as pa

    try:
        pa.check()
    except pa.PerfAnalyzerMissing as exc:
        return {"error": str(exc)}
    out: dict[str, Any] = {}
    for prefix, address in reversed(ports.items()):
        for c in (1, conc):
            try:
                r = pa.run(
                    address,
                    name,
                    token,
                    concurrency=c,
                    window_ms=2000,
                    extra=("--stability-percentage", "25", "--max-trials", "6"),
                    timeout_s=90,
                )
                out[f"{prefix}pa_c{c}"] = {"infer_per_s": r.infer_per_s, "p50_ms": r.p50_us / 1e3}
            except Exception as exc:  # noqa: BLE001 - record it and go on
                out[f"{prefix}pa_c{c}"] = {"error": str(exc)[-500:]}
    return out


# Main-port load again on more workers with one setting changed. The first H200 run found the main port at
# about 70 img/s at c=128; a second, with six variants (inline compute, I/O binding, fast port, CPU pool,
# instances, uvloop), found none of them mattered: each batch took 450-700 ms of ONNX Runtime time because
# its size differed from the last one (bench/gpu/shape_change.py). pad_batches is the cure; "never" is the
# old behaviour, for a side-by-side figure.
VARIANTS = {
    "pad_batches_never": {"FOVEA_WORKER_PAD_BATCHES": "never"},
    # The third run found the fast port at 57% of raw batched, its one Python batch thread at 100% of a core
    # (host-to-device copies and waits): does a second instance, with its own thread, overlap them?
    "instances_2": {"FOVEA_WORKER_INSTANCES": "2"},
}


def start_variants(cluster: Cluster, reg_address: str, name: str, max_batch: int) -> dict[str, Any]:
    """Start every variant's worker at once (their CUDA start-ups and warm-ups overlap); wait until ready."""
    from concurrent.futures import ThreadPoolExecutor

    def one(key: str) -> tuple[Any, int]:
        metrics_port = free_port()
        settings = {
            **WANT["worker_env"],
            "FOVEA_WORKER_MAX_BATCH_SIZE": str(max_batch),
            "FOVEA_WORKER_MAX_QUEUE_LEN": "8192",
            "FOVEA_WORKER_LOG_LEVEL": "WARNING",
            "FOVEA_WORKER_METRICS_PORT": str(metrics_port),
            **VARIANTS[key],
        }
        return cluster.start_worker(reg_address, [name], name=f"variant-{key}", port=0, **settings), metrics_port

    with ThreadPoolExecutor(len(VARIANTS)) as pool:
        started = dict(zip(VARIANTS, pool.map(one, VARIANTS), strict=False))
    with RegistryClient(reg_address, cluster.admin_token, timeout_s=120) as rc:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ready = {w.address for w in rc.list_workers(name) if w.models and w.models[0].ready}
            if all(w.address in ready for w, _ in started.values()):
                break
            time.sleep(0.5)
    return started


def probed_load(
    address: str,
    token: str,
    payload: bytes,
    seconds: float,
    procs: int,
    conc: int,
    pid: int,
    metrics_port: int,
    stacks: pathlib.Path | None = None,
) -> dict[str, Any]:
    """The closed-loop load from `procs` client processes, with what the worker did meanwhile."""
    from load_probe import Probe

    try:
        with Probe(pid, metrics_port, seconds, dump=stacks is not None) as probe:
            with mp.get_context("spawn").Pool(procs) as pool:
                parts = pool.map(_client, [(address, token, payload, conc // procs, seconds)] * procs)
        if stacks is not None:
            stacks.parent.mkdir(parents=True, exist_ok=True)
            stacks.write_text(probe.stacks)
        return {
            "concurrency": conc,
            "client_procs": procs,
            "img_s": sum(p["img_s"] for p in parts),
            "p50_ms": statistics.median(p["p50_ms"] for p in parts),
            "worker": probe.summary(),
        }
    except Exception as exc:  # noqa: BLE001 - record it and go on
        return {"error": repr(exc)[:500]}


def worker_side(
    path: pathlib.Path,
    shape: tuple[int, ...],
    name: str,
    seconds: float,
    procs: int,
    conc: int,
    max_batch: int,
    logs: pathlib.Path,
    variants: bool = False,
    perf_analyzer: bool = True,
) -> dict[str, Any]:
    out: dict[str, Any] = {"native_front": fast_front_loads()}
    if not out["native_front"]:
        return {**out, "error": "the worker's native front does not load here (worker/native/build.sh)"}
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(pathlib.Path(tmp))
        try:
            reg = cluster.start_registry()
            with RegistryClient(reg.address, cluster.admin_token, timeout_s=120) as rc:
                mv = rc.register(path.read_bytes(), model_pb2.ModelVersion(name=name))
                rc.set_alias(name, "production", [(mv.version, 100)])
                metrics_port = free_port()
                worker = cluster.start_worker(
                    reg.address,
                    [name],
                    name="worker",
                    port=0,
                    **WANT["worker_env"],
                    FOVEA_WORKER_MAX_BATCH_SIZE=str(max_batch),
                    FOVEA_WORKER_MAX_QUEUE_LEN="8192",
                    FOVEA_WORKER_METRICS_PORT=str(metrics_port),
                    FOVEA_WORKER_LOG_LEVEL="WARNING",
                )
                # CUDA start-up, cuDNN's algorithm search and warm-up take a while on a fresh machine.
                deadline = time.monotonic() + 90
                workers: list[registry_pb2.WorkerStatus] = []
                while time.monotonic() < deadline and not workers:
                    workers = [w for w in rc.list_workers(name) if w.models and w.models[0].ready]
                    time.sleep(0.2)
                out["ready_after_s"] = round(90 - (deadline - time.monotonic()), 1)
                if not workers:
                    raise RuntimeError("the worker had no ready model version after 90 s (see its log)")
                out["heartbeat_providers"] = [m.provider for w in workers for m in w.models]
                out["heartbeat_device"] = [f"{w.device.kind} {w.device.name}" for w in workers]
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
            out["metrics_provider_lines"] = [ln for ln in text.splitlines() if ln.startswith("fovea_worker_provider{")]
            out["metrics_gpu_memory"] = [ln for ln in text.splitlines() if ln.startswith("fovea_worker_gpu_memory")]
            payload = bw.request_bytes(name, shape)
            ports = {"": worker.address}
            started = start_variants(cluster, reg.address, name, max_batch) if variants else {}
            for prefix, address in ports.items():
                out[prefix + "c1"] = _client((address, cluster.worker_call_token, payload, 1, seconds))
                out[prefix + "load"] = probed_load(
                    address,
                    cluster.worker_call_token,
                    payload,
                    seconds,
                    procs,
                    conc,
                    worker.proc.pid,
                    metrics_port,
                    logs / f"stacks-{prefix or 'main_'}load.txt",
                )
            if perf_analyzer:
                out["perf_analyzer"] = perf_analyzer_side(ports, name, cluster.worker_call_token, conc)
            out["main_port_variants"] = {}
            for key, (variant, variant_metrics) in started.items():
                out["main_port_variants"][key] = {
                    "env": VARIANTS[key],
                    **probed_load(
                        variant.address,
                        cluster.worker_call_token,
                        payload,
                        seconds,
                        procs,
                        conc,
                        variant.proc.pid,
                        variant_metrics,
                        logs / f"stacks-variant-{key}.txt",
                    ),
                }
                variant.stop()
        finally:
            cluster.stop()
            logs.mkdir(parents=True, exist_ok=True)
            for log in pathlib.Path(tmp).glob("*.log"):
                (logs / f"service-{log.name}").write_bytes(log.read_bytes()[-200_000:])
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="/tmp/gpu-check")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--client-procs", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=128)
    parser.add_argument("--model-file", default="", help="another ONNX model (input 'input', FP32) instead")
    parser.add_argument("--input-shape", default="3,224,224", help="its input shape without the batch axis")
    parser.add_argument(
        "--main-port-variants",
        action="store_true",
        help="also load the main port of workers with one setting changed (VARIANTS)",
    )
    parser.add_argument("--no-perf-analyzer", action="store_true", help="skip perf_analyzer's runs")
    parser.add_argument("--cpu-rehearsal", action="store_true", help="use the CPU provider (to try the script)")
    args = parser.parse_args()
    if args.cpu_rehearsal:
        WANT.update(
            {
                "provider": "CPUExecutionProvider",
                "providers": ["CPUExecutionProvider"],
                "worker_env": {"FOVEA_WORKER_PROVIDERS": "CPUExecutionProvider"},
            }
        )
    if args.model_file:
        path = pathlib.Path(args.model_file)
        shape, name = tuple(int(d) for d in args.input_shape.split(",")), path.stem
    else:
        path, shape, name = model_file()
    result: dict[str, Any] = {
        "model": name,
        "onnxruntime": ort.__version__,
        "available_providers": ort.get_available_providers(),
    }
    result["raw"] = raw_cuda(path, shape, args.seconds, args.batch)
    ok_raw = result["raw"]["providers"][0] == WANT["provider"]
    if ok_raw:
        try:
            result["worker"] = worker_side(
                path,
                shape,
                name,
                args.seconds,
                args.client_procs,
                args.concurrency,
                args.batch,
                pathlib.Path(args.out),
                args.main_port_variants,
                not args.no_perf_analyzer,
            )
        except Exception as exc:  # noqa: BLE001 - keep the raw figures and say what broke
            result["worker_error"] = repr(exc)
            print(f"worker side failed: {exc!r}", flush=True)
    w = result.get("worker", {})
    ok_worker = bool(w.get("heartbeat_providers")) and all(p == WANT["provider"] for p in w["heartbeat_providers"])
    result["status"] = "ok" if ok_raw and ok_worker else "cuda-not-used"
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: result[k] for k in ("model", "onnxruntime", "status")}))
    print(f"raw session providers: {result['raw']['providers']}")
    if w:
        print(f"worker heartbeat providers: {w['heartbeat_providers']} on {w['heartbeat_device']}")
        print(f"worker metrics: {w['metrics_provider_lines']} {w['metrics_gpu_memory']}")
    if ok_raw and w:
        r = result["raw"]
        tag = WANT["provider"].replace("ExecutionProvider", "")
        print(f"\n{'':<34}{'p50 ms':>9}{'img/s':>10}")
        print(f"{f'raw ORT {tag} b1':<34}{r['b1']['p50_ms']:>9.2f}{r['b1']['img_s']:>10.0f}")
        print(f"{f'raw ORT {tag} b' + str(args.batch):<34}{r['batch']['p50_ms']:>9.2f}{r['batch']['img_s']:>10.0f}")
        print(
            f"{f'raw ORT {tag} b' + str(args.batch) + ' I/O binding':<34}{r['batch_iobinding']['p50_ms']:>9.2f}"
            f"{r['batch_iobinding']['img_s']:>10.0f}"
        )
        best = max(r["batch"]["img_s"], r["batch_iobinding"]["img_s"])
        for prefix, port in (("", "port"),):
            if prefix + "c1" not in w:
                print(f"worker {port}: not run ({w.get('error', 'see the JSON')})")
                continue
            c1, load = w[prefix + "c1"], w[prefix + "load"]
            print(f"{'worker ' + port + ' c1':<34}{c1['p50_ms']:>9.2f}{c1['img_s']:>10.0f}")
            print(
                f"{'worker ' + port + ' c' + str(args.concurrency) + ' (' + str(args.client_procs) + ' procs)':<34}"
                f"{load.get('p50_ms', float('nan')):>9.2f}{load.get('img_s', 0):>10.0f}"
            )
            print(
                f"  {port}: worker / raw throughput {load.get('img_s', 0) / best:.1%}; "
                f"c1 p50 - raw b1 p50 {c1['p50_ms'] - r['b1']['p50_ms']:+.2f} ms"
            )
            print(f"  {port} under load: {load.get('worker', load)}")
        for key, value in w.get("main_port_variants", {}).items():
            if "img_s" in value:
                print(
                    f"{'main port c' + str(args.concurrency) + ', ' + key:<34}{value['p50_ms']:>9.2f}"
                    f"{value['img_s']:>10.0f}"
                )
                print(f"  {value['worker']}")
                fast = value.get("fast_port", {})
                if "img_s" in fast:
                    print(
                        f"{'fast port c' + str(args.concurrency) + ', ' + key:<34}{fast['p50_ms']:>9.2f}"
                        f"{fast['img_s']:>10.0f}"
                    )
                    print(f"  {fast['worker']}")
            else:
                print(f"main port variant {key}: {value}")
        for key, value in w.get("perf_analyzer", {}).items():
            if isinstance(value, dict) and "infer_per_s" in value:
                port = "fast port" if key.startswith("fast_") else "main port"
                print(
                    f"{'perf_analyzer ' + port + ' ' + key.rsplit('_', 1)[1]:<34}{value['p50_ms']:>9.2f}"
                    f"{value['infer_per_s']:>10.0f}   ({value['infer_per_s'] / best:.1%} of raw)"
                )
            else:
                print(f"perf_analyzer {key}: {value}")
    print(f"wrote {out / 'gpu_check.json'}")
    sys.exit(0 if result["status"] == "ok" else 1)


if __name__ == "__main__":
    main()
