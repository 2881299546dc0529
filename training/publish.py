"""`fovea publish`: register a trained run's ONNX model(s) with the registry.

Labels, preprocessing and the model card travel inside the ONNX file's metadata (the registry
reads them from there); this adds the evaluation metrics and tags that say where the model came
from. Each variant (fp32, int8, fp16) becomes its own version of the same model, tagged
`variant`, so an alias can point at whichever one a deployment wants.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

from training.export import read_metadata
from training.pipeline import checkpoint_path, export_run

VARIANT_SUFFIX = {"fp32": "", "int8": ".int8", "fp16": ".fp16"}


def run_metrics(run_dir: pathlib.Path, variant: str) -> dict[str, float]:
    """Metrics for one variant from the run's reports (missing reports give no metrics)."""
    metrics: dict[str, float] = {}
    report_name = {"fp32": "eval_onnx.json", "int8": "eval_onnx_int8.json"}.get(variant)
    report_path = run_dir / report_name if report_name else None
    if report_path is not None and report_path.is_file():
        report = json.loads(report_path.read_text())
        metrics.update(
            {
                "top1": report["top1"],
                "top5": report["top5"],
                "macro_f1": report["macro avg"]["f1-score"],
                "weighted_f1": report["weighted avg"]["f1-score"],
                "test_samples": float(report["samples"]),
            }
        )
    int8_report = run_dir / "model.int8.json"
    if variant == "int8" and int8_report.is_file():
        speed = json.loads(int8_report.read_text())
        metrics["top1_change_points"] = speed["top1_change_points"]
        metrics["speedup_b1"] = speed["speed_b1"]["speedup"]
        metrics["latency_b1_ms"] = speed["speed_b1"]["int8_ms"]
    return metrics


def prepare_run(run: str | pathlib.Path, variants: list[str]) -> list[tuple[str, pathlib.Path, dict[str, float]]]:
    """ONNX file and metrics per variant; exports, evaluates and quantizes what is missing."""
    ckpt = checkpoint_path(run)
    run_dir = ckpt.parent
    fp32 = run_dir / "model.onnx"
    needs = {
        "export": not fp32.is_file() or not (run_dir / "eval_onnx.json").is_file(),
        "int8": "int8" in variants and not (run_dir / "model.int8.onnx").is_file(),
        "fp16": "fp16" in variants and not (run_dir / "model.fp16.onnx").is_file(),
    }
    if any(needs.values()):
        export_run(ckpt, fp32, evaluate=True, int8=needs["int8"], fp16=needs["fp16"])
    return [(v, run_dir / f"model{VARIANT_SUFFIX[v]}.onnx", run_metrics(run_dir, v)) for v in variants]


def publish(
    client: Any,
    name: str,
    artifacts: list[tuple[str, pathlib.Path, dict[str, float]]],
    *,
    tags: dict[str, str] | None = None,
    promote: str = "",
    progress: bool = False,
) -> list[Any]:
    """Register each (variant, path, metrics) as a new version of `name`; optionally point an alias
    at the first one. `client` is a fovea.client.RegistryClient. Returns the registered versions."""
    from fovea.v1 import model_pb2

    versions = []
    for variant, path, metrics in artifacts:
        meta = read_metadata(path)
        all_tags = {"variant": variant, "source": "fovea train", **(tags or {})}
        mv = model_pb2.ModelVersion(name=name, metrics=metrics, tags=all_tags, model_card=meta["model_card"])
        versions.append(client.register(path, mv, progress=progress))
    if promote and versions:
        client.set_alias(name, promote, [(versions[0].version, 100)])
    return versions
