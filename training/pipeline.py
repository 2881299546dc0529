"""The steps after training, on a run directory: export, evaluate, quantize.

A run directory (written by training.train) holds last.pt, whose `meta` names the model, the
dataset, the labels and the preprocessing spec, so every step here needs only that path.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np
import torch

from training.augment import normalize
from training.checkpoint import load_checkpoint, model_from_checkpoint
from training.datasets import Dataset, load_dataset
from training.evaluate import classification_metrics, evaluate_both, predict_onnx, write_report
from training.export import export_onnx
from training.quantize import compare_speed, convert_fp16, quantize_int8


def checkpoint_path(path: str | pathlib.Path) -> pathlib.Path:
    path = pathlib.Path(path)
    return path / "last.pt" if path.is_dir() else path


def default_model_card(meta: dict[str, Any], metrics: dict[str, Any] | None) -> str:
    """A short markdown card: what the model is, what it was trained on, how well it does."""
    pre = meta["preprocessing"]
    lines = [
        f"# {meta['model']} on {meta['dataset']}",
        "",
        f"- Architecture: `{meta['model']}` from Fovea's model table (training/models.py).",
        f"- Data: {meta['dataset']}, {len(meta['labels'])} classes, {meta['image_size']}x{meta['image_size']} "
        f"{pre['color_mode']} input.",
        f"- Preprocessing: resize_short {pre['resize_short']}, crop {pre['crop_height']}x{pre['crop_width']}, "
        f"mean {pre['mean']}, std {pre['std']}.",
    ]
    if metrics:
        lines.append(
            f"- Test split: top-1 {metrics['top1']:.2%}, top-5 {metrics['top5']:.2%}, "
            f"macro F1 {metrics['macro avg']['f1-score']:.4f} on {metrics['samples']} images."
        )
    return "\n".join(lines) + "\n"


def _dataset(meta: dict[str, Any], data_dir: str | None = None) -> Dataset:
    return load_dataset(meta["dataset"], data_dir or meta.get("data_dir"), meta["image_size"])


def calibration_batch(data: Dataset, preprocessing: dict[str, Any], n: int, seed: int = 0) -> np.ndarray:
    """n random training images, preprocessed as the worker would (never test images)."""
    index = np.random.default_rng(seed).permutation(len(data.train))[:n]
    x = torch.from_numpy(data.train.images[np.sort(index)])
    return normalize(x, torch.tensor(preprocessing["mean"]), torch.tensor(preprocessing["std"])).numpy()


def export_run(
    checkpoint: str | pathlib.Path,
    out: str | pathlib.Path | None = None,
    *,
    atol: float = 1e-4,
    opset: int | None = None,
    dynamo: bool = True,
    model_card: str | None = None,
    evaluate: bool = False,
    int8: bool = False,
    fp16: bool = False,
    calibration_images: int = 512,
    data_dir: str | None = None,
) -> dict[str, Any]:
    """Export a checkpoint to ONNX; optionally evaluate it and write INT8 / fp16 variants.

    Returns a summary with the export report and, when asked, evaluation and quantization reports
    (also written as JSON next to the model).
    """
    ckpt = checkpoint_path(checkpoint)
    state = load_checkpoint(ckpt)
    meta = state["meta"]
    model = model_from_checkpoint(state)
    out = pathlib.Path(out) if out else ckpt.parent / "model.onnx"
    run_dir = out.parent
    eval_file = ckpt.parent / "eval_torch.json"
    metrics = json.loads(eval_file.read_text()) if eval_file.is_file() else None
    example = torch.zeros(1, meta["in_channels"], meta["image_size"], meta["image_size"])
    report = export_onnx(
        model,
        example,
        out,
        labels=meta["labels"],
        preprocessing=meta["preprocessing"],
        model_card=model_card or default_model_card(meta, metrics),
        atol=atol,
        opset=opset,
        dynamo=dynamo,
    )
    summary: dict[str, Any] = {"export": report}
    data = _dataset(meta, data_dir) if (evaluate or int8) else None
    if evaluate and data is not None:
        summary["evaluation"] = evaluate_both(
            model, out, data.test.images, data.test.labels, data.classes, meta["preprocessing"], run_dir
        )
    if int8 and data is not None:
        summary["int8"] = quantize_and_measure(out, data, meta["preprocessing"], calibration_images)
    if fp16:
        summary["fp16"] = convert_fp16(out, out.with_name(out.stem + ".fp16.onnx"))
    (run_dir / f"{out.stem}.export.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def quantize_and_measure(
    fp32_path: pathlib.Path, data: Dataset, preprocessing: dict[str, Any], calibration_images: int = 512
) -> dict[str, Any]:
    """INT8 variant of fp32_path with its accuracy change on the test split and batch-1 speed-up."""
    int8_path = fp32_path.with_name(fp32_path.stem + ".int8.onnx")
    report = quantize_int8(fp32_path, int8_path, calibration_batch(data, preprocessing, calibration_images))
    fp32 = classification_metrics(
        data.test.labels, predict_onnx(fp32_path, data.test.images, preprocessing), data.classes
    )
    int8 = classification_metrics(
        data.test.labels, predict_onnx(int8_path, data.test.images, preprocessing), data.classes
    )
    write_report(int8, data.classes, fp32_path.parent, "eval_onnx_int8", {"onnx": str(int8_path)})
    one = calibration_batch(data, preprocessing, 1, seed=1)
    report.update(
        {
            "fp32_top1": fp32["top1"],
            "int8_top1": int8["top1"],
            "top1_change_points": 100 * (int8["top1"] - fp32["top1"]),
            # One thread is the stable figure: at 2 threads a sub-millisecond run is dominated by
            # thread-pool wake-ups, and the ratio swung between 1.5x and 3.7x on the same files.
            "speed_b1": compare_speed(fp32_path, int8_path, one, threads=1),
            "speed_b1_2threads": compare_speed(fp32_path, int8_path, one, threads=2),
        }
    )
    (fp32_path.parent / f"{int8_path.stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def evaluate_run(
    checkpoint: str | pathlib.Path,
    onnx_path: str | pathlib.Path | None = None,
    *,
    data_dir: str | None = None,
    out_dir: str | pathlib.Path | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Evaluate a checkpoint (and an ONNX file, when given) on its dataset's test split."""
    ckpt = checkpoint_path(checkpoint)
    state = load_checkpoint(ckpt)
    meta = state["meta"]
    data = _dataset(meta, data_dir)
    model = model_from_checkpoint(state).to(device)
    return evaluate_both(
        model,
        onnx_path,
        data.test.images,
        data.test.labels,
        data.classes,
        meta["preprocessing"],
        out_dir or ckpt.parent,
        device=device,
    )
