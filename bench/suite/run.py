"""Fovea's benchmark suite: the in-process ONNX Runtime ceiling, the worker called directly, and
the full path through the gateway, per model and concurrency; writes JSON, a markdown table and
plots (see bench/README.md).

    python bench/suite/run.py                   # full suite, 5-10 minutes on 2 cores -> docs/bench/
    python bench/suite/run.py --smoke --out /tmp/bench-smoke     # under 60 s; CI runs this
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import shutil
import sys
import tempfile
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fovea import codegen  # noqa: E402

codegen.require()

import numpy as np  # noqa: E402

from bench.suite.models import ALL, SMOKE, BenchModel, prepare  # noqa: E402
from loadtest import images as image_source  # noqa: E402
from loadtest import plots, report, stats  # noqa: E402
from loadtest.runner import LoadSpec, run  # noqa: E402
from loadtest.targets import Target, build_requests  # noqa: E402

logger = logging.getLogger("bench")
HOPS = ("onnxruntime", "worker", "gateway")


def ort_ceiling(model: BenchModel, concurrency: int, duration_s: float, warmup_s: float) -> dict[str, Any]:
    """ONNX Runtime in this process with the worker's session defaults, one batch of
    `concurrency` samples per run: what a perfectly batching server could do, with no decoding,
    no RPC and no queueing."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model.path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    feed = {name: np.random.default_rng(0).standard_normal([concurrency, *model.tensor_shape]).astype(np.float32)}
    end = time.perf_counter() + warmup_s
    while time.perf_counter() < end:
        session.run(None, feed)
    times = []
    start = time.perf_counter()
    end = start + duration_s
    while (t := time.perf_counter()) < end:
        session.run(None, feed)
        times.append(time.perf_counter() - t)
    elapsed = time.perf_counter() - start
    lat = stats.latency_ms(np.array(times))
    return {
        "model": model.name,
        "hop": "onnxruntime",
        "concurrency": concurrency,
        "requests": len(times),
        "ok": len(times),
        "errors": {},
        "throughput_rps": len(times) * concurrency / elapsed,
        "latency_ms": lat,
        "note": f"batch of {concurrency} per run",
    }


def publish(registry_address: str, admin_token: str, models: list[BenchModel], description: str) -> str:
    """Register each model, point its production alias at it, and return a new infer key's secret."""
    from fovea.client import RegistryClient
    from fovea.v1 import model_pb2

    rc = RegistryClient(registry_address, admin_token, timeout_s=60)
    for m in models:
        mv = rc.register(m.path.read_bytes(), model_pb2.ModelVersion(name=m.name))
        rc.set_alias(m.name, "production", [(mv.version, 100)])
    return rc.create_key("infer", description=description)[1]


def hop_target(model: BenchModel, hop: str, address: str, token: str) -> tuple[Target, list[bytes]]:
    """The request a client would send: JPEGs through Classify (gateway) or ModelInfer with BYTES
    and top-5 classification (worker, as the gateway forwards it); tensors for the identity model."""
    if model.image_size:
        images = image_source.generate(8, model.image_size, model.image_size, "jpeg")
        if hop == "gateway":
            target = Target(kind="classify", address=address, model=model.name, token=token, top_k=5)
        else:
            input_name, output_name = _io_names(model)
            target = Target(
                kind="worker",
                address=address,
                model=model.name,
                token=token,
                input_name=input_name,
                output_name=output_name,
                classification=5,
            )
        return target, build_requests(target, images)
    target = Target(
        kind="gateway" if hop == "gateway" else "worker",
        address=address,
        model=model.name,
        token=token,
        payload="tensor",
        input_name="input",
        input_shape=[1, *model.tensor_shape],
    )
    return target, build_requests(target, [])


def _io_names(model: BenchModel) -> tuple[str, str]:
    import onnx

    graph = onnx.load(str(model.path), load_external_data=False).graph
    return graph.input[0].name, graph.output[0].name


