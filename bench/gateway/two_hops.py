"""Issue #19's acceptance 3 for raw tensors, side by side in one run: a model served through the gateway and a
worker (two hops, ModelInfer with raw FP32 tensors) against raw ONNX Runtime in this process on the same model
file with the same intra-op threads.

    python bench/gateway/two_hops.py                                  # cifar-cnn, cifar-resnet18, effnet-fp32
    python bench/gateway/two_hops.py --models cifar-cnn --seconds 5 --out /tmp/two_hops.json

For each model: raw ONNX Runtime at batch 1 (its p50) and at batch --batch (its throughput, samples/s); then
a closed-loop gRPC client through the gateway at concurrency 1 (p50) and at --concurrency (throughput, one
sample per request, which the worker batches). The client is Triton's perf_analyzer (C++) where the test set-up
installed it, else loadtest (Python, which costs this 2-core machine about 0.3 ms of CPU a call). Saturation
is twice the batch by default: at a concurrency equal to the batch, half the callers are on their way back
while a batch runs, so the worker runs batches of half the size. For the saturated point it also records the
worker's mean batch and compute time per batch (its metrics) and each service's CPU, which show where the
gap to raw lies. Raw and Fovea alternate --rounds times per
model, and each side's best round counts (this shared machine flips between a fast and a slow phase; a round
pair most likely shares one). The targets are the issue's: throughput at least 97% of raw batched (90% for the
CIFAR CNN) and p50 at most raw batch-1 p50 + 0.7 ms (+0.5 ms for the CIFAR CNN). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

TARGETS = {"cifar-cnn": (0.90, 0.5)}  # model -> (throughput share of raw, added p50 ms); others below
DEFAULT_TARGET = (0.97, 0.7)


def raw_point(path: pathlib.Path, shape: list[int], batch: int, threads: int, seconds: float) -> dict[str, float]:
    """ONNX Runtime in this process with the worker's session options: p50 of one run and samples/s."""
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()  # as worker/runtime.py sets the worker's (bench/worker/memory.py writes them out too)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    so.add_session_config_entry("session.force_spinning_stop", "1")
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: np.random.default_rng(0).standard_normal([batch, *shape]).astype(np.float32)}
    for _ in range(3):
        session.run(None, feed)
    times = []
    start = time.perf_counter()
    while (t := time.perf_counter()) < start + seconds:
        session.run(None, feed)
        times.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    return {"p50_ms": float(np.median(times)) * 1000, "samples_per_s": len(times) * batch / elapsed}


def fovea_point(target: Any, requests: list[bytes], concurrency: int, seconds: float, client: str) -> dict[str, float]:
    if client == "perf_analyzer":
        from loadtest import perf_analyzer

        # this shared machine is noisy: perf_analyzer's default 10% stability rarely holds
        extra = ("--stability-percentage", "30", "--max-trials", "4")
        window = int(seconds * 1000)
        r = perf_analyzer.run(target.address, target.model, target.token, concurrency, window, extra=extra)
        return {"p50_ms": r.p50_us / 1000, "samples_per_s": r.infer_per_s}
    from loadtest import stats
    from loadtest.runner import LoadSpec, run

    spec = LoadSpec(mode="closed", concurrency=concurrency, duration_s=seconds, warmup_s=1.0, timeout_s=30.0)
    result = stats.summarize(run(target, spec, requests))
    if result["errors"]:
        raise RuntimeError(f"calls failed through the gateway: {result['errors']}")
    return {"p50_ms": result["latency_ms"]["p50"], "samples_per_s": result["throughput_rps"]}


class Usage:
    """CPU seconds of the services and the worker's batch counters at one moment; since() gives the shares."""

    def __init__(self, metrics_port: int, pids: dict[str, int]) -> None:
        self.metrics_port, self.pids = metrics_port, pids
        self.at = time.monotonic()
        self.cpu = {name: cpu_s(pid) for name, pid in pids.items()}
        self.counters = worker_counters(metrics_port)

    @classmethod
    def now(cls, metrics_port: int, pids: dict[str, int]) -> Usage:
        return cls(metrics_port, pids)

    def since(self) -> dict[str, float]:
        later = Usage(self.metrics_port, self.pids)
        elapsed = later.at - self.at
        d = {k: later.counters.get(k, 0.0) - self.counters.get(k, 0.0) for k in later.counters}
        batches = d.get("fovea_worker_batch_size_count", 0.0)
        out = {f"{name}_cpu": (later.cpu[name] - self.cpu[name]) / elapsed for name in self.pids}
        out["worker_mean_batch"] = d.get("fovea_worker_batch_size_sum", 0.0) / batches if batches else 0.0
        out["worker_compute_ms"] = d.get("fovea_worker_compute_seconds_sum", 0.0) * 1000 / batches if batches else 0.0
        return out


