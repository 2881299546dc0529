"""Evaluation of a classifier, in PyTorch or through ONNX Runtime, on a dataset's test split.

The report has top-1 and top-5 accuracy, per-class precision/recall/F1 with macro and weighted
averages (defined as in scikit-learn's classification_report, zero where undefined), and the
confusion matrix, written as JSON and as a PNG.
"""

from __future__ import annotations

import json
import logging
import pathlib
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from tqdm import tqdm

from training.augment import normalize

logger = logging.getLogger(__name__)


def predict_torch(
    model: torch.nn.Module,
    images: np.ndarray,
    preprocessing: dict[str, Any],
    *,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    desc: str = "eval",
) -> np.ndarray:
    """Logits for uint8 NHWC images already at the crop size, normalised as in `preprocessing`."""
    device = torch.device(device)
    mean = torch.tensor(preprocessing["mean"], device=device)
    std = torch.tensor(preprocessing["std"], device=device)
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False):
                x = normalize(torch.from_numpy(images[start : start + batch_size]).to(device), mean, std)
                out.append(model(x).float().cpu().numpy())
    finally:
        model.train(was_training)
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def predict_onnx(
    onnx_path: str | pathlib.Path,
    images: np.ndarray,
    preprocessing: dict[str, Any],
    *,
    batch_size: int = 256,
    threads: int = 0,
    desc: str = "onnx eval",
) -> np.ndarray:
    """The same as predict_torch, through ONNX Runtime on the CPU."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    mean = torch.tensor(preprocessing["mean"])
    std = torch.tensor(preprocessing["std"])
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, unit="batch", leave=False):
        x = normalize(torch.from_numpy(images[start : start + batch_size]), mean, std).numpy()
        out.append(session.run(None, {input_name: x})[0].astype(np.float32))
    return np.concatenate(out)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Rows are true classes, columns predicted ones."""
    matrix = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(matrix, (y_true, y_pred), 1)
    return matrix


def classification_metrics(y_true: np.ndarray, logits: np.ndarray, classes: Sequence[str]) -> dict[str, Any]:
    """Top-1/top-5 accuracy, per-class precision, recall, F1 and support, macro and weighted averages."""
    y_true = np.asarray(y_true, dtype=np.int64)
    n_classes = len(classes)
    y_pred = logits.argmax(axis=1)
    k = min(5, logits.shape[1])
    top_k = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    matrix = confusion_matrix(y_true, y_pred, n_classes)
    tp = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    precision = _safe_divide(tp, predicted)
    recall = _safe_divide(tp, support)
    f1 = _safe_divide(2 * precision * recall, precision + recall)
    per_class = {
        name: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1-score": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(classes)
    }
    # Like scikit-learn, averages run over classes that occur in the labels or the predictions.
    present = (support + predicted) > 0
    weights = support[present] / max(1, support.sum())

    def average(weighted: bool) -> dict[str, float]:
        values = {"precision": precision[present], "recall": recall[present], "f1-score": f1[present]}
        if weighted:
            return {m: float(np.sum(v * weights)) for m, v in values.items()}
        return {m: float(np.mean(v)) if len(v) else 0.0 for m, v in values.items()}

    total = len(y_true)
    return {
        "samples": total,
        "top1": float(tp.sum() / total) if total else 0.0,
        "top5": float(np.mean(np.any(top_k == y_true[:, None], axis=1))) if total else 0.0,
        "top_k": k,
        "per_class": per_class,
        "macro avg": {**average(False), "support": int(total)},
        "weighted avg": {**average(True), "support": int(total)},
        "confusion_matrix": matrix.tolist(),
    }


def _safe_divide(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.divide(a, b, out=np.zeros_like(a, dtype=np.float64), where=b > 0)


def save_confusion_png(
    matrix: np.ndarray | list[list[int]], classes: Sequence[str], path: str | pathlib.Path, title: str = ""
) -> None:
    """Row-normalised confusion matrix as a heat map; labels are hidden when there are too many."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    m = np.asarray(matrix, dtype=np.float64)
    rows = m / np.maximum(1, m.sum(axis=1, keepdims=True))
    n = len(classes)
    side = min(16.0, max(4.0, 0.45 * n))
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    image = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, label="fraction of true class")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if n <= 30:
        ax.set_xticks(range(n), classes, rotation=90)
        ax.set_yticks(range(n), classes)
        if n <= 12:
            for i in range(n):
                for j in range(n):
                    if m[i, j]:
                        ax.text(
                            j,
                            i,
                            str(int(m[i, j])),
                            ha="center",
                            va="center",
                            fontsize=8,
                            color="white" if rows[i, j] > 0.5 else "black",
                        )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(
    metrics: dict[str, Any],
    classes: Sequence[str],
    out_dir: str | pathlib.Path,
    name: str,
    extra: dict[str, Any] | None = None,
) -> pathlib.Path:
    """Write <name>.json and <name>_confusion.png into out_dir; return the JSON path."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {**(extra or {}), **metrics}
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    save_confusion_png(
        metrics["confusion_matrix"],
        classes,
        out_dir / f"{name}_confusion.png",
        title=f"{name}: top-1 {metrics['top1']:.2%}",
    )
    logger.info(
        "%s: top-1 %.2f%%, top-5 %.2f%%, macro F1 %.4f -> %s",
        name,
        100 * metrics["top1"],
        100 * metrics["top5"],
        metrics["macro avg"]["f1-score"],
        path,
    )
    return path


def evaluate_both(
    model: torch.nn.Module,
    onnx_path: str | pathlib.Path | None,
    images: np.ndarray,
    labels: np.ndarray,
    classes: Sequence[str],
    preprocessing: dict[str, Any],
    out_dir: str | pathlib.Path,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Evaluate in PyTorch and (when given) the ONNX file; write both reports; return a summary."""
    started = time.perf_counter()
    summary: dict[str, Any] = {}
    torch_metrics = classification_metrics(labels, predict_torch(model, images, preprocessing, device=device), classes)
    write_report(torch_metrics, classes, out_dir, "eval_torch")
    summary["torch_top1"] = torch_metrics["top1"]
    summary["torch_top5"] = torch_metrics["top5"]
    if onnx_path is not None:
        onnx_metrics = classification_metrics(labels, predict_onnx(onnx_path, images, preprocessing), classes)
        write_report(onnx_metrics, classes, out_dir, "eval_onnx", {"onnx": str(onnx_path)})
        summary["onnx_top1"] = onnx_metrics["top1"]
        summary["onnx_top5"] = onnx_metrics["top5"]
        summary["top1_gap_points"] = 100 * abs(onnx_metrics["top1"] - torch_metrics["top1"])
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return summary
