"""A/B of two gateway settings on one worker: CPU per call of each gateway, measured in turn.

Throughput ratios on this shared 2-core machine swing by ±8% from window to window, more than most
gateway changes are worth. A gateway's own CPU time per call hardly moves with that noise, so this
starts one worker and two gateways (A and B, each with its own extra settings), loads them in
alternating windows with perf_analyzer (raw FP32 tensors, concurrency --concurrency), and prints each
gateway's CPU ms per call, the worker's, and their ratio.

    .venv/bin/python bench/gateway/ab_gateways.py --b GRPC_EXPERIMENTS=tcp_rcv_lowat
    .venv/bin/python bench/gateway/ab_gateways.py --a FOVEA_GATEWAY_X=1 --b FOVEA_GATEWAY_X=2 --rounds 6

Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import bench_gateway as bg  # noqa: E402

from fovea.cluster import Cluster  # noqa: E402
from fovea.redis_server import free_port  # noqa: E402
from loadtest import perf_analyzer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", nargs="*", default=[], help="K=V settings of gateway A (default: none)")
    ap.add_argument("--b", nargs="*", default=[], help="K=V settings of gateway B")
    ap.add_argument("--model", default="efficientnet-lite0", help="ident, colors or efficientnet-lite0")
    ap.add_argument("--rounds", type=int, default=4, help="windows per gateway, taken in turn")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--window-ms", type=int, default=4000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gateway_ab.json"))
    args = ap.parse_args()
    settings = {"A": dict(kv.split("=", 1) for kv in args.a), "B": dict(kv.split("=", 1) for kv in args.b)}
    data_dir = pathlib.Path(tempfile.mkdtemp(prefix="fovea-bench-ab-"))
    artifact, meta, _ = bg.build_model(args.model, data_dir)
    cluster = Cluster(data_dir / "cluster")
    rows: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    try:
        reg, _, mv, secret, worker = bg.start_stack(cluster, artifact, meta, {})
        gateways = {}
        for name, env in settings.items():
            port = free_port()
            g = cluster.start_gateway(reg.address, name=f"gateway-{name}", FOVEA_GATEWAY_FAST_PORT=str(port), **env)
            gateways[name] = (g.proc.pid, f"127.0.0.1:{port}")
        stable = ("--stability-percentage", "50")
        for _, address in gateways.values():  # warm both: routes, key cache, connections
            perf_analyzer.run(address, mv.name, secret, concurrency=args.concurrency, window_ms=1000, extra=stable)
        for r in range(args.rounds):
            order = list(gateways.items()) if r % 2 == 0 else list(gateways.items())[::-1]
            for name, (pid, address) in order:
                g0, w0 = bg.cpu_s(pid), bg.cpu_s(worker.proc.pid)
                n0 = bg.rc_worker_stats(worker.address, cluster.internal_token, mv.name)
                res = perf_analyzer.run(address, mv.name, secret, concurrency=args.concurrency,
                                        window_ms=args.window_ms, extra=stable)
                calls = bg.rc_worker_stats(worker.address, cluster.internal_token, mv.name) - n0
                row = {"gateway_cpu_ms": (bg.cpu_s(pid) - g0) * 1000 / calls,
                       "worker_cpu_ms": (bg.cpu_s(worker.proc.pid) - w0) * 1000 / calls, "calls_per_s": res.infer_per_s}
                rows[name].append(row)
                print(f"round {r + 1} {name}: gateway {row['gateway_cpu_ms']:.3f} ms/call, worker "
                      f"{row['worker_cpu_ms']:.3f} ms/call, {row['calls_per_s']:.0f} calls/s", flush=True)
    finally:
        cluster.stop()
    summary = {}
    print(f"\n{'':<3}{'settings':<40}{'gateway ms/call':>16}{'gateway/worker':>16}{'calls/s':>9}   (medians)")
    for name, rs in rows.items():
        med = {"gateway_cpu_ms": statistics.median(r["gateway_cpu_ms"] for r in rs),
               "gateway_over_worker": statistics.median(r["gateway_cpu_ms"] / r["worker_cpu_ms"] for r in rs),
               "calls_per_s": statistics.median(r["calls_per_s"] for r in rs)}
        summary[name] = med
        label = " ".join(f"{k}={v}" for k, v in settings[name].items()) or "(defaults)"
        print(f"{name:<3}{label[:39]:<40}{med['gateway_cpu_ms']:>16.3f}{med['gateway_over_worker']:>16.2%}"
              f"{med['calls_per_s']:>9.0f}")
    out = {"when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "model": args.model,
           "concurrency": args.concurrency, "settings": settings, "rounds": rows, "medians": summary}
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
