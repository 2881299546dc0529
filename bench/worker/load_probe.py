"""What a worker process does while a load runs: batches and stage times from its metrics, CPU per thread
from /proc, and one stack dump of every thread (py-spy when it works, else the worker's SIGUSR1 dump).

Used by gpu_check.py to tell apart the causes of a slow port: small or slow batches, a queue that waits,
one thread at 100% (the event loop), or threads burning CPU elsewhere.
"""

from __future__ import annotations

import os
import pathlib
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from typing import Any

HISTOGRAMS = ("batch_size", "compute_seconds", "queue_seconds", "request_seconds")
LINE = re.compile(r"^fovea_worker_(\w+?)_(sum|count)\{[^}]*\} ([0-9.e+-]+)$")
TICK = os.sysconf("SC_CLK_TCK")


def scrape(metrics_port: int) -> dict[str, float]:
    """Sums and counts of the worker's histograms, over every label."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    totals: dict[str, float] = {}
    for line in text.splitlines():
        m = LINE.match(line)
        if m and m.group(1) in HISTOGRAMS:
            key = f"{m.group(1)}_{m.group(2)}"
            totals[key] = totals.get(key, 0.0) + float(m.group(3))
    return totals


def thread_times(pid: int) -> dict[str, tuple[str, float]]:
    """tid -> (thread name, CPU seconds so far)."""
    out = {}
    for task in pathlib.Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        out[task.name] = (name, (int(fields[11]) + int(fields[12])) / TICK)
    return out


def stack_dump(pid: int) -> str:
    spy = shutil.which("py-spy")
    if spy:
        try:
            r = subprocess.run([spy, "dump", "--pid", str(pid), "--native"], capture_output=True, text=True, timeout=20)
            if r.returncode == 0:
                return r.stdout[-30_000:]
            text = f"py-spy failed ({r.returncode}): {r.stderr[-500:]}\n"
        except subprocess.TimeoutExpired:
            text = "py-spy timed out\n"
    else:
        text = "py-spy not installed\n"
    os.kill(pid, signal.SIGUSR1)  # faulthandler writes the stacks into the worker's log
    return text + "sent SIGUSR1: the stacks are in the worker's log"


class Probe:
    """Start before a load of `seconds`, stop after it; summary() says what the worker did meanwhile."""

    def __init__(self, pid: int, metrics_port: int, seconds: float, dump: bool = False) -> None:
        self.pid, self.metrics_port, self.seconds, self.dump = pid, metrics_port, seconds, dump
        self.before: dict[str, float] = {}
        self.cpu: dict[str, Any] = {}
        self.stacks = ""
        self.thread = threading.Thread(target=self._middle, daemon=True)

    def __enter__(self) -> Probe:
        self.before = scrape(self.metrics_port)
        self.t0 = time.perf_counter()
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join(30)
        self.after = scrape(self.metrics_port)
        self.elapsed = time.perf_counter() - self.t0

    def _middle(self) -> None:
        # The middle third of the load: past the clients' start, before their end.
        time.sleep(self.seconds / 3 + 2)
        t0, a = time.perf_counter(), thread_times(self.pid)
        time.sleep(self.seconds / 3)
        dt, b = time.perf_counter() - t0, thread_times(self.pid)
        busy = sorted(((b[t][1] - a[t][1]) / dt, b[t][0], t) for t in b if t in a)[::-1]
        self.cpu = {
            "process_cores": round(sum(x[0] for x in busy), 2),
            "threads": len(b),
            "top_threads": [f"{name}/{tid}: {share:.0%}" for share, name, tid in busy[:8]],
        }
        if self.dump:
            self.stacks = stack_dump(self.pid)

    def summary(self) -> dict[str, Any]:
        d = {k: self.after.get(k, 0.0) - self.before.get(k, 0.0) for k in self.after}
        batches = d.get("batch_size_count", 0.0)
        requests = d.get("queue_seconds_count", 0.0)
        out: dict[str, Any] = {"batches_per_s": round(batches / self.elapsed, 1)}
        if batches:
            out["mean_batch"] = round(d["batch_size_sum"] / batches, 2)
            out["mean_compute_ms"] = round(1e3 * d["compute_seconds_sum"] / batches, 2)
            out["gpu_busy_share"] = round(d["compute_seconds_sum"] / self.elapsed, 2)
        if requests:
            out["mean_queue_ms"] = round(1e3 * d["queue_seconds_sum"] / requests, 2)
        if d.get("request_seconds_count"):
            out["mean_request_ms"] = round(1e3 * d["request_seconds_sum"] / d["request_seconds_count"], 2)
        out["cpu"] = self.cpu
        return out
