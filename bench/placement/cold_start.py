"""Cold-start benchmark: how long a model scaled to zero takes to answer its first call (issue #22).

A real local cluster (embedded Valkey, registry, one pool worker, gateway, as processes) serves each model
with replicas 0 and a short idle time, so that it unloads between runs. Each run waits until no worker has
the model loaded, then measures one of:

  call     the first Classify through the gateway until its answer: the gateway asks the registry for a
           replica (DemandModel), the placement leader assigns one at its next tick, the worker learns it
           from its next heartbeat answer, downloads, loads and warms the model, and the gateway, woken by
           the worker's heartbeat, sends the call
  demand   DemandModel straight to the registry (as a gateway would) until ListWorkers shows the model
           ready (polled every 20 ms): the same path without the gateway and the call itself

and reads the worker's own breakdown of the load from its log ("cold start: loaded ... (download, sessions,
warm-up)"). Models: EfficientNet-Lite0 (training.pretrained, 224x224) and the CIFAR-sized CNN of the
benchmark suite (bench/suite/models.py, 3x32x32, random weights); both are built once and cached under
--work-dir. Prints a table (medians, with min-max) and writes JSON (default
docs/bench/placement_cold_start.json) with the machine it ran on.

The idle time (5 s) is longer than a load on purpose: the placement leader counts a demanded model's idle
time from the demand, also while its replica still loads, so a shorter one can unassign the model before it
is ready when no call waits for it (the "demand" runs).

    .venv/bin/python bench/placement/cold_start.py                 # ~2 minutes on 2 cores
    .venv/bin/python bench/placement/cold_start.py --runs 9 --models cifar-cnn
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import pathlib
import platform
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.suite.models import BenchModel, cifar_cnn, effnet_fp32  # noqa: E402
from fovea.client import Client, RegistryClient  # noqa: E402
from fovea.cluster import Cluster  # noqa: E402
from fovea.v1 import model_pb2, registry_pb2  # noqa: E402

BUILDERS = {"effnet-fp32": effnet_fp32, "cifar-cnn": cifar_cnn}
IDLE_UNLOAD_S = 5.0  # unloads soon after a run, so that the next is cold; longer than a load (see below)
LOADED = re.compile(
    r"cold start: loaded (?P<model>\S+) v\d+ in (?P<total>[\d.]+) s \(download (?P<download>[\d.]+) s, "
    r"sessions (?P<sessions>[\d.]+) s, warm-up (?P<warmup>[\d.]+) s\)"
)


def photo(size: int) -> bytes:
    """scikit-image's chelsea as a JPEG, scaled so that its short side is the model's input size."""
    from PIL import Image
    from skimage import data

    image = Image.fromarray(data.chelsea())
    image = image.resize((round(image.width * size / image.height), size))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def until(what: str, check: Any, timeout_s: float, every_s: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (result := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout_s:.0f} s")
        time.sleep(every_s)
    return result


def loaded_anywhere(rc: RegistryClient, model: str) -> bool:
    return any(m.name == model for w in rc.list_workers() for m in w.models)


def worker_loads(log: pathlib.Path, model: str) -> list[dict[str, float]]:
    """Every 'cold start: loaded MODEL' line of the worker's log, in order."""
    found = []
    for m in LOADED.finditer(log.read_text(errors="replace")):
        if m.group("model") == model:
            found.append({k: float(m.group(k)) for k in ("total", "download", "sessions", "warmup")})
    return found


@dataclass
class Bench:
    """The running cluster and the clients a run needs."""

    rc: RegistryClient  # admin: register, scale, list workers
    as_gateway: RegistryClient  # DemandModel needs a gateway's token
    client: Client  # calls through the gateway
    worker_log: pathlib.Path

    def cold_start(self, model: str, image: bytes, mode: str) -> tuple[float, dict[str, float], float]:
        """One run once the model is unloaded: seconds to the answer (call) or to ready (demand), the worker's
        load breakdown, and the next (warm) call's milliseconds."""
        until(f"{model} to unload", lambda: not loaded_anywhere(self.rc, model), 120, 0.1)
        time.sleep(0.5)  # past the worker's unload and its heartbeat
        seen = len(worker_loads(self.worker_log, model))
        t0 = time.perf_counter()
        if mode == "call":
            self.client.classify([image], model=model, top_k=1)
        else:
            request = registry_pb2.DemandModelRequest(model=model)
            self.as_gateway.stub.DemandModel(request, metadata=self.as_gateway.metadata, timeout=60)
            until(f"{model} ready", lambda: self.rc.list_workers(model, ready_only=True), 120)
        cold = time.perf_counter() - t0
        t1 = time.perf_counter()
        self.client.classify([image], model=model, top_k=1)
        warm_ms = (time.perf_counter() - t1) * 1000
        loads = until("the worker's log line", lambda: worker_loads(self.worker_log, model)[seen:], 30)
        return cold, loads[0], warm_ms

    def model(self, bm: BenchModel, runs: int) -> dict[str, Any]:
        """Registers the model scaled to zero, then `runs` cold starts of each mode, alternating."""
        mv = self.rc.register(bm.path, model_pb2.ModelVersion(name=bm.name))
        self.rc.set_alias(bm.name, "production", [(mv.version, 100)])
        self.rc.scale(registry_pb2.ModelScale(model=bm.name, replicas=0, idle_unload_s=IDLE_UNLOAD_S))
        image = photo(bm.image_size)
        times: dict[str, list[float]] = {"call": [], "demand": []}
        loads: list[dict[str, float]] = []
        warm_ms: list[float] = []
        for i in range(2 * runs):
            mode = ("call", "demand")[i % 2]
            cold, load, warm = self.cold_start(bm.name, image, mode)
            times[mode].append(cold)
            loads.append(load)
            warm_ms.append(warm)
            print(f"{bm.name} run {i + 1}: {mode} {cold:.2f} s (worker load {load['total']:.2f} s)", flush=True)
        provider = next((m.provider for w in self.rc.list_workers(bm.name) for m in w.models if m.provider), "")
        return {
            "artifact_mb": round(bm.path.stat().st_size / 1e6, 2),
            "provider": provider,
            "runs": runs,
            "first_call_to_answer_s": summary(times["call"]),
            "demand_to_ready_s": summary(times["demand"]),
            "worker_load_s": {k: summary([b[k] for b in loads]) for k in ("total", "download", "sessions", "warmup")},
            "warm_call_ms": summary(warm_ms),
        }


