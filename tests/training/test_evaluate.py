"""The evaluation report agrees with scikit-learn on the same predictions."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from sklearn.metrics import classification_report, confusion_matrix, top_k_accuracy_score

from training.evaluate import classification_metrics, write_report

CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu"]


def predictions(seed: int, n: int = 300, skill: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(CLASSES), n)
    logits = rng.standard_normal((n, len(CLASSES))).astype(np.float32)
    logits[np.arange(n), y] += skill * rng.random(n)
    return y, logits


def assert_matches_sklearn(y: np.ndarray, logits: np.ndarray) -> None:
    ours = classification_metrics(y, logits, CLASSES)
    pred = logits.argmax(1)
    present = sorted(set(y) | set(pred))
    theirs = classification_report(
        y, pred, labels=present, target_names=[CLASSES[i] for i in present], output_dict=True, zero_division=0
    )
    for i in present:
        for key in ("precision", "recall", "f1-score", "support"):
            assert ours["per_class"][CLASSES[i]][key] == pytest.approx(theirs[CLASSES[i]][key], abs=1e-12)
    for avg in ("macro avg", "weighted avg"):
        for key in ("precision", "recall", "f1-score", "support"):
            assert ours[avg][key] == pytest.approx(theirs[avg][key], abs=1e-12)
    assert ours["top1"] == pytest.approx(theirs["accuracy"] if "accuracy" in theirs else np.mean(pred == y))
    assert ours["top5"] == pytest.approx(top_k_accuracy_score(y, logits, k=5, labels=range(len(CLASSES))))
    np.testing.assert_array_equal(ours["confusion_matrix"], confusion_matrix(y, pred, labels=range(len(CLASSES))))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_report_equals_sklearn(seed: int) -> None:
    assert_matches_sklearn(*predictions(seed))


def test_report_equals_sklearn_when_a_class_is_never_seen_or_predicted() -> None:
    y, logits = predictions(3, n=80, skill=0.5)
    keep = y != 6
    y, logits = y[keep], logits[keep]
    logits[:, 6] = -100.0  # class "gnu": neither in the labels nor predicted
    logits[:, 5] = np.where(y == 5, -100.0, logits[:, 5])  # "fox" appears but is never right
    assert_matches_sklearn(y, logits)


def test_write_report_makes_json_and_png(tmp_path: pathlib.Path) -> None:
    y, logits = predictions(4)
    path = write_report(classification_metrics(y, logits, CLASSES), CLASSES, tmp_path, "eval", {"model": "x"})
    report = json.loads(path.read_text())
    assert report["model"] == "x" and report["samples"] == len(y)
    png = tmp_path / "eval_confusion.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
