"""PNG plots of load-test results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
import pathlib
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(run: dict[str, Any]) -> str:
    return f"c={run['concurrency']}" if run["mode"] == "closed" else f"{run['rate_rps']:g} req/s"


def latency_over_time(runs: list[dict[str, Any]], path: pathlib.Path, title: str = "") -> pathlib.Path:
    """p50/p90/p99 per time window, one panel per run."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(runs), 1, figsize=(8, 2.6 * len(runs) + 0.6), squeeze=False, sharex=True)
    for ax, run in zip(axes[:, 0], runs, strict=False):
        rows = run["timeline"]
        if not rows:
            continue
        step = rows[1]["t_s"] - rows[0]["t_s"] if len(rows) > 1 else run["duration_s"]
        t = [row["t_s"] for row in rows] + [rows[-1]["t_s"] + step]  # close the last step
        for key, style in (("p50", "-"), ("p90", "--"), ("p99", ":")):
            values = [row[key] for row in rows]
            ax.plot(t, values + values[-1:], style, label=key, drawstyle="steps-post")
        ax.set_yscale("log")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"{run['mode']} loop, {_label(run)}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    axes[-1, 0].set_xlabel("time in measured window (s), by (intended) send time")
    return _save(fig, path, title)


def latency_histogram(runs: list[dict[str, Any]], path: pathlib.Path, title: str = "") -> pathlib.Path:
    """Log-bucketed latency histogram, runs overlaid."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for run in runs:
        edges, counts = run["histogram"]["edges_ms"], run["histogram"]["counts"]
        if counts:
            ax.stairs(counts, edges, label=_label(run))
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("requests")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title or "latency histogram", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def throughput_sweep(
    series: dict[str, list[tuple[float, float, float]]],
    path: pathlib.Path,
    xlabel: str = "concurrency",
    title: str = "",
) -> pathlib.Path:
    """Throughput (left) and p99 latency (right) against load; series name -> [(x, rps, p99_ms)]."""
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for name, points in series.items():
        points = sorted(points)
        xs = [p[0] for p in points]
        ax1.plot(xs, [p[1] for p in points], "o-", label=name)
        ax2.plot(xs, [p[2] for p in points], "o-", label=name)
    ticks = sorted({p[0] for points in series.values() for p in points})
    for ax, ylabel in ((ax1, "throughput (req/s)"), (ax2, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        if ticks:
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax2.set_yscale("log")
    ax1.legend(fontsize=8)
    return _save(fig, path, title)


def write_all(runs: list[dict[str, Any]], out_dir: pathlib.Path, title: str = "") -> list[pathlib.Path]:
    """The three standard plots of one harness invocation (the sweep plot only for 2+ runs)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        latency_over_time(runs, out_dir / "latency_over_time.png", title),
        latency_histogram(runs, out_dir / "latency_histogram.png", title),
    ]
    if len(runs) > 1:
        closed = all(r["mode"] == "closed" for r in runs)
        key = "concurrency" if closed else "rate_rps"
        points = [
            (float(r[key]), r["throughput_rps"], r["latency_ms"]["p99"])
            for r in runs
            if not math.isnan(r["latency_ms"]["p99"])
        ]
        paths.append(
            throughput_sweep(
                {title or "target": points},
                out_dir / "throughput_sweep.png",
                "concurrency" if closed else "offered rate (req/s)",
                title,
            )
        )
    return paths


def _save(fig: Any, path: pathlib.Path, title: str) -> pathlib.Path:
    """Title, lay out, write the PNG and free the figure."""
    plt = _pyplot()
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
