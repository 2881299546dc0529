"""`fovea loadtest`: load a gateway, a worker or any Open Inference Protocol server, print a table,
write JSON and PNG plots.

    fovea loadtest classify 127.0.0.1:8500 --model efficientnet-lite0 --concurrency 1,8,32
    fovea loadtest worker 127.0.0.1:8502 --model efficientnet-lite0 --mode open --rate 50 --duration-s 30
    fovea loadtest oip localhost:8001 --model densenet_onnx --payload tensor --input-shape 1,3,224,224
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from typing import Any

from loadtest import images as image_source
from loadtest import plots, report, stats
from loadtest.runner import LoadSpec, run
from loadtest.targets import KINDS, Target, build_requests, discover_input


def _numbers(text: str, kind: type = int) -> list[Any]:
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _shape(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be comma-separated integers (-1 = batch), got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fovea loadtest",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[2:]),
    )
    p.add_argument(
        "target",
        choices=KINDS,
        help="classify: gateway Classify; gateway: gateway ModelInfer; worker: worker ModelInfer "
        "(internal token); oip: any OIP gRPC server (Triton, KServe, MLServer)",
    )
    p.add_argument("address", help="host:port")
    p.add_argument("--model", required=True)
    p.add_argument("--version", default="", help="model version; empty follows the server's default")
    p.add_argument(
        "--api-key", default=os.environ.get("FOVEA_API_KEY", ""), help="for classify/gateway (default $FOVEA_API_KEY)"
    )
    p.add_argument(
        "--token", default="", help="bearer token for worker/oip targets (worker default $FOVEA_GATEWAY_WORKER_TOKEN)"
    )

    g = p.add_argument_group("payload")
    g.add_argument(
        "--payload",
        choices=["images", "tensor"],
        default=None,
        help="images (default) or a random tensor (default when --input-shape is given)",
    )
    g.add_argument("--images", default="", help="folder of JPEG/PNG/WebP files to send")
    g.add_argument("--image-size", default="224x224", help="generated image size WxH (without --images)")
    g.add_argument("--image-format", choices=["jpeg", "png"], default="jpeg")
    g.add_argument("--image-count", type=int, default=16, help="distinct generated images")
    g.add_argument("--batch", type=int, default=1, help="images (or tensor rows) per request")
    g.add_argument("--top-k", type=int, default=5, help="labels per image (classify)")
    g.add_argument("--input-name", default="", help="OIP input name (default: from ModelMetadata)")
    g.add_argument("--input-shape", type=_shape, default=None, help="OIP tensor shape, e.g. -1,3,224,224")
    g.add_argument("--input-dtype", default="FP32", help="OIP tensor datatype")
    g.add_argument("--output-name", default="", help="OIP output to request (default: all)")
    g.add_argument(
        "--classification",
        type=int,
        default=0,
        help="ask OIP servers for the top-K classification extension on --output-name",
    )

    lo = p.add_argument_group("load")
    lo.add_argument("--mode", choices=["closed", "open"], default="closed")
    lo.add_argument(
        "--concurrency", type=_numbers, default=[8], help="closed loop: requests in flight; a list (1,8,32) is a sweep"
    )
    lo.add_argument(
        "--rate",
        type=lambda t: _numbers(t, float),
        default=None,
        help="open loop: arrivals per second (Poisson); a list is a sweep",
    )
    lo.add_argument("--duration-s", type=float, default=10.0)
    lo.add_argument("--warmup-s", type=float, default=2.0)
    lo.add_argument("--processes", type=int, default=1, help="client processes (when one cannot saturate)")
    lo.add_argument("--timeout-s", type=float, default=30.0, help="per-request deadline")
    lo.add_argument("--max-in-flight", type=int, default=20_000, help="open loop: pending requests per process")
    lo.add_argument(
        "--saturation-cpu", type=float, default=0.9, help="flag a client process above this fraction of a core"
    )

    o = p.add_argument_group("output")
    o.add_argument("--out", default="", help="folder for result.json and PNG plots (default: none)")
    o.add_argument("--no-plots", action="store_true")
    o.add_argument("--json", action="store_true", help="print the JSON summary instead of the table")
    return p


def target_from_args(args: argparse.Namespace) -> Target:
    token = args.token
    if args.target in ("classify", "gateway"):
        token = args.api_key
    elif args.target == "worker" and not token:
        token = os.environ.get("FOVEA_GATEWAY_WORKER_TOKEN", "")
    payload = args.payload or ("tensor" if args.input_shape else "images")
    return Target(
        kind=args.target,
        address=args.address,
        model=args.model,
        token=token,
        version=args.version,
        payload=payload,
        batch=args.batch,
        top_k=args.top_k,
        input_name=args.input_name,
        input_shape=args.input_shape or [],
        input_dtype=args.input_dtype,
        output_name=args.output_name,
        classification=args.classification,
    )


def load_images(args: argparse.Namespace) -> list[bytes]:
    if args.images:
        return image_source.from_folder(args.images)
    try:
        w, h = (int(x) for x in args.image_size.lower().split("x"))
    except ValueError:
        raise ValueError(f"--image-size must be WxH, e.g. 224x224, got {args.image_size!r}") from None
    return image_source.generate(args.image_count, w, h, args.image_format)


def specs_from_args(args: argparse.Namespace) -> list[LoadSpec]:
    base = dict(
        duration_s=args.duration_s,
        warmup_s=args.warmup_s,
        processes=args.processes,
        timeout_s=args.timeout_s,
        max_in_flight=args.max_in_flight,
        saturation_cpu_fraction=args.saturation_cpu,
    )
    if args.mode == "open":
        if not args.rate:
            raise ValueError("--mode open needs --rate")
        return [LoadSpec(mode="open", rate_rps=r, **base) for r in args.rate]  # type: ignore[arg-type]
    return [LoadSpec(mode="closed", concurrency=c, **base) for c in args.concurrency]  # type: ignore[arg-type]


def run_all(
    target: Target, specs: list[LoadSpec], requests: list[bytes], progress: bool = False
) -> list[dict[str, Any]]:
    """Run each spec in turn; returns one full summary (with timeline and histogram) per run."""
    results = []
    for spec in specs:
        if progress:
            load = f"concurrency {spec.concurrency}" if spec.mode == "closed" else f"{spec.rate_rps:g} req/s"
            print(
                f"  {spec.mode} loop, {load}: {spec.warmup_s:g} s warm-up + {spec.duration_s:g} s ...",
                file=sys.stderr,
                flush=True,
            )
        results.append(stats.full(run(target, spec, requests)))
    return results


def write_outputs(
    out_dir: pathlib.Path, target: Target, runs: list[dict[str, Any]], plot: bool = True, title: str = ""
) -> dict[str, Any]:
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "target": target.describe(),
        "machine": report.machine(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runs": runs,
    }
    if plot:
        doc["plots"] = [p.name for p in plots.write_all(runs, out_dir, title)]
    (out_dir / "result.json").write_text(json.dumps(doc, indent=2, allow_nan=False, default=_nan_to_none) + "\n")
    return doc


def _nan_to_none(x: Any) -> Any:
    raise TypeError(f"cannot serialize {type(x).__name__}")


def _clean(obj: Any) -> Any:
    """JSON has no NaN: empty percentiles become null."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clean(v) for v in obj]
    return obj


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        target = target_from_args(args)
        specs = specs_from_args(args)
        for spec in specs:
            spec.check()
        if target.kind != "classify":
            discover_input(target, timeout_s=min(args.timeout_s, 15.0))
        images = load_images(args) if target.payload == "images" else []
        requests = build_requests(target, images)
    except (ValueError, OSError) as exc:
        print(f"fovea loadtest: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # grpc.RpcError from ModelMetadata
        code = getattr(exc, "code", None)
        if code is None:
            raise
        print(f"fovea loadtest: ModelMetadata failed: {code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
        return 2
    print(
        f"{target.kind} {target.address} model={target.model} payload={target.payload} batch={target.batch}",
        file=sys.stderr,
    )
    runs = [_clean(r) for r in run_all(target, specs, requests, progress=True)]
    if args.out:
        doc = write_outputs(
            pathlib.Path(args.out), target, runs, plot=not args.no_plots, title=f"{target.kind} {target.model}"
        )
        print(f"wrote {args.out}/result.json" + "".join(f", {p}" for p in doc.get("plots", [])), file=sys.stderr)
    if args.json:
        print(json.dumps([{k: v for k, v in r.items() if k not in ("timeline", "histogram")} for r in runs], indent=2))
    else:
        print(report.table(runs))
    return 0 if any(r["ok"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
