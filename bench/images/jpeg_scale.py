"""Reduced-scale JPEG decoding (fovea.images, libjpeg-turbo's DCT scaling) against full decoding.

Three parts, all on the pretrained EfficientNet-Lite0 (short side 256, crop 224):

  accuracy  real photos (scikit-image's data photos, tests/fixtures/images), each as several crops and their
            mirror images, upscaled to 12, 3 and 1 megapixels and saved as JPEG q90 (plus the photos at their
            own size): top-1 and top-5 of the model after a reduced decode (the worker's jpeg_decode_margin
            1, 1.5 and 2) against after a full one, over the files where a reduced decode is possible, beside
            the noise floor: the same picture saved at quality 92 and decoded in full.
  decode    decode + preprocess time in this process of a 12 MP (4000x3000) and a 1 MP (1155x866) JPEG, full
            and at each margin (median of --reps).
  e2e       Classify latency at concurrency 1 through a local cluster (Valkey, registry, one worker, one
            gateway on loopback) for the same two files, with the worker decoding in full
            (FOVEA_WORKER_JPEG_DECODE_MARGIN=0), at margin 1 and at margin 2 (the default); the acceptance's
            ratio is 12 MP / 1 MP end to end at the default.

Run from the repository root: python bench/images/jpeg_scale.py  (writes docs/bench/jpeg_scale.json)
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
from typing import Any

import numpy as np
from PIL import Image, ImageOps

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from fovea.images import Preprocess, decode, jpeg_scale, preprocess  # noqa: E402
from loadtest.report import machine  # noqa: E402

MODEL = "efficientnet-lite0"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "cat", "hubble_deep_field", "immunohistochemistry", "retina")
SIZES = {"12MP": (4000, 3000), "3MP": (2048, 1536), "1MP": (1155, 866)}
"""Target sizes (landscape; a portrait crop gets them turned), each about its megapixels."""
LIMIT = 40_000_000
MARGINS = (1.0, 1.5, 2.0)
E2E_MARGINS = (0.0, 1.0, 2.0)
"""The worker's jpeg_decode_margin values compared (its default is 2)."""


def model_path(models_dir: pathlib.Path) -> pathlib.Path:
    from training.pretrained import import_efficientnet_lite0

    return pathlib.Path(import_efficientnet_lite0(models_dir / MODEL))


def spec_of(path: pathlib.Path) -> Preprocess:
    from training.pretrained import EFFICIENTNET_LITE0_PREPROCESSING as pre

    return Preprocess(
        resize_short=pre["resize_short"],
        crop_height=pre["crop_height"],
        crop_width=pre["crop_width"],
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
        grayscale=False,
    )


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def real_photos() -> dict[str, Image.Image]:
    from skimage import data

    photos = {name: Image.fromarray(getattr(data, name)()).convert("RGB") for name in PHOTOS}
    photos["stereo_motorcycle"] = Image.fromarray(data.stereo_motorcycle()[0])
    for path in sorted((ROOT / "tests" / "fixtures" / "images").glob("*.jpg")):
        with Image.open(path) as im:
            if len(im.getbands()) == 3 or im.mode == "CMYK":
                photos[path.stem] = im.convert("RGB")
    return photos


def variants(photo: Image.Image) -> dict[str, Image.Image]:
    """The whole photo and four 80% crops toward its corners, each also mirrored: ten framings."""
    w, h = photo.size
    cw, ch = int(w * 0.8), int(h * 0.8)
    framings = {"whole": photo}
    for name, (x, y) in {"tl": (0, 0), "tr": (w - cw, 0), "bl": (0, h - ch), "br": (w - cw, h - ch)}.items():
        framings[name] = photo.crop((x, y, x + cw, y + ch))
    return {**framings, **{f"{k}-mirrored": ImageOps.mirror(v) for k, v in framings.items()}}