def measure(args: argparse.Namespace, models: list[BenchModel], data_dir: pathlib.Path) -> dict[str, Any]:
    cluster = Cluster(data_dir)
    try:
        registry = cluster.start_registry()
        worker = cluster.start_worker(registry.address, name="worker", FOVEA_WORKER_UNLOAD_DELAY_S="0.2")
        gateway = cluster.start_gateway(registry.address)
        with (
            RegistryClient(registry.address, cluster.admin_token, timeout_s=60) as rc,
            RegistryClient(registry.address, cluster.gateway_token, timeout_s=60) as as_gateway,
        ):
            with Client(gateway.address, rc.create_key("infer")[1], timeout_s=120) as client:
                bench = Bench(rc, as_gateway, client, worker.log_path)
                return {bm.name: bench.model(bm, args.runs) for bm in models}
    finally:
        cluster.stop()


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def print_table(results: dict[str, Any]) -> None:
    def cell(s: dict[str, float], unit: float = 1.0, fmt: str = "{:.2f}") -> str:
        return f"{fmt.format(s['median'] * unit)} ({fmt.format(s['min'] * unit)}-{fmt.format(s['max'] * unit)})"

    head = [
        "model",
        "MB",
        "first call -> answer s",
        "demand -> ready s",
        "worker load s",
        "download",
        "sessions",
        "warm-up",
        "warm call ms",
    ]
    rows = [
        [
            name,
            f"{r['artifact_mb']:.1f}",
            cell(r["first_call_to_answer_s"]),
            cell(r["demand_to_ready_s"]),
            cell(r["worker_load_s"]["total"]),
            f"{r['worker_load_s']['download']['median']:.2f}",
            f"{r['worker_load_s']['sessions']['median']:.2f}",
            f"{r['worker_load_s']['warmup']['median']:.2f}",
            cell(r["warm_call_ms"], fmt="{:.1f}"),
        ]
        for name, r in results.items()
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    for row in [head, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)))
    print("medians, (min-max); download, sessions and warm-up are the worker's own medians")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="cold starts per model and mode")
    parser.add_argument("--models", default=",".join(BUILDERS), help=f"comma-separated: {', '.join(BUILDERS)}")
    parser.add_argument("--work-dir", default=str(ROOT / "runs" / "bench"), help="where built models are cached")
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench" / "placement_cold_start.json"))
    args = parser.parse_args()
    names = [n for n in args.models.split(",") if n]
    if not 1 <= args.runs <= 100 or not names or any(n not in BUILDERS for n in names):
        parser.error(f"--runs 1..100; --models from {', '.join(BUILDERS)}")
    models_dir = pathlib.Path(args.work_dir) / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    models = [BUILDERS[n](models_dir) for n in names]
    with tempfile.TemporaryDirectory(prefix="fovea-cold-start-") as tmp:
        results = measure(args, models, pathlib.Path(tmp))
    print_table(results)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    machine = {
        "nproc": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "load_1m_at_end": round(os.getloadavg()[0], 2),
    }
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    settings = {
        "registry": "placement_interval_s 0.5 (default)",
        "worker": "one pool worker, heartbeat_interval_s 1 and intra-op threads (all cores) by default",
        "gateway": "cold_start_wait_s 60 (default)",
        "idle_unload_s": IDLE_UNLOAD_S,
    }
    out.write_text(
        json.dumps({"machine": machine, "date": when, "settings": settings, "results": results}, indent=2) + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
