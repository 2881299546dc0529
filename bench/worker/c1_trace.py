"""Where one c=1 request's time goes inside the worker's fast port, from a scheduler trace.

End-to-end p50 on this shared machine moves by more than the changes worth trying. The steps
between thread wake-ups in a `perf sched` trace are steadier, so this script uses them. It starts
a registry and a worker with EfficientNet-Lite0 (as bench_worker.py --fast does), keeps
perf_analyzer at concurrency 1, records `perf sched` for a while, and prints each step's median:

    send     perf_analyzer wakes a worker thread (it starts sending the request)
    batch    a gRPC thread wakes the Python batch thread (request read, parsed and queued)
    compute  the batch thread wakes ONNX Runtime's pool thread (first parallel operator)
    done     the pool thread goes to sleep for the last time before the answer
    answer   a worker thread wakes perf_analyzer (answer written)

    sudo .venv/bin/python bench/worker/c1_trace.py [--seconds 1.5] [--worker-env K=V ...]

Needs `perf` with the sched tracepoints (root, or perf_event_paranoid <= 1). Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import re
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_worker as bw  # noqa: E402

from fovea.cluster import Cluster  # noqa: E402
from loadtest import perf_analyzer as pa  # noqa: E402

LINE = re.compile(r"\s*([\d.]+) \[(\d+)\]\s+(\S+)\s+(.*)")
WAKE = re.compile(r"awakened: (\S+)\[(\d+)/(\d+)\]")
STEPS = ("send", "batch", "compute", "done", "answer")


def events(trace: str) -> list[tuple[float, str, int, int | None, str | None]]:
    """(time, waker comm, waker tid, woken tid, woken comm) per line of `perf sched timehist -w`;
    woken is None on a switch-out line."""
    out = []
    for line in trace.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        who = re.match(r"(.+)\[(\d+)(?:/\d+)?\]$", m[3])
        if not who:
            continue
        w = WAKE.search(m[4])
        out.append((float(m[1]), who[1], int(who[2]), int(w[2]) if w else None, w[1] if w else None))
    return out


def steps(
    evs: list[tuple[float, str, int, int | None, str | None]], worker_tids: set[int], python_tids: set[int]
) -> dict[str, list[float]]:
    """Milliseconds between consecutive steps, per request."""
    # ONNX Runtime's pool thread: the Python thread that other Python threads wake most.
    woken = collections.Counter(t for _, comm, tid, t, _ in evs if tid in python_tids and t in python_tids)
    pool = woken.most_common(1)[0][0] if woken else -1
    gaps: dict[str, list[float]] = {f"{a}->{b}": [] for a, b in zip(STEPS, STEPS[1:], strict=False)}
    cur: dict[str, float] = {}
    for t, comm, tid, target, tcomm in evs:
        if comm.startswith("perf_analyzer") and target in worker_tids and "send" not in cur:
            cur = {"send": t}
        elif "send" in cur and "batch" not in cur and tid in worker_tids - python_tids and target in python_tids:
            cur["batch"] = t
        elif "batch" in cur and "compute" not in cur and tid in python_tids and target == pool:
            cur["compute"] = t
        elif "compute" in cur and tid == pool and target is None:
            cur["done"] = t  # the last switch-out before the answer wins
        elif "done" in cur and tid in worker_tids and tcomm is not None and tcomm.startswith("perf_analyzer"):
            cur["answer"] = t
            for a, b in zip(STEPS, STEPS[1:], strict=False):
                gaps[f"{a}->{b}"].append((cur[b] - cur[a]) * 1e3)
            cur = {}
    return gaps


def record(seconds: float, data: pathlib.Path) -> subprocess.CompletedProcess[str]:
    """`perf sched record` of the whole machine for `seconds`, into data."""
    return subprocess.run(
        ["perf", "sched", "record", "-o", str(data), "--", "sleep", str(seconds)], capture_output=True, text=True
    )


def timehist(rec: subprocess.CompletedProcess[str], data: pathlib.Path) -> str:
    """The wake-ups of a recorded trace, as `perf sched timehist -w` prints them."""
    if rec.returncode != 0:
        raise SystemExit(f"perf sched record failed: {rec.stderr[-500:]}")
    return subprocess.run(["perf", "sched", "timehist", "-i", str(data), "-w"], capture_output=True, text=True).stdout


def summarize(gaps: dict[str, list[float]], noun: str, seconds: float) -> tuple[int, dict[str, dict[str, float]]]:
    """Prints and returns each step's median (ms) and count; n is the number of requests traced."""
    n = len(next(iter(gaps.values())))
    print(f"{n} {noun} traced in {seconds} s; medians (ms)")
    result = {}
    for name, values in gaps.items():
        med = statistics.median(values) if values else float("nan")
        result[name] = {"median_ms": med, "n": len(values)}
        print(f"  {name:<16} {med:7.3f}")
    return n, result


def save(path: str, out: dict[str, object]) -> None:
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(path).write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


def threads(pid: int) -> tuple[set[int], set[int]]:
    """All thread ids of a process, and those named like the interpreter (Python and ORT threads)."""
    tids, python = set(), set()
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        tids.add(int(task.name))
        if (task / "comm").read_text().strip().startswith("python"):
            python.add(int(task.name))
    return tids, python


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=1.5, help="length of the trace")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--worker-env", nargs="*", default=[], help="extra K=V settings for the worker")
    ap.add_argument("--out", default=str(bw.ROOT / "bench" / "results" / "worker_c1_trace.json"))
    args = ap.parse_args()
    path = bw.efficientnet_file()
    settings = {"efficientnet": {"instances": 2, "intra_op_threads": 1, "alone_threads": args.threads}}
    extra = {
        "FAST": "1",
        "FOVEA_WORKER_MODEL_SETTINGS": json.dumps(settings),
        **dict(kv.split("=", 1) for kv in args.worker_env),
    }
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(pathlib.Path(tmp))
        try:
            address, pid = bw.start_stack(cluster, "efficientnet", path, args.threads, 8, extra)
            pa.run(
                address, "efficientnet", cluster.worker_call_token, 1, 1000, extra=("--stability-percentage", "100")
            )  # warm
            window_ms = int((args.seconds + 4) * 1000)
            load = subprocess.Popen(
                [
                    pa.binary(),
                    "-i",
                    "grpc",
                    "-u",
                    address,
                    "-m",
                    "efficientnet",
                    "-H",
                    f"authorization:Bearer {cluster.worker_call_token}",
                    "--concurrency-range",
                    "1",
                    "--measurement-interval",
                    str(window_ms),
                    "--stability-percentage",
                    "100",
                ],
                env=pa.library_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            time.sleep(1.5)
            data = pathlib.Path(tmp) / "sched.data"
            rec = record(args.seconds, data)
            worker_tids, python_tids = threads(pid)
            load.communicate()
            trace = timehist(rec, data)
        finally:
            cluster.stop()
    n, result = summarize(steps(events(trace), worker_tids, python_tids), "requests", args.seconds)
    total = sum(r["median_ms"] for r in result.values())
    print(f"  {'sum of medians':<16} {total:7.3f}")
    out = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seconds": args.seconds,
        "worker_env": args.worker_env,
        "requests": n,
        "steps": result,
    }
    save(args.out, out)


if __name__ == "__main__":
    main()
