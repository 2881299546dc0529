"""Issue #19's acceptance 3 (memory), side by side: a worker's peak RSS against raw in-process ONNX Runtime's on
the same models and batch sizes (bound: raw + 200 MB), and a gateway's peak RSS (bound: 200 MB).

    python bench/worker/memory.py                      # about 65 s on 2 cores -> docs/bench/worker_memory.json
    python bench/worker/memory.py --models cifar-cnn --seconds 2 --out /tmp/mem.json

Raw: a child process (this file with --raw-child; it imports only NumPy and onnxruntime) opens one
onnxruntime.InferenceSession per model with the worker's session options and intra-op threads, then runs each
model at each batch size in turn. Fovea: Valkey, a registry, one worker and a gateway as processes on loopback
(fovea.cluster), a closed-loop Classify load through the gateway per model and concurrency; then the worker's
and the gateway's VmHWM from /proc/PID/status. While the worker loads its models (before it prints its address),
a thread samples its RSS every 5 ms; the worker's cold-start log line splits the samples into download and
sessions. MB here are 10^6 bytes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# Only the standard library at module level: the raw child runs this file too, and whatever it imports counts
# in the peak it reports. The parent's imports are inside the functions that use them.

BOUND_MB = 200.0
"""Both bounds of the acceptance: worker peak minus raw peak, and the gateway's peak."""
COLD_START = re.compile(
    r"cold start: loaded (\S+) v\d+ in ([0-9.]+) s \(download ([0-9.]+) s, sessions ([0-9.]+) s, warm-up ([0-9.]+) s"
)
BATCH_LINE = re.compile(r"^fovea_worker_batch_size_(sum|count|bucket)\{([^}]*)\} ([0-9.e+-]+)$")


def status_mb(pid: int | str = "self") -> dict[str, float]:
    """VmRSS and VmHWM (peak RSS) of a process, in MB, and its thread count."""
    out: dict[str, float] = {}
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024 / 1e6
        elif key == "Threads":
            out[key] = int(value)
    return out


def rollup_mb(pid: int | str = "self") -> dict[str, float]:
    """Where the resident memory is now (/proc/PID/smaps_rollup): anonymous (heaps, arenas) against file-backed
    (libraries, mapped files), in MB."""
    out = {}
    for line in pathlib.Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, value = line.partition(":")
        if key in ("Rss", "Anonymous", "Pss_Anon", "Pss_File", "Shared_Clean", "Private_Clean", "Private_Dirty"):
            out[key] = int(value.split()[0]) * 1024 / 1e6
    return out


# ---- raw: plain ONNX Runtime in a process of its own ---------------------------------------------------------


