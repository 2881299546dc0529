"""Summaries of merged samples: throughput, latency percentiles, errors by status, a timeline and
a log-bucketed histogram. Percentiles are exact (computed on every sample)."""

from __future__ import annotations

from typing import Any

import grpc
import numpy as np

from loadtest.runner import CLIENT_OVERFLOW, RunResult, Samples

PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99.9": 99.9}
_CODE_NAMES = {c.value[0]: c.name for c in grpc.StatusCode}


def code_name(code: int) -> str:
    return "CLIENT_OVERFLOW" if code == CLIENT_OVERFLOW else _CODE_NAMES.get(code, f"CODE_{code}")


def latency_ms(latency_s: np.ndarray) -> dict[str, float]:
    """Percentiles, mean and max in milliseconds; NaN when there are no samples."""
    if latency_s.size == 0:
        return {name: float("nan") for name in [*PERCENTILES, "mean", "max"]}
    ms = latency_s * 1e3
    out = {name: float(np.percentile(ms, q, method="higher")) for name, q in PERCENTILES.items()}
    out.update(mean=float(ms.mean()), max=float(ms.max()))
    return out


def summarize(result: RunResult) -> dict[str, Any]:
    """The run's headline numbers, plus the client's own CPU use and saturation flag."""
    s, spec = result.samples, result.spec
    ok = s.code == 0
    errors: dict[str, int] = {}
    for code, count in zip(*np.unique(s.code[~ok], return_counts=True), strict=False):
        errors[code_name(int(code))] = int(count)
    limit = spec.saturation_cpu_fraction
    return {
        "mode": spec.mode,
        "concurrency": spec.concurrency if spec.mode == "closed" else None,
        "rate_rps": spec.rate_rps if spec.mode == "open" else None,
        "duration_s": spec.duration_s,
        "requests": int(s.code.size),
        "ok": int(ok.sum()),
        "errors": errors,
        "error_messages": {k: v for c in result.clients for k, v in c.error_messages.items()},
        "throughput_rps": float(ok.sum() / spec.duration_s),
        "latency_ms": latency_ms(s.latency_s[ok]),
        "client": {
            "processes": [c.to_dict(limit) for c in result.clients],
            "cpu_fraction_max": round(max((c.cpu_fraction for c in result.clients), default=0.0), 3),
            "cpu_s_total": round(sum(c.cpu_s for c in result.clients), 3),
            "saturated": result.client_saturated,
            "saturation_cpu_fraction": limit,
        },
    }


def timeline(samples: Samples, duration_s: float, window_s: float = 1.0) -> list[dict[str, float]]:
    """Per window of send (or intended send) time: throughput and latency percentiles in ms."""
    rows = []
    n = max(1, int(np.ceil(duration_s / window_s)))
    for i in range(n):
        lo, hi = i * window_s, (i + 1) * window_s
        sel = (samples.start_s >= lo) & (samples.start_s < hi)
        ok = sel & (samples.code == 0)
        lat = latency_ms(samples.latency_s[ok])
        rows.append(
            {
                "t_s": lo,
                "rps": float(ok.sum() / window_s),
                "errors": int((sel & ~ok).sum()),
                "p50": lat["p50"],
                "p90": lat["p90"],
                "p99": lat["p99"],
                "max": lat["max"],
            }
        )
    return rows


def histogram(latency_s: np.ndarray, buckets_per_decade: int = 20) -> dict[str, list[float]]:
    """Counts in log-spaced latency buckets (ms), HDR-style: equal relative width, any range."""
    ms = latency_s[np.isfinite(latency_s)] * 1e3
    if ms.size == 0:
        return {"edges_ms": [], "counts": []}
    lo = np.floor(np.log10(max(ms.min(), 1e-3)))
    hi = np.ceil(np.log10(max(ms.max(), 1e-3) * 1.0001))
    edges = np.logspace(lo, hi, int((hi - lo) * buckets_per_decade) + 1)
    counts, _ = np.histogram(ms, bins=edges)
    return {"edges_ms": [float(e) for e in edges], "counts": [int(c) for c in counts]}


def window_for(duration_s: float) -> float:
    """1 s windows for long runs; at least 20 windows (of 50 ms or more) for short ones."""
    return 1.0 if duration_s >= 20 else max(0.05, duration_s / 20)


def full(result: RunResult, window_s: float | None = None) -> dict[str, Any]:
    """summarize + timeline + histogram, for the JSON file and the plots."""
    window_s = window_s or window_for(result.spec.duration_s)
    out = summarize(result)
    out["window_s"] = window_s
    ok = result.samples.code == 0
    out["timeline"] = timeline(result.samples, result.spec.duration_s, window_s)
    out["histogram"] = histogram(result.samples.latency_s[ok])
    return out