def upscaled(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    w, h = size if image.width >= image.height else size[::-1]
    return image.resize((w, h), Image.Resampling.BICUBIC)


def accuracy(session: Any, spec: Preprocess) -> dict[str, Any]:
    """Per file size and way of decoding, how often the model's top-1 (and top-5) matches a full decode's.
    "re-encoded q92" is the noise floor: the same picture saved at JPEG quality 92 and decoded in full."""
    name = session.get_inputs()[0].name
    ways = {"re-encoded q92": None, **{f"margin {m:g}": m for m in MARGINS}}
    counts: dict[tuple[str, str], list[int]] = {}  # (size, way) -> files, top1, top5 set, top5 overlap, sure, sure top1
    scales: dict[tuple[str, str], set[str]] = {}
    for photo in real_photos().values():
        for image in variants(photo).values():
            for size in ("own size", *SIZES):
                picture = image if size == "own size" else upscaled(image, SIZES[size])
                data = jpeg(picture)
                if jpeg_scale(picture.width, picture.height, 1, spec.needs) == 1:
                    continue  # too small for any reduced decode: the same pixels either way
                inputs = [preprocess(decode(data, LIMIT), spec)]
                for margin in ways.values():
                    if margin is None:
                        inputs.append(preprocess(decode(jpeg(picture, 92), LIMIT), spec))
                    else:
                        inputs.append(preprocess(decode(data, LIMIT, needs=spec.needs.times(margin)), spec))
                logits = session.run(None, {name: np.stack(inputs)})[0]
                top = [np.argsort(-row)[:5] for row in logits]
                probs = np.exp(logits[0] - logits[0].max())
                sure = probs.max() / probs.sum() >= 0.5
                for i, (way, margin) in enumerate(ways.items(), 1):
                    for key in ((size, way), ("all", way)):
                        c = counts.setdefault(key, [0] * 6)
                        same1 = int(top[i][0] == top[0][0])
                        c[0] += 1
                        c[1] += same1
                        c[2] += int(set(top[i]) == set(top[0]))
                        c[3] += len(set(top[i]) & set(top[0]))
                        c[4] += int(sure)
                        c[5] += int(sure) * same1
                        if margin is not None:
                            d = jpeg_scale(picture.width, picture.height, 1, spec.needs.times(margin))
                            scales.setdefault(key, set()).add(f"1/{d}")
    out: dict[str, Any] = {}
    for (size, way), c in counts.items():
        out.setdefault(size, {})[way] = {
            "files": c[0],
            "scales": sorted(scales.get((size, way), set())),
            "top1_agreement": round(c[1] / c[0], 4),
            "top5_same_set": round(c[2] / c[0], 4),
            "top5_mean_overlap": round(c[3] / c[0], 3),
            "sure_files": c[4],
            "sure_top1_agreement": round(c[5] / c[4], 4) if c[4] else None,
        }
    return out


def test_files() -> dict[str, bytes]:
    from skimage import data

    coffee = Image.fromarray(data.coffee())
    return {
        k: jpeg(coffee.resize(s, Image.Resampling.BICUBIC)) for k, s in (("12MP", SIZES["12MP"]), ("1MP", SIZES["1MP"]))
    }


def decode_times(spec: Preprocess, files: dict[str, bytes], reps: int) -> dict[str, Any]:
    """Median decode + preprocess time per file and margin (0 = full), the modes interleaved so that the
    machine's drift hits them alike."""
    margins = (0.0, *MARGINS)
    times: dict[str, list[float]] = {}
    for _ in range(reps):
        for size, data in files.items():
            for margin in margins:
                needs = spec.needs.times(margin) if margin else None
                t0 = time.perf_counter()
                preprocess(decode(data, LIMIT, needs=needs), spec)
                times.setdefault(f"{size} margin {margin:g}", []).append(time.perf_counter() - t0)
    return {k: {"median_ms": round(statistics.median(v) * 1000, 2)} for k, v in times.items()}


def end_to_end(path: pathlib.Path, files: dict[str, bytes], reps: int, threads: int) -> dict[str, Any]:
    from bench.images import image_cluster
    from fovea.client import Client

    out: dict[str, Any] = {}
    for margin in E2E_MARGINS:
        mode = f"margin {margin:g}"
        with tempfile.TemporaryDirectory() as tmp:
            ic = image_cluster.start(
                pathlib.Path(tmp), MODEL, path, threads, FOVEA_WORKER_JPEG_DECODE_MARGIN=str(margin)
            )
            cluster, rc, gateway, key = ic.cluster, ic.rc, ic.gateway, ic.key
            try:
                client = Client(gateway.address, key, timeout_s=60)
                for size, data in files.items():
                    for _ in range(5):
                        client.classify([data], model=MODEL, top_k=5)  # warm up
                    times = []
                    for _ in range(reps):
                        t0 = time.perf_counter()
                        client.classify([data], model=MODEL, top_k=5)
                        times.append(time.perf_counter() - t0)
                    times.sort()
                    out[f"{size} {mode}"] = {
                        "p50_ms": round(statistics.median(times) * 1000, 2),
                        "p90_ms": round(times[int(0.9 * (len(times) - 1))] * 1000, 2),
                        "calls": reps,
                    }
                    print(f"  e2e {size} {mode}: p50 {out[f'{size} {mode}']['p50_ms']} ms", flush=True)
                client.close()
                rc.close()
            finally:
                cluster.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models-dir", type=pathlib.Path, default=ROOT / "runs" / "bench" / "models")
    ap.add_argument("--reps", type=int, default=15, help="decode timings per file and mode")
    ap.add_argument("--calls", type=int, default=40, help="Classify calls per file and mode")
    ap.add_argument("--threads", type=int, default=2, help="the worker's intra-op and decode threads")
    ap.add_argument("--skip", nargs="*", default=[], choices=["accuracy", "decode", "e2e"])
    ap.add_argument("--out", type=pathlib.Path, default=ROOT / "docs" / "bench" / "jpeg_scale.json")
    args = ap.parse_args()

    import onnxruntime as ort

    path = model_path(args.models_dir)
    spec = spec_of(path)
    result: dict[str, Any] = {
        "benchmark": "bench/images/jpeg_scale.py",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "model": MODEL,
        "needs": {"short": spec.needs.short, "height": spec.needs.height, "width": spec.needs.width},
    }
    load_avg = result["machine"].get("load_avg_1m")
    files = test_files()
    if "accuracy" not in args.skip:
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        result["accuracy"] = accuracy(session, spec)
        print("\naccuracy: the model's top-1/top-5 against those after a full decode of the same file")
        print(
            f"{'files':<10}{'decode':<16}{'n':>5}{'scale':>16}{'top-1 same':>12}{'top-5 same set':>16}"
            f"{'top-5 overlap':>15}{'top-1 same, sure':>18}"
        )
        for size, ways in result["accuracy"].items():
            for way, row in ways.items():
                scales = ",".join(row["scales"])
                sure = f"{row['sure_top1_agreement']:.1%} of {row['sure_files']}" if row["sure_files"] else "-"
                print(
                    f"{size:<10}{way:<16}{row['files']:>5}{scales:>16}{row['top1_agreement']:>12.1%}"
                    f"{row['top5_same_set']:>16.1%}{row['top5_mean_overlap']:>13.2f}/5{sure:>18}"
                )
    if "decode" not in args.skip:
        result["decode_preprocess"] = decode_times(spec, files, args.reps)
        print("\ndecode + preprocess in process (median; margin 0 = full decode)")
        for k, v in result["decode_preprocess"].items():
            print(f"  {k:<18}{v['median_ms']:>9.2f} ms")
    if "e2e" not in args.skip:
        print("\nClassify through a local cluster, concurrency 1")
        e2e = end_to_end(path, files, args.calls, args.threads)
        modes = [f"margin {m:g}" for m in E2E_MARGINS]
        for mode in modes:
            e2e[f"ratio_12MP_to_1MP {mode}"] = round(e2e[f"12MP {mode}"]["p50_ms"] / e2e[f"1MP {mode}"]["p50_ms"], 2)
        result["end_to_end"] = e2e
        print(f"{'':<12}{'12 MP p50':>12}{'1 MP p50':>12}{'12/1 MP':>10}")
        for mode in modes:
            print(
                f"{mode:<12}{e2e[f'12MP {mode}']['p50_ms']:>10.1f}ms{e2e[f'1MP {mode}']['p50_ms']:>10.1f}ms"
                f"{e2e[f'ratio_12MP_to_1MP {mode}']:>10.2f}"
            )
    result["load_avg_1m_start"] = load_avg
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