def wait_until_served(targets: list[tuple[Target, list[bytes]]], timeout_s: float = 120.0) -> None:
    """Poll one real request per target until it succeeds: the worker has loaded the model and the
    gateway has heard of the worker."""
    import grpc

    for target, requests in targets:
        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(target.address) as channel:
            call = channel.unary_unary(target.method)
            while True:
                try:
                    call(requests[0], metadata=target.call_metadata(), timeout=10)
                    break
                except grpc.RpcError as exc:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"{target.kind} never served {target.model}: {exc.code().name} {exc.details()}"
                        ) from None
                    time.sleep(0.2)


def run_cluster(
    models: list[BenchModel], concurrency: list[int], spec: dict[str, Any], work_dir: pathlib.Path
) -> list[dict[str, Any]]:
    """Start Valkey, registry, one worker and a gateway as processes; load each hop in turn."""
    from fovea.cluster import Cluster

    data_dir = pathlib.Path(tempfile.mkdtemp(prefix="cluster-", dir=work_dir))
    cluster = Cluster(data_dir)
    rows = []
    try:
        reg = cluster.start_registry()
        api_key = publish(reg.address, cluster.admin_token, models, "bench suite")
        worker = cluster.start_worker(reg.address, [m.name for m in models])
        gateway = cluster.start_gateway(reg.address)
        addresses = {"worker": (worker.address, cluster.worker_call_token), "gateway": (gateway.address, api_key)}
        plan = [(m, hop, *hop_target(m, hop, *addresses[hop])) for m in models for hop in ("worker", "gateway")]
        wait_until_served([(t, r) for _, _, t, r in plan])
        for m, hop, target, requests in plan:
            for c in concurrency:
                logger.info("%s via %s, concurrency %d", m.name, hop, c)
                result = stats.summarize(run(target, LoadSpec(mode="closed", concurrency=c, **spec), requests))
                rows.append({"model": m.name, "hop": hop, **result})
    finally:
        cluster.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    return rows


