"""Human output: the results table, and the machine description stored with every JSON file."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any


def machine() -> dict[str, Any]:
    """Where the numbers were measured: CPU model, cores, load, Python and library versions."""
    import grpc

    cpu = ""
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "grpcio": grpc.__version__,
    }
    try:
        info["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return info


def _f(x: float | None, digits: int = 2) -> str:
    if x is None or x != x:  # NaN
        return "-"
    return f"{x:.{digits}f}"


def table(summaries: list[dict[str, Any]]) -> str:
    """One row per run: load, throughput, latency percentiles, errors, client CPU."""
    header = ["mode", "load", "req/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "ok", "errors", "client cpu"]
    rows = []
    for s in summaries:
        load = f"c={s['concurrency']}" if s["mode"] == "closed" else f"{s['rate_rps']:g}/s"
        lat = s["latency_ms"]
        errors = ", ".join(f"{k}={v}" for k, v in sorted(s["errors"].items())) or "0"
        client = s["client"]
        cpu = f"{client['cpu_fraction_max'] * 100:.0f}%x{len(client['processes'])}"
        if client["saturated"]:
            cpu += " SATURATED"
        rows.append(
            [
                s["mode"],
                load,
                _f(s["throughput_rps"], 1),
                _f(lat["p50"]),
                _f(lat["p90"]),
                _f(lat["p99"]),
                _f(lat["p99.9"]),
                _f(lat["max"]),
                str(s["ok"]),
                errors,
                cpu,
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=False))).rstrip()
        for r in [header, *rows]
    ]
    out = "\n".join(lines)
    if any(s["client"]["saturated"] for s in summaries):
        out += (
            "\nSATURATED: a client process used more than "
            f"{summaries[0]['client']['saturation_cpu_fraction'] * 100:.0f}% of a core or sent late; "
            "these figures may measure the client. Add --processes."
        )
    return out
