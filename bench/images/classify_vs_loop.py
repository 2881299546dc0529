"""Images through a local cluster against an in-process loop that does the same work: the baseline that
issue 19's image acceptance (saturation >= 95% of the loop, p50 at concurrency 1 <= the loop's batch-1
time + 1.5 ms) is judged against.

  loop     in this process, on the same photos: decode + preprocess (fovea.images, as the worker does, on a
           pool of --threads threads) and ONNX Runtime (--threads intra-op threads). Batch 1 gives the
           per-photo time (its median is the c=1 baseline); batches of 16 and 32 give throughput, and
           the best is the saturation baseline.
  cluster  Valkey, registry, one worker (--threads intra-op and decode threads) and one gateway, each a
           process on loopback; the load generator (loadtest, closed loop) sends JPEGs through the gateway
           as Classify and as Open Inference Protocol ModelInfer with a BYTES input (classification top 5).
           Concurrency 1 (p50) and --concurrency (throughput).

The points run in rounds (--rounds): each round measures the loop, then every served point, and its ratios
are to its own loop; the medians over the rounds are reported. This machine drifts between a fast and a slow
phase within minutes, which one loop measured before everything else would not see.

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


class Loop:
    """The in-process baseline: decode + preprocess on a pool of threads, ONNX Runtime with as many intra-op
    threads, on the same photos."""

    def __init__(self, path: pathlib.Path, images: list[bytes], threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.name = self.session.get_inputs()[0].name
        self.images = images
        self.pre = spec()
        self.needs = self.pre.needs.times(MARGIN)
        self.pool = ThreadPoolExecutor(threads)
        for data in images:  # warm up
            self.session.run(None, {self.name: self.one(data)[None]})

    def one(self, data: bytes) -> np.ndarray:
        return preprocess(decode(data, LIMIT, needs=self.needs), self.pre)

    def batch1(self, seconds: float) -> dict[str, Any]:
        """One photo at a time: its median time is the c=1 baseline."""
        times: list[float] = []
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            self.session.run(None, {self.name: self.one(self.images[len(times) % len(self.images)])[None]})
            times.append(time.perf_counter() - t0)
        return {"p50_ms": round(statistics.median(times) * 1000, 2), "images_per_s": round(len(times) / sum(times), 1)}

    def batched(self, batch: int, seconds: float) -> float:
        """Images/s in batches, decoded on the pool."""
        done, t0 = 0, time.perf_counter()
        end = t0 + seconds
        while time.perf_counter() < end:
            group = [self.images[(done + j) % len(self.images)] for j in range(batch)]
            self.session.run(None, {self.name: np.stack(list(self.pool.map(self.one, group)))})
            done += batch
        return round(done / (time.perf_counter() - t0), 1)


def served_point(target: Any, requests: Any, concurrency: int, seconds: float, label: str) -> dict[str, Any]:
    from loadtest.runner import LoadSpec, run
    from loadtest.stats import summarize

    result = summarize(run(target, LoadSpec(concurrency=concurrency, duration_s=seconds, warmup_s=2.0), requests))
    if result["errors"]:
        raise RuntimeError(f"{label} c={concurrency}: {result['errors']} {result['error_messages']}")
    return {
        "images_per_s": round(result["throughput_rps"], 1),
        "p50_ms": round(result["latency_ms"]["p50"], 2),
        "p99_ms": round(result["latency_ms"]["p99"], 2),
        "client_cpu_fraction": result["client"]["cpu_fraction_max"],
    }


LABELS = ("Classify", "ModelInfer BYTES")


def rounds(
    path: pathlib.Path, images: list[bytes], threads: int, concurrency: int, seconds: float, count: int
) -> list[dict[str, Any]]:
    """count rounds, each measuring every point once in turn (the loop's, then each served one), so that the
    machine's slow and fast phases fall on the baseline and on the served points alike."""
    from bench.images import image_cluster
    from loadtest.targets import Target, build_requests, discover_input

    loop = Loop(path, images, threads)
    out: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        ic = image_cluster.start(pathlib.Path(tmp), MODEL, path, threads)
        cluster, rc, gateway, key = ic.cluster, ic.rc, ic.gateway, ic.key
        try:
            targets = []
            for kind, label in zip(("classify", "gateway"), LABELS, strict=True):
                target = Target(kind=kind, address=gateway.address, model=MODEL, token=key, classification=5)
                if kind == "gateway":
                    discover_input(target)
                targets.append((label, target, build_requests(target, images, count=len(images))))
            for r in range(count):
                point: dict[str, Any] = {"loop": {"batch 1": loop.batch1(seconds)}}
                for batch in (16, 32):
                    point["loop"][f"batch {batch}"] = {"images_per_s": loop.batched(batch, seconds)}
                point["loop"]["best_images_per_s"] = max(point["loop"][f"batch {b}"]["images_per_s"] for b in (16, 32))
                for label, target, requests in targets:
                    for c in (1, concurrency):
                        point[f"{label} c={c}"] = served_point(target, requests, c, seconds, label)
                base_c1, base_sat = point["loop"]["batch 1"]["p50_ms"], point["loop"]["best_images_per_s"]
                point["ratios"] = {
                    label: {
                        "saturation_vs_loop": round(point[f"{label} c={concurrency}"]["images_per_s"] / base_sat, 3),
                        "c1_p50_minus_loop_batch1_ms": round(point[f"{label} c=1"]["p50_ms"] - base_c1, 2),
                    }
                    for label in LABELS
                }
                print(f"  round {r + 1}: loop {point['loop']}", flush=True)
                for label in LABELS:
                    print(f"    {label}: {point['ratios'][label]}", flush=True)
                out.append(point)
            rc.close()
        finally:
            cluster.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", type=pathlib.Path, default=ROOT / "runs" / "bench" / "models")
    ap.add_argument("--threads", type=int, default=2, help="intra-op and decode threads, in the loop and the worker")
    ap.add_argument("--concurrency", type=int, default=16, help="the saturation point's concurrency")
    ap.add_argument("--seconds", type=float, default=8.0, help="measured seconds per point")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of every point in turn; the median is reported")
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
    print(f"{args.rounds} rounds: the in-process loop, then each served point", flush=True)
    measured = rounds(path, images, args.threads, args.concurrency, args.seconds, args.rounds)
    result["rounds"] = measured

    def median(label: str, key: str) -> float:
        return round(statistics.median(p["ratios"][label][key] for p in measured), 3)

    ratios = {
        label: {key: median(label, key) for key in ("saturation_vs_loop", "c1_p50_minus_loop_batch1_ms")}
        for label in LABELS
    }
    result["ratios"] = ratios
    result["ratios_are"] = "medians over the rounds of each round's ratio to that round's loop"

    print(f"\n{'median of ' + str(args.rounds) + ' rounds':<22}{'sat / loop':>12}{'p50 - loop':>12}")
    for label in LABELS:
        r = ratios[label]
        print(f"{label:<22}{r['saturation_vs_loop']:>11.1%}{r['c1_p50_minus_loop_batch1_ms']:>10.1f}ms")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