def markdown(rows: list[dict[str, Any]], concurrency: list[int], doc: dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [
        "# Fovea benchmark results",
        "",
        f"Measured {doc['finished_at']} on {m['cpu']} ({m['cores']} cores), {m['platform']}, Python {m['python']}, "
        f"onnxruntime {m.get('onnxruntime', '?')}, grpcio {m['grpcio']}; 1-minute load average at the start "
        f"{doc['load_avg_at_start']:.2f}. Command: `{doc['command']}`.",
        "",
        "Throughput in requests/s (one image or one tensor row per request), then p50 / p99 latency in ms. "
        "`onnxruntime` is the in-process ceiling: one batch of *concurrency* samples per `run()`, no decoding, "
        "no RPC. `worker` is ModelInfer straight to the worker (JPEG decode + preprocessing + batching + ONNX "
        "Runtime); `gateway` adds the public hop (API key, routing, forwarding): Classify for image models, "
        "ModelInfer for `identity`. Client and cluster share the same cores.",
        "",
        "| model | hop | " + " | ".join(f"c={c}" for c in concurrency) + " |",
        "|---|---|" + "---|" * len(concurrency),
    ]
    index = {(r["model"], r["hop"], r["concurrency"]): r for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        for hop in HOPS:
            cells = []
            for c in concurrency:
                r = index.get((model, hop, c))
                if r is None:
                    cells.append("-")
                    continue
                lat = r["latency_ms"]
                cell = f"{r['throughput_rps']:.0f} ({lat['p50']:.2f} / {lat['p99']:.2f})"
                if r.get("errors"):
                    cell += " err " + ",".join(f"{k}={v}" for k, v in r["errors"].items())
                if r.get("client", {}).get("saturated"):
                    cell += " (client saturated)"
                cells.append(cell)
            lines.append(f"| {model} | {hop} | " + " | ".join(cells) + " |")
    overhead = _hop_overhead(index)
    if overhead:
        lines += [
            "",
            "Serving overhead of the zero-compute `identity` model at concurrency 1 (p50):",
            "",
            "| hop | p50 ms | added by this hop |",
            "|---|---|---|",
        ]
        previous = None
        for hop, p50 in overhead:
            lines.append(f"| {hop} | {p50:.3f} | {'-' if previous is None else f'{p50 - previous:+.3f}'} |")
            previous = p50
    if doc["skipped"]:
        lines += ["", "Not measured: " + "; ".join(f"{k}: {v}" for k, v in doc["skipped"].items())]
    lines += ["", "Plots: " + ", ".join(f"[{p}]({p})" for p in doc["plots"]), ""]
    return "\n".join(lines)


def _hop_overhead(index: dict[tuple[str, str, int], dict[str, Any]]) -> list[tuple[str, float]]:
    return [(hop, index[("identity", hop, 1)]["latency_ms"]["p50"]) for hop in HOPS if ("identity", hop, 1) in index]


def write_plots(rows: list[dict[str, Any]], out: pathlib.Path) -> list[str]:
    names = []
    for model in dict.fromkeys(r["model"] for r in rows):
        series: dict[str, list[tuple[float, float, float]]] = {}
        for r in rows:
            if r["model"] == model and r["ok"]:
                series.setdefault(r["hop"], []).append((r["concurrency"], r["throughput_rps"], r["latency_ms"]["p99"]))
        path = plots.throughput_sweep(
            series, out / f"throughput_{model}.png", "concurrency", f"{model}: throughput and p99 by hop"
        )
        names.append(path.name)
    return names


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "bench"), help="where results.json/.md and plots go")
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "bench"), help="model cache and cluster data")
    p.add_argument("--smoke", action="store_true", help="identity + cifar-cnn, c=1,8, 1 s each: under 60 s")
    p.add_argument("--models", default="", help=f"comma-separated subset of {','.join(ALL)}")
    p.add_argument("--concurrency", default="", help="default 1,8,32 (smoke: 1,8)")
    p.add_argument("--duration-s", type=float, default=0, help="measured seconds per point (default 6; smoke 1)")
    p.add_argument("--warmup-s", type=float, default=0, help="default 2 (smoke 0.3)")
    p.add_argument("--client-processes", type=int, default=1, help="harness processes per point")
    return p


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started = time.monotonic()
    load_at_start = report.machine().get("load_avg_1m", float("nan"))
    names = [n for n in args.models.split(",") if n] or list(SMOKE if args.smoke else ALL)
    unknown = set(names) - set(ALL)
    if unknown:
        print(f"unknown models {sorted(unknown)}; choose from {', '.join(ALL)}", file=sys.stderr)
        return 2
    concurrency = [int(c) for c in (args.concurrency or ("1,8" if args.smoke else "1,8,32")).split(",")]
    duration_s = args.duration_s or (1.0 if args.smoke else 6.0)
    warmup_s = args.warmup_s or (0.3 if args.smoke else 2.0)
    spec = {"duration_s": duration_s, "warmup_s": warmup_s, "processes": args.client_processes, "timeout_s": 30.0}
    work_dir, out = pathlib.Path(args.work_dir), pathlib.Path(args.out)
    work_dir.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    models, skipped = prepare(names, work_dir / "models")
    rows: list[dict[str, Any]] = []
    for m in models:
        for c in concurrency:
            logger.info("%s in-process onnxruntime, batch %d", m.name, c)
            rows.append(ort_ceiling(m, c, duration_s, warmup_s))
    rows += run_cluster(models, concurrency, spec, work_dir)

    doc: dict[str, Any] = {
        "command": "python bench/suite/run.py " + " ".join(sys.argv[1:]),
        "machine": report.machine(),
        "load_avg_at_start": load_at_start,
        "finished_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "seconds": round(time.monotonic() - started, 1),
        "settings": {"models": names, "concurrency": concurrency, **spec},
        "skipped": skipped,
        "results": rows,
    }
    doc["plots"] = write_plots(rows, out)
    (out / "results.json").write_text(json.dumps(doc, indent=2) + "\n")
    table = markdown(rows, concurrency, doc)
    (out / "results.md").write_text(table)
    print(table)
    print(f"\nwrote {out}/results.json, results.md and {len(doc['plots'])} plots in {doc['seconds']} s")
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
