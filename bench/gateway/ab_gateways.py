"""A/B of two gateway settings on one worker: CPU per call of each gateway, and the hop each adds at
concurrency 1, measured in turn.

Throughput ratios on this shared 2-core machine swing by ±8% from window to window, more than most
gateway changes are worth. A gateway's own CPU time per call hardly moves with that noise, so this
starts one worker and two gateways (A and B, each with its own extra settings), loads them in
alternating windows with perf_analyzer (raw FP32 tensors, concurrency --concurrency), and prints each
gateway's CPU ms per call, the worker's, and their ratio.

First, --c1-rounds rounds of p50 at concurrency 1 through the worker's fast port directly, A and B
(in turn, order alternating): each gateway's hop is its p50 minus the direct p50 of the same round,
and the median of those is printed. A real model's compute time moves by more than the hop between
windows here, so for the hop pass --model sink: 600 KB tensors in, a 4 KB answer out, no compute.

    .venv/bin/python bench/gateway/ab_gateways.py --b GRPC_EXPERIMENTS=tcp_rcv_lowat
    .venv/bin/python bench/gateway/ab_gateways.py --a FOVEA_GATEWAY_X=1 --b FOVEA_GATEWAY_X=2 --rounds 6
    .venv/bin/python bench/gateway/ab_gateways.py --model sink --b FOVEA_GATEWAY_FAST_THREADS=2 --c1-rounds 8

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
from loadtest import perf_analyzer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a", nargs="*", default=[], help="K=V settings of gateway A (default: none)")
    ap.add_argument("--b", nargs="*", default=[], help="K=V settings of gateway B")
    ap.add_argument("--model", default="efficientnet-lite0", help="sink, ident or efficientnet-lite0")
    ap.add_argument("--rounds", type=int, default=4, help="windows per gateway, taken in turn")
    ap.add_argument("--c1-rounds", type=int, default=0, help="rounds of p50 at concurrency 1 (direct, A, B)")
    ap.add_argument("--c1-window-ms", type=int, default=2000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--window-ms", type=int, default=4000)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "gateway_ab.json"))
    args = ap.parse_args()
    settings = {"A": dict(kv.split("=", 1) for kv in args.a), "B": dict(kv.split("=", 1) for kv in args.b)}
    data_dir = pathlib.Path(tempfile.mkdtemp(prefix="fovea-bench-ab-"))
    artifact, meta, _ = bg.build_model(args.model, data_dir)
    cluster = Cluster(data_dir / "cluster")
    rows: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    c1: dict[str, list[float]] = {"direct": [], "A": [], "B": []}
    try:
        reg, rc, mv, secret, worker = bg.start_stack(cluster, artifact, meta, {})
        gateways: dict[str, tuple[int, str]] = {}
        for name, env in settings.items():
            g = cluster.start_gateway(reg.address, name=f"gateway-{name}", **env)
            gateways[name] = (g.proc.pid, g.address)
        stable = ("--stability-percentage", "50")
        for _, address in gateways.values():  # warm both: routes, key cache, connections
            perf_analyzer.run(address, mv.name, secret, concurrency=args.concurrency, window_ms=1000, extra=stable)
        direct = (rc.list_workers(mv.name, ready_only=True)[0].fast_address, cluster.worker_call_token)
        targets: dict[str, tuple[str, str]] = {
            "direct": direct,
            **{name: (address, secret) for name, (_, address) in gateways.items()},
        }
        for r in range(args.c1_rounds):
            order = list(targets.items()) if r % 2 == 0 else list(targets.items())[::-1]
            for name, (address, token) in order:
                res = perf_analyzer.run(
                    address,
                    mv.name,
                    token,
                    concurrency=1,
                    window_ms=args.c1_window_ms,
                    extra=("--stability-percentage", "100"),
                )
                c1[name].append(res.p50_us / 1000)
            print(f"c=1 round {r + 1}: " + ", ".join(f"{n} {v[-1]:.3f} ms" for n, v in c1.items()), flush=True)
        for r in range(args.rounds):
            gateway_order = list(gateways.items()) if r % 2 == 0 else list(gateways.items())[::-1]
            for name, (pid, address) in gateway_order:
                g0, w0 = bg.cpu_s(pid), bg.cpu_s(worker.proc.pid)
                n0 = bg.rc_worker_stats(worker.address, cluster.worker_call_token, mv.name)
                res = perf_analyzer.run(
                    address, mv.name, secret, concurrency=args.concurrency, window_ms=args.window_ms, extra=stable
                )
                calls = bg.rc_worker_stats(worker.address, cluster.worker_call_token, mv.name) - n0
                row = {
                    "gateway_cpu_ms": (bg.cpu_s(pid) - g0) * 1000 / calls,
                    "worker_cpu_ms": (bg.cpu_s(worker.proc.pid) - w0) * 1000 / calls,
                    "calls_per_s": res.infer_per_s,
                }
                rows[name].append(row)
                print(
                    f"round {r + 1} {name}: gateway {row['gateway_cpu_ms']:.3f} ms/call, worker "
                    f"{row['worker_cpu_ms']:.3f} ms/call, {row['calls_per_s']:.0f} calls/s",
                    flush=True,
                )
    finally:
        cluster.stop()
    summary: dict[str, dict[str, float]] = {}
    if args.c1_rounds:
        print(f"\n{'':<3}{'p50 at c=1, ms':>16}{'hop (paired)':>14}   (medians over {args.c1_rounds} rounds)")
        for name in ("A", "B"):
            hop = statistics.median(g - d for g, d in zip(c1[name], c1["direct"], strict=False))
            summary[f"{name}_c1"] = {"p50_ms": statistics.median(c1[name]), "hop_ms": hop}
            print(f"{name:<3}{statistics.median(c1[name]):>16.3f}{hop:>+14.3f}")
        print(f"{'direct':<7}{statistics.median(c1['direct']):>12.3f}")
    print(f"\n{'':<3}{'settings':<40}{'gateway ms/call':>16}{'gateway/worker':>16}{'calls/s':>9}   (medians)")
    for name, rs in rows.items():
        if not rs:
            continue
        med = {
            "gateway_cpu_ms": statistics.median(r["gateway_cpu_ms"] for r in rs),
            "gateway_over_worker": statistics.median(r["gateway_cpu_ms"] / r["worker_cpu_ms"] for r in rs),
            "calls_per_s": statistics.median(r["calls_per_s"] for r in rs),
        }
        summary[name] = med
        label = " ".join(f"{k}={v}" for k, v in settings[name].items()) or "(defaults)"
        print(
            f"{name:<3}{label[:39]:<40}{med['gateway_cpu_ms']:>16.3f}{med['gateway_over_worker']:>16.2%}"
            f"{med['calls_per_s']:>9.0f}"
        )
    out = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": args.model,
        "concurrency": args.concurrency,
        "settings": settings,
        "rounds": rows,
        "c1_p50_ms": c1,
        "medians": summary,
    }
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
