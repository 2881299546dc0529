"""Images through a local cluster against an in-process loop that does the same work: the baseline that
issue 19's image acceptance (saturation >= 95% of the loop, p50 at concurrency 1 <= the loop's batch-1
time + 1.5 ms) is judged against.

  loop     in this process, on the same photos: decode + preprocess (fovea.images, as the worker does, on a
           pool of --threads threads) and ONNX Runtime (--threads intra-op threads). Batch 1 gives the
           per-photo time (its median is the c=1 baseline); batches of 8, 16 and 32 give throughput, and
           the best is the saturation baseline.
  cluster  Valkey, registry, one worker (--threads intra-op and decode threads) and one gateway, each a
           process on loopback; the load generator (loadtest, closed loop) sends JPEGs through the gateway
           as Classify and as Open Inference Protocol ModelInfer with a BYTES input (classification top 5).
           Concurrency 1 (p50) and --concurrency (throughput).

Photos: scikit-image's real photos as JPEG q90 at their own sizes (300x451 to 872x1000). Everything shares
this machine's cores, the load generator included. EfficientNet-Lite0, pretrained (training.pretrained).

Run from the repository root: python bench/images/classify_vs_loop.py  (writes docs/bench/classify_vs_loop.json)
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import pathlib
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fovea.images import Preprocess, decode, preprocess  # noqa: E402
from loadtest.report import machine  # noqa: E402

MODEL = "efficientnet-lite0"
PHOTOS = ("chelsea", "coffee", "astronaut", "rocket", "cat", "hubble_deep_field", "immunohistochemistry")
LIMIT = 40_000_000
MARGIN = 2.0  # the worker's default jpeg_decode_margin


def photos() -> list[bytes]:
    from PIL import Image
    from skimage import data

    out = []
    for name in PHOTOS:
        buf = io.BytesIO()
        Image.fromarray(getattr(data, name)()).convert("RGB").save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def spec() -> Preprocess:
    from training.pretrained import EFFICIENTNET_LITE0_PREPROCESSING as pre

    return Preprocess(
        resize_short=pre["resize_short"],
        crop_height=pre["crop_height"],
        crop_width=pre["crop_width"],
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
        grayscale=False,
    )


def in_process(path: pathlib.Path, images: list[bytes], threads: int, seconds: float) -> dict[str, Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    pre = spec()
    needs = pre.needs.times(MARGIN)

    def one(data: bytes) -> np.ndarray:
        return preprocess(decode(data, LIMIT, needs=needs), pre)

    for data in images:  # warm up
        session.run(None, {name: one(data)[None]})
    out: dict[str, Any] = {}
    times: list[float] = []
    end = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        session.run(None, {name: one(images[i % len(images)])[None]})
        times.append(time.perf_counter() - t0)
        i += 1
    out["batch 1"] = {
        "p50_ms": round(statistics.median(times) * 1000, 2),
        "images_per_s": round(len(times) / sum(times), 1),
    }
    with ThreadPoolExecutor(threads) as pool:
        for batch in (8, 16, 32):
            done, t0 = 0, time.perf_counter()
            end = t0 + seconds
            while time.perf_counter() < end:
                group = [images[(done + j) % len(images)] for j in range(batch)]
                session.run(None, {name: np.stack(list(pool.map(one, group)))})
                done += batch
            out[f"batch {batch}"] = {"images_per_s": round(done / (time.perf_counter() - t0), 1)}
    out["best_images_per_s"] = max(v["images_per_s"] for v in out.values())
    return out


def cluster_runs(
    path: pathlib.Path, images: list[bytes], threads: int, concurrency: int, seconds: float
) -> dict[str, Any]:
    from bench.images import image_cluster
    from loadtest.runner import LoadSpec, run
    from loadtest.stats import summarize
    from loadtest.targets import Target, build_requests, discover_input

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ic = image_cluster.start(pathlib.Path(tmp), MODEL, path, threads)
        cluster, rc, gateway, key = ic.cluster, ic.rc, ic.gateway, ic.key
        try:
            for kind, label in (("classify", "Classify"), ("gateway", "ModelInfer BYTES")):
                target = Target(kind=kind, address=gateway.address, model=MODEL, token=key, classification=5)
                if kind == "gateway":
                    discover_input(target)
                requests = build_requests(target, images, count=len(images))
                for c in (1, concurrency):
                    result = summarize(run(target, LoadSpec(concurrency=c, duration_s=seconds, warmup_s=2.0), requests))
                    if result["errors"]:
                        raise RuntimeError(f"{label} c={c}: {result['errors']} {result['error_messages']}")
                    out[f"{label} c={c}"] = {
                        "images_per_s": round(result["throughput_rps"], 1),
                        "p50_ms": round(result["latency_ms"]["p50"], 2),
                        "p99_ms": round(result["latency_ms"]["p99"], 2),
                        "client_cpu_fraction": result["client"]["cpu_fraction_max"],
                    }
                    print(f"  {label} c={c}: {out[f'{label} c={c}']}", flush=True)
            rc.close()
        finally:
            cluster.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", type=pathlib.Path, default=ROOT / "runs" / "bench" / "models")
    ap.add_argument("--threads", type=int, default=2, help="intra-op and decode threads, in the loop and the worker")
    ap.add_argument("--concurrency", type=int, default=16, help="the saturation point's concurrency")
    ap.add_argument("--seconds", type=float, default=15.0, help="measured seconds per point")
    ap.add_argument("--out", type=pathlib.Path, default=ROOT / "docs" / "bench" / "classify_vs_loop.json")
    args = ap.parse_args()

    from training.pretrained import import_efficientnet_lite0

    path = pathlib.Path(import_efficientnet_lite0(args.models_dir / MODEL))
    images = photos()
    result: dict[str, Any] = {
        "benchmark": "bench/images/classify_vs_loop.py",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "model": MODEL,
        "photos": {name: len(data) for name, data in zip(PHOTOS, images, strict=True)},
        "threads": args.threads,
        "concurrency": args.concurrency,
        "seconds_per_point": args.seconds,
        "jpeg_decode_margin": MARGIN,
    }
    print("in-process loop")
    loop = in_process(path, images, args.threads, args.seconds)
    print(f"  {loop}", flush=True)
    print("through the gateway")
    served = cluster_runs(path, images, args.threads, args.concurrency, args.seconds)
    loop_after = in_process(path, images, args.threads, args.seconds)  # the machine drifts: measure it twice
    result["loop"] = {"before": loop, "after": loop_after}
    result["served"] = served
    base_c1 = min(loop["batch 1"]["p50_ms"], loop_after["batch 1"]["p50_ms"])
    base_sat = max(loop["best_images_per_s"], loop_after["best_images_per_s"])
    ratios: dict[str, Any] = {}
    for label in ("Classify", "ModelInfer BYTES"):
        ratios[label] = {
            "saturation_vs_loop": round(served[f"{label} c={args.concurrency}"]["images_per_s"] / base_sat, 3),
            "c1_p50_minus_loop_batch1_ms": round(served[f"{label} c=1"]["p50_ms"] - base_c1, 2),
        }
    result["ratios"] = ratios
    result["baseline"] = {"loop_batch1_p50_ms": base_c1, "loop_best_images_per_s": base_sat}

    print(f"\n{'':<22}{'c=1 p50':>10}{f'c={args.concurrency} img/s':>14}{'sat / loop':>12}{'p50 - loop':>12}")
    print(f"{'in-process loop':<22}{base_c1:>8.1f}ms{base_sat:>14.1f}{'':>12}{'':>12}")
    for label in ("Classify", "ModelInfer BYTES"):
        c1, sat = served[f"{label} c=1"], served[f"{label} c={args.concurrency}"]
        r = ratios[label]
        print(
            f"{label:<22}{c1['p50_ms']:>8.1f}ms{sat['images_per_s']:>14.1f}{r['saturation_vs_loop']:>11.1%}"
            f"{r['c1_p50_minus_loop_batch1_ms']:>10.1f}ms"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