def raw_child(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs in the child: open every model, note RSS, run each model at each batch size for `seconds`."""
    import numpy as np
    import onnxruntime as ort

    imported = status_mb()
    sessions = {name: ort.InferenceSession(path, _raw_options(spec["threads"])) for name, path in spec["models"]}
    loaded = status_mb()
    rng = np.random.default_rng(0)
    runs: dict[str, dict[int, int]] = {}
    for name, session in sessions.items():
        inp = session.get_inputs()[0]
        sample = [int(d) for d in inp.shape[1:]]
        for batch in spec["batch_sizes"]:
            feed = {inp.name: rng.standard_normal([batch, *sample]).astype(np.float32)}
            count, end = 0, time.monotonic() + spec["seconds"]
            while count == 0 or time.monotonic() < end:
                session.run(None, feed)
                count += 1
            runs.setdefault(name, {})[batch] = count
    return {"imported": imported, "loaded": loaded, "end": status_mb(), "rollup_end": rollup_mb(), "runs": runs}


def _raw_options(threads: int) -> Any:
    """The options worker.runtime.session_options gives the worker's sessions (defaults but threads), written out
    here so that the child does not import the worker."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.enable_cpu_mem_arena = True
    so.log_severity_level = 3
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    so.add_session_config_entry("session.force_spinning_stop", "1")
    return so


def measure_raw(models: list[Any], threads: int, batch_sizes: list[int], seconds: float) -> dict[str, Any]:
    spec = {
        "models": [(m.name, str(m.path)) for m in models],
        "threads": threads,
        "batch_sizes": batch_sizes,
        "seconds": seconds,
    }
    done = subprocess.run(
        [sys.executable, __file__, "--raw-child", json.dumps(spec)], capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        raise RuntimeError(f"the raw child failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.splitlines()[-1])


# ---- Fovea: a local cluster under load through the gateway ---------------------------------------------------


def batch_totals(metrics_port: int, model: str) -> dict[str, Any]:
    """The worker's batch-size histogram for `model` so far: "sum" (samples), "count" (batches) and "le",
    the cumulative count per bucket bound."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    totals: dict[str, Any] = {"sum": 0.0, "count": 0.0, "le": {}}
    for line in text.splitlines():
        m = BATCH_LINE.match(line)
        if not m or f'model="{model}"' not in m.group(2):
            continue
        if m.group(1) == "bucket":
            bound = float(re.search(r'le="([^"]+)"', m.group(2)).group(1))  # type: ignore[union-attr]
            totals["le"][bound] = totals["le"].get(bound, 0.0) + float(m.group(3))
        else:
            totals[m.group(1)] += float(m.group(3))
    return totals


def batches_between(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """Batches run between two scrapes: their count, mean size, and the bucket bound the largest fits under."""
    count = after["count"] - before["count"]
    if not count:
        return {"batches": 0, "mean": 0.0, "largest_at_most": 0.0}
    grown = {bound: n - before["le"].get(bound, 0.0) for bound, n in after["le"].items()}
    largest = min(bound for bound, n in grown.items() if n >= count)
    return {"batches": count, "mean": (after["sum"] - before["sum"]) / count, "largest_at_most": largest}


def measure_fovea(models: list[Any], args: argparse.Namespace, work_dir: pathlib.Path) -> dict[str, Any]:
    from bench.suite.run import hop_target, publish, wait_until_served
    from fovea.client import RegistryClient
    from fovea.cluster import Cluster
    from fovea.redis_server import free_port
    from loadtest import stats
    from loadtest.runner import LoadSpec, run

    data_dir = pathlib.Path(tempfile.mkdtemp(prefix="memory-", dir=work_dir))
    cluster = Cluster(data_dir)
    try:
        registry = cluster.start_registry()
        rc = RegistryClient(registry.address, cluster.admin_token, timeout_s=60)
        key = publish(registry.address, cluster.admin_token, models, "memory bench")
        metrics_port = free_port()
        sampler = StartSampler()
        with sampler:
            worker = cluster.start_worker(
                registry.address,
                [m.name for m in models],
                FOVEA_WORKER_INTRA_OP_THREADS=str(args.threads),
                FOVEA_WORKER_MAX_BATCH_SIZE=str(args.max_batch),
                FOVEA_WORKER_METRICS_PORT=str(metrics_port),
                **dict(kv.split("=", 1) for kv in args.worker_env),
            )
        _wait_ready(rc, [m.name for m in models])
        worker_loaded = status_mb(worker.proc.pid)
        gateway = cluster.start_gateway(registry.address)
        gateway_started = status_mb(gateway.proc.pid)
        plan = [(m, *hop_target(m, "gateway", gateway.address, key)) for m in models]
        wait_until_served([(t, r) for _, t, r in plan])
        points = []
        for m, target, requests in plan:
            for c in args.concurrency:
                before = batch_totals(metrics_port, m.name)
                spec = LoadSpec(mode="closed", concurrency=c, duration_s=args.seconds, warmup_s=0.5, timeout_s=30.0)
                result = stats.summarize(run(target, spec, requests))
                batches = batches_between(before, batch_totals(metrics_port, m.name))
                points.append(
                    {
                        "model": m.name,
                        "concurrency": c,
                        "ok": result["ok"],
                        "errors": result["errors"],
                        "throughput_rps": result["throughput_rps"],
                        "batches": batches,
                        "worker_rss_mb": status_mb(worker.proc.pid)["VmRSS"],
                    }
                )
                print(f"  {m.name} c={c}: {result['throughput_rps']:.0f}/s, mean batch {batches['mean']:.1f}")
        return {
            "worker_loaded": worker_loaded,
            "worker_end": status_mb(worker.proc.pid),
            "worker_rollup_end": rollup_mb(worker.proc.pid),
            "gateway_started": gateway_started,
            "gateway_end": status_mb(gateway.proc.pid),
            "gateway_rollup_end": rollup_mb(gateway.proc.pid),
            "points": points,
            "worker_loading": sampler.phases(worker.log_path.read_text().splitlines()),
        }
    finally:
        cluster.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


class StartSampler:
    """The worker's RSS every 5 ms while it starts. It loads its models before it prints its address, so
    Cluster.start_worker returns only after the loading; this finds the worker as the new child process of
    this one and samples it from a thread, and phases() splits the samples by the worker's cold-start log."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._known = set(_children())
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> StartSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        pid = None
        while pid is None and not self._stop.is_set():
            pid = next((c for c in _children() if c not in self._known and _runs_worker(c)), None)
            time.sleep(0.002)
        while pid is not None and not self._stop.is_set():
            try:
                self.samples.append((time.time(), status_mb(pid)["VmRSS"]))
            except (OSError, KeyError):
                return  # the worker is gone
            time.sleep(0.005)

    def phases(self, log_lines: list[str]) -> list[dict[str, Any]]:
        """Per model loaded: RSS (MB) at its load's start, after the download, at the peak of building its
        sessions, and when it is ready, read at the times its "cold start" log line gives."""
        out = []
        for line in log_lines:
            m = COLD_START.search(line)
            if not m or not self.samples or not line.startswith("{"):
                continue
            end = datetime.datetime.fromisoformat(json.loads(line)["ts"].replace("Z", "+00:00")).timestamp()
            total, download, sessions = (float(m.group(i)) for i in (2, 3, 4))
            start = end - total
            inside = [r for t, r in self.samples if start + download <= t <= start + download + sessions]
            out.append(
                {
                    "model": m.group(1),
                    "seconds": total,
                    "rss_at_start_mb": self._at(start),
                    "rss_after_download_mb": self._at(start + download),
                    "rss_peak_building_sessions_mb": max(inside, default=float("nan")),
                    "rss_ready_mb": self._at(end),
                }
            )
        return out

    def _at(self, when: float) -> float:
        before = [r for t, r in self.samples if t <= when]
        return before[-1] if before else self.samples[0][1]


def _children() -> list[str]:
    """Pids of this process's children (Popen forks from whichever thread calls it)."""
    out = []
    for task in pathlib.Path("/proc/self/task").iterdir():
        try:
            out += (task / "children").read_text().split()
        except OSError:
            continue
    return out


def _runs_worker(pid: str) -> bool:
    try:
        return "worker" in pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return False


def _wait_ready(rc: Any, names: list[str], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    for name in names:
        while not rc.list_workers(name, ready_only=True):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the worker did not become ready for {name}")
            time.sleep(0.2)


# ---- the report ----------------------------------------------------------------------------------------------


def summary(raw: dict[str, Any], fovea: dict[str, Any]) -> dict[str, Any]:
    raw_peak, worker_peak = raw["end"]["VmHWM"], fovea["worker_end"]["VmHWM"]
    gateway_peak = fovea["gateway_end"]["VmHWM"]
    return {
        "raw_loaded_mb": raw["loaded"]["VmRSS"],
        "raw_peak_mb": raw_peak,
        "worker_loaded_mb": fovea["worker_loaded"]["VmRSS"],
        "worker_peak_mb": worker_peak,
        "worker_minus_raw_mb": worker_peak - raw_peak,
        "worker_pass": worker_peak - raw_peak <= BOUND_MB,
        "gateway_peak_mb": gateway_peak,
        "gateway_pass": gateway_peak <= BOUND_MB,
    }


def markdown(doc: dict[str, Any]) -> str:
    s, m = doc["summary"], doc["machine"]
    raw, fovea = doc["raw"], doc["fovea"]
    ok = {True: "pass", False: "FAIL"}
    lines = [
        f"Measured {doc['finished_at']} on {m['cpu']} ({m['cores']} cores), onnxruntime {m.get('onnxruntime', '?')}; "
        f"1-minute load average {doc['load_avg_at_start']:.2f} at the start, {doc['load_avg_at_end']:.2f} at the end. "
        f"Models {', '.join(doc['settings']['models'])}; {doc['settings']['threads']} intra-op threads; raw batch "
        f"sizes {doc['settings']['batch_sizes']}; Classify through the gateway at concurrency "
        f"{doc['settings']['concurrency']}. MB = 10^6 bytes.",
        "",
        "| | raw ORT | worker | worker − raw | bound | gateway | bound |",
        "|---|---|---|---|---|---|---|",
        _row("after loading (RSS)", raw["loaded"]["VmRSS"], fovea["worker_loaded"]["VmRSS"])
        + f" | {fovea['gateway_started']['VmRSS']:.1f} | |",
        _row("peak before any call (VmHWM)", raw["loaded"]["VmHWM"], fovea["worker_loaded"]["VmHWM"])
        + f" | {fovea['gateway_started']['VmHWM']:.1f} | |",
        _row("peak (VmHWM)", s["raw_peak_mb"], s["worker_peak_mb"])
        + f" ≤ {BOUND_MB:.0f}: {ok[s['worker_pass']]} | {s['gateway_peak_mb']:.1f} | ≤ {BOUND_MB:.0f}: "
        f"{ok[s['gateway_pass']]} |",
        "",
        "| model | concurrency | ok | errors | calls/s | worker's batches: mean, largest ≤ | worker RSS after (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in fovea["points"]:
        errors = ", ".join(f"{k}={v}" for k, v in p["errors"].items()) or "0"
        lines.append(
            f"| {p['model']} | {p['concurrency']} | {p['ok']} | {errors} | {p['throughput_rps']:.0f} | "
            f"{p['batches']['mean']:.1f}, {p['batches']['largest_at_most']:.0f} | {p['worker_rss_mb']:.1f} |"
        )
    lines += [
        "",
        "The worker's RSS (MB) while it loads, sampled every 5 ms, split by its cold-start log line:",
        "",
        "| model | load s | at start | after download | peak building sessions | ready |",
        "|---|---|---|---|---|---|",
    ]
    for p in fovea["worker_loading"]:
        lines.append(
            f"| {p['model']} | {p['seconds']:.2f} | {p['rss_at_start_mb']:.1f} | {p['rss_after_download_mb']:.1f} | "
            f"{p['rss_peak_building_sessions_mb']:.1f} | {p['rss_ready_mb']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _row(label: str, raw: float, worker: float) -> str:
    """The first cells of a memory row, up to the worker's bound cell, which the caller writes."""
    return f"| {label} | {raw:.1f} | {worker:.1f} | {worker - raw:+.1f} |"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "bench" / "worker_memory.json"), help="the JSON file")
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "bench"), help="model cache and cluster data")
    p.add_argument("--models", default="cifar-resnet18,cifar-cnn", help="comma-separated, from bench/suite/models.py")
    p.add_argument("--threads", type=int, default=2, help="intra-op threads, raw and worker alike")
    p.add_argument("--max-batch", type=int, default=32, help="the worker's FOVEA_WORKER_MAX_BATCH_SIZE")
    p.add_argument("--batch-sizes", default="1,8,32", help="raw ONNX Runtime's batch sizes")
    p.add_argument("--concurrency", default="1,8,32", help="closed-loop concurrency through the gateway")
    p.add_argument("--seconds", type=float, default=4.0, help="per raw batch size and per load point")
    p.add_argument(
        "--worker-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra worker environment, repeatable (e.g. MALLOC_TRIM_THRESHOLD_=131072 to A/B glibc's trimming)",
    )
    p.add_argument("--raw-child", default="", help=argparse.SUPPRESS)
    return p


def main(args: argparse.Namespace) -> int:
    from fovea import codegen

    codegen.require()
    from bench.suite.models import BUILDERS, prepare
    from loadtest import report

    started = time.monotonic()
    load_at_start = os.getloadavg()[0]
    names = [n for n in args.models.split(",") if n]
    unknown = set(names) - set(BUILDERS)
    if unknown:
        print(f"unknown models {sorted(unknown)}; choose from {', '.join(BUILDERS)}", file=sys.stderr)
        return 2
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    work_dir = pathlib.Path(args.work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    models, skipped = prepare(names, work_dir / "models")
    if skipped:
        print(f"cannot build {skipped}", file=sys.stderr)
        return 1
    print("raw ONNX Runtime ...")
    raw = measure_raw(models, args.threads, batch_sizes, args.seconds)
    print("Fovea cluster ...")
    fovea = measure_fovea(models, args, work_dir)
    doc: dict[str, Any] = {
        "command": "python bench/worker/memory.py " + " ".join(sys.argv[1:]),
        "machine": report.machine(),
        "load_avg_at_start": load_at_start,
        "load_avg_at_end": os.getloadavg()[0],
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "seconds": round(time.monotonic() - started, 1),
        "settings": {
            "models": names,
            "threads": args.threads,
            "max_batch": args.max_batch,
            "batch_sizes": batch_sizes,
            "concurrency": args.concurrency,
            "seconds": args.seconds,
            "bound_mb": BOUND_MB,
            "worker_env": args.worker_env,
        },
        "summary": summary(raw, fovea),
        "raw": raw,
        "fovea": fovea,
    }
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(markdown(doc))
    print(f"wrote {out} in {doc['seconds']} s")
    failed_points = [p for p in fovea["points"] if not p["ok"]]
    return 1 if failed_points else 0


if __name__ == "__main__":
    parsed = get_args_parser().parse_args()
    if parsed.raw_child:
        print(json.dumps(raw_child(json.loads(parsed.raw_child))))
        sys.exit(0)
    sys.exit(main(parsed))
