"""Where a c=1 call's time goes in the gateway's native front (its one port), from a scheduler trace.

The hop at p50 moves by more than the changes worth trying on this shared machine. As
bench/worker/c1_trace.py does for the worker, this starts a registry, a worker and a gateway with
EfficientNet-Lite0 (600 KB raw FP32 tensors), keeps perf_analyzer at concurrency 1 on the gateway's
one port, records `perf sched`, and prints the median time between the wake-ups that mark each step:

    send     perf_analyzer wakes a gateway thread (it starts sending the request)
    forward  a gateway thread wakes a worker thread (the request goes on to the worker)
    back     a worker thread wakes a gateway thread for the last time (the answer is in)
    answer   a gateway thread wakes perf_analyzer (the answer is written)

send->forward and back->answer are the gateway's part of the hop; forward->back is the worker's
call, including reading the request from the gateway.

    sudo .venv/bin/python bench/gateway/hop_trace.py [--seconds 1.5] [--gateway-env K=V ...]

Needs `perf` with the sched tracepoints (root, or perf_event_paranoid <= 1). Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import pathlib
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "bench" / "worker"))

import bench_gateway as bg  # noqa: E402
from c1_trace import events, record, save, summarize, timehist  # noqa: E402

from fovea.cluster import Cluster  # noqa: E402
from loadtest import perf_analyzer as pa  # noqa: E402

STEPS = ("send", "forward", "back", "answer")


def steps(
    evs: list[tuple[float, str, int, int | None, str | None]], gateway: set[int], worker: set[int]
) -> dict[str, list[float]]:
    """Milliseconds between consecutive steps, per call."""
    gaps: dict[str, list[float]] = {f"{a}->{b}": [] for a, b in zip(STEPS, STEPS[1:], strict=False)}
    cur: dict[str, float] = {}
    for t, comm, tid, target, tcomm in evs:
        if comm.startswith("perf_analyzer") and target in gateway and "send" not in cur:
            cur = {"send": t}
        elif "send" in cur and "forward" not in cur and tid in gateway and target in worker:
            cur["forward"] = t
        elif "forward" in cur and tid in worker and target in gateway:
            cur["back"] = t  # the last one before the answer wins
        elif "back" in cur and tid in gateway and tcomm is not None and tcomm.startswith("perf_analyzer"):
            cur["answer"] = t
            for a, b in zip(STEPS, STEPS[1:], strict=False):
                gaps[f"{a}->{b}"].append((cur[b] - cur[a]) * 1e3)
            cur = {}
    return gaps


def tids(pid: int) -> set[int]:
    return {int(task.name) for task in pathlib.Path(f"/proc/{pid}/task").iterdir()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=1.5, help="length of the trace")
    ap.add_argument("--gateway-env", nargs="*", default=[], help="extra K=V settings for the gateway")
    ap.add_argument("--worker-env", nargs="*", default=[], help="extra K=V settings for the worker")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gateway_hop_trace.json"))
    args = ap.parse_args()
    data_dir = pathlib.Path(tempfile.mkdtemp(prefix="fovea-hop-trace-"))
    artifact, meta, _ = bg.build_model("efficientnet-lite0", data_dir)
    cluster = Cluster(data_dir / "cluster")
    try:
        reg, _, mv, secret, worker = bg.start_stack(
            cluster, artifact, meta, dict(kv.split("=", 1) for kv in args.worker_env)
        )
        gateway = cluster.start_gateway(reg.address, **dict(kv.split("=", 1) for kv in args.gateway_env))
        address = gateway.address
        stable = ("--stability-percentage", "100")
        pa.run(address, mv.name, secret, 1, 1000, extra=stable)  # warm: routes, key cache, connections
        load = subprocess.Popen(
            [
                pa.binary(),
                "-i",
                "grpc",
                "-u",
                address,
                "-m",
                mv.name,
                "-H",
                f"authorization:Bearer {secret}",
                "--concurrency-range",
                "1",
                "--measurement-interval",
                str(int((args.seconds + 4) * 1000)),
                *stable,
            ],
            env=pa.library_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        time.sleep(1.5)
        data = data_dir / "sched.data"
        rec = record(args.seconds, data)
        gateway_tids, worker_tids = tids(gateway.proc.pid), tids(worker.proc.pid)
        load.communicate()
        trace = timehist(rec, data)
    finally:
        cluster.stop()
    n, result = summarize(steps(events(trace), gateway_tids, worker_tids), "calls", args.seconds)
    gw = result["send->forward"]["median_ms"] + result["back->answer"]["median_ms"]
    print(f"  {'gateway part':<16} {gw:7.3f}   (send->forward + back->answer)")
    out = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": args.seconds,
        "gateway_env": args.gateway_env,
        "worker_env": args.worker_env,
        "calls": n,
        "steps": result,
    }
    save(args.out, out)


if __name__ == "__main__":
    main()