def cpu_s(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def worker_counters(port: int) -> dict[str, float]:
    """The worker's batch size and compute time sums and counts (summed over models), from its metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"(fovea_worker_(?:batch_size|compute_seconds)_(?:sum|count))(?:\{[^}]*\})? (\S+)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(2))
    return out


def measure(args: argparse.Namespace, work_dir: pathlib.Path) -> dict[str, Any]:
    from bench.suite.models import prepare
    from bench.suite.run import _io_names, publish, wait_until_served
    from fovea.cluster import Cluster
    from fovea.redis_server import free_port
    from loadtest.targets import Target, build_requests

    models, skipped = prepare(args.models.split(","), work_dir / "models")
    cluster = Cluster(work_dir / "cluster")
    results: dict[str, Any] = {"skipped": skipped, "models": {}}
    try:
        registry = cluster.start_registry()
        key = publish(registry.address, cluster.admin_token, models, "two hops bench")
        metrics_port = free_port()
        worker = cluster.start_worker(
            registry.address,
            [m.name for m in models],
            FOVEA_WORKER_METRICS_PORT=str(metrics_port),
            FOVEA_WORKER_INTRA_OP_THREADS=str(args.threads),
            FOVEA_WORKER_MAX_BATCH_SIZE=str(args.batch),
            **dict(kv.split("=", 1) for kv in args.worker_env),
        )
        gateway = cluster.start_gateway(registry.address)
        for m in models:
            target = Target(
                kind="gateway",
                address=gateway.address,
                model=m.name,
                token=key,
                payload="tensor",
                input_name=_io_names(m)[0],
                input_shape=[1, *m.tensor_shape],
            )
            requests = build_requests(target, [])
            wait_until_served([(target, requests)])
            rounds = []
            for r in range(args.rounds):
                row = {
                    "raw_b1": raw_point(m.path, m.tensor_shape, 1, args.threads, args.seconds),
                    "raw_batched": raw_point(m.path, m.tensor_shape, args.batch, args.threads, args.seconds),
                    "fovea_c1": fovea_point(target, requests, 1, args.seconds, args.client),
                }
                before = Usage.now(metrics_port, {"gateway": gateway.proc.pid, "worker": worker.proc.pid})
                row["fovea_saturated"] = fovea_point(target, requests, args.concurrency, args.seconds, args.client)
                row["fovea_saturated"].update(before.since())
                rounds.append(row)
                raw_rate, fovea_rate = row["raw_batched"]["samples_per_s"], row["fovea_saturated"]["samples_per_s"]
                sat = row["fovea_saturated"]
                print(
                    f"  {m.name} round {r + 1}: raw b1 {row['raw_b1']['p50_ms']:.2f} ms, "
                    f"b{args.batch} {raw_rate:.0f}/s ({args.batch / raw_rate * 1000:.1f} ms a batch); "
                    f"Fovea c1 {row['fovea_c1']['p50_ms']:.2f} ms, c{args.concurrency} {fovea_rate:.0f}/s "
                    f"(worker batches of {sat['worker_mean_batch']:.1f}, {sat['worker_compute_ms']:.1f} ms each; "
                    f"CPU: gateway {sat['gateway_cpu']:.0%}, worker {sat['worker_cpu']:.0%} of a core)",
                    flush=True,
                )
            results["models"][m.name] = {"rounds": rounds, "summary": summarize(m.name, rounds)}
    finally:
        cluster.stop()
    return results


def summarize(model: str, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Each side's best round: fastest p50, highest throughput."""
    best_p50 = {k: min(r[k]["p50_ms"] for r in rounds) for k in ("raw_b1", "fovea_c1")}
    best_rate = {k: max(r[k]["samples_per_s"] for r in rounds) for k in ("raw_batched", "fovea_saturated")}
    share, added = TARGETS.get(model, DEFAULT_TARGET)
    ratio = best_rate["fovea_saturated"] / best_rate["raw_batched"]
    extra = best_p50["fovea_c1"] - best_p50["raw_b1"]
    return {
        **best_p50,
        **best_rate,
        "throughput_ratio": ratio,
        "added_p50_ms": extra,
        "target_ratio": share,
        "target_added_p50_ms": added,
        "throughput_ok": ratio >= share,
        "latency_ok": extra <= added,
    }


def table(doc: dict[str, Any], batch: int, concurrency: int) -> str:
    lines = [
        f"| model | raw b1 p50 ms | Fovea c1 p50 ms | added (target) | raw b{batch}/s | Fovea c{concurrency}/s "
        "| share (target) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in doc["models"].items():
        s = m["summary"]
        lines.append(
            f"| {name} | {s['raw_b1']:.2f} | {s['fovea_c1']:.2f} | {s['added_p50_ms']:+.2f} ms (<= "
            f"{s['target_added_p50_ms']}) {'PASS' if s['latency_ok'] else 'FAIL'} | {s['raw_batched']:.0f} | "
            f"{s['fovea_saturated']:.0f} | {s['throughput_ratio']:.1%} (>= {s['target_ratio']:.0%}) "
            f"{'PASS' if s['throughput_ok'] else 'FAIL'} |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="cifar-cnn,cifar-resnet18,effnet-fp32")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads, raw and worker alike")
    ap.add_argument("--batch", type=int, default=32, help="raw batch size, and the worker's largest batch")
    ap.add_argument("--concurrency", type=int, default=0, help="calls in flight at saturation (0: twice --batch)")
    ap.add_argument("--client", choices=["auto", "perf_analyzer", "loadtest"], default="auto")
    ap.add_argument("--seconds", type=float, default=8.0, help="length of each measured window")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--worker-env", action="append", default=[], help="extra FOVEA_WORKER_X=Y settings")
    ap.add_argument("--out", default=str(ROOT / "docs" / "bench" / "two_hops.json"))
    args = ap.parse_args()
    args.concurrency = args.concurrency or 2 * args.batch
    if args.client == "auto":
        from loadtest import perf_analyzer

        try:
            perf_analyzer.check()
            args.client = "perf_analyzer"
        except perf_analyzer.PerfAnalyzerMissing:
            args.client = "loadtest"
    work_dir = pathlib.Path(tempfile.mkdtemp(prefix="two-hops-"))
    try:
        doc = measure(args, work_dir)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    doc.update(
        when=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        machine=f"{platform.processor() or platform.machine()}, Python {platform.python_version()}",
        args=vars(args),
    )
    print(f"client: {args.client}")
    print(table(doc, args.batch, args.concurrency))
    pathlib.Path(args.out).write_text(json.dumps(doc, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
