"""Export a PyTorch classifier to one self-contained ONNX file that the worker can serve.

The file carries Fovea's metadata (fovea.spec: labels, preprocessing, model card), keeps the
batch axis dynamic, passes onnx.checker, and is compared with PyTorch through ONNX Runtime
before anyone gets to publish it (the shape of timm's onnx_export.py / timm/utils/onnx.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import pathlib
import time
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch

from fovea.spec import META_LABELS, META_MODEL_CARD, META_PREPROCESSING

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
PARITY_BATCH_SIZES = (1, 3)
PREPROCESSING_KEYS = {"resize_short", "crop_height", "crop_width", "mean", "std", "color_mode", "outputs_probabilities"}


class ExportError(RuntimeError):
    """The exported graph is unusable or disagrees with PyTorch."""


def export_onnx(
    model: torch.nn.Module,
    example_input: torch.Tensor,
    out_path: str | pathlib.Path,
    *,
    labels: Sequence[str],
    preprocessing: dict[str, Any],
    model_card: str = "",
    atol: float = 1e-4,
    opset: int | None = None,
    dynamo: bool = True,
) -> dict[str, Any]:
    """Export `model`, write Fovea metadata, check it, and compare it with PyTorch.

    Args:
        example_input: one NCHW float32 batch of the served shape; its batch size is ignored.
        labels: class names, one per output logit.
        preprocessing: the fovea.preprocessing object (see fovea.spec).
        dynamo: try the dynamo exporter first; the TorchScript exporter is the fallback.

    Returns a report: path, size_bytes, sha256, max_abs_diff, opset, exporter, seconds.

    Raises:
        ExportError: bad metadata, a failed check, or outputs further than `atol` from PyTorch.
    """
    started = time.perf_counter()
    out_path = pathlib.Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _check_metadata(labels, preprocessing, example_input)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            n_out = model(example_input[:1]).shape[-1]
        if n_out != len(labels):
            raise ExportError(f"model has {n_out} outputs but {len(labels)} labels were given")
        exporter = _export_graph(model, example_input, out_path, opset=opset, dynamo=dynamo)
        proto = onnx.load(str(out_path))
        _set_metadata(proto, labels, preprocessing, model_card)
        onnx.save(proto, str(out_path))
        onnx.checker.check_model(str(out_path), full_check=True)
        logger.info("checking parity with PyTorch at batch sizes %s", PARITY_BATCH_SIZES)
        max_abs_diff = check_parity(model, out_path, example_input, atol=atol)
    finally:
        model.train(was_training)
    data = out_path.read_bytes()
    report = {
        "path": str(out_path),
        "size_bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "max_abs_diff": max_abs_diff,
        "opset": _default_opset(proto),
        "exporter": exporter,
        "seconds": round(time.perf_counter() - started, 3),
    }
    logger.info(
        "exported %s (%.1f MB, max |diff| %.2e, %s exporter, opset %d) in %.1f s",
        out_path,
        len(data) / 1e6,
        max_abs_diff,
        exporter,
        report["opset"],
        report["seconds"],
    )
    return report


def check_parity(
    model: torch.nn.Module,
    onnx_path: str | pathlib.Path,
    example_input: torch.Tensor,
    *,
    atol: float = 1e-4,
    batch_sizes: Sequence[int] = PARITY_BATCH_SIZES,
    seed: int = 0,
) -> float:
    """Run random inputs through PyTorch and ONNX Runtime (CPU) and return the largest |difference|.

    Raises:
        ExportError: when any output differs by more than `atol`, or the shapes differ.
    """
    generator = torch.Generator().manual_seed(seed)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    model.eval()
    worst = 0.0
    for batch in batch_sizes:
        x = torch.randn((batch, *example_input.shape[1:]), generator=generator, dtype=example_input.dtype)
        with torch.no_grad():
            expected = model(x).numpy()
        (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})
        if got.shape != expected.shape:
            raise ExportError(f"batch {batch}: ONNX output shape {got.shape} != PyTorch {expected.shape}")
        diff = float(np.max(np.abs(got - expected)))
        worst = max(worst, diff)
        logger.info("parity at batch %d: max |diff| %.2e", batch, diff)
        # `not diff <= atol` also catches NaN, which compares false with everything.
        if not diff <= atol:
            raise ExportError(f"batch {batch}: ONNX differs from PyTorch by {diff:.3e} > atol {atol:.1e}")
    return worst


def read_metadata(onnx_path: str | pathlib.Path) -> dict[str, Any]:
    """The Fovea metadata of an exported file, decoded: labels, preprocessing, model_card."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    props = {p.key: p.value for p in proto.metadata_props}
    return {
        "labels": json.loads(props.get(META_LABELS, "[]")),
        "preprocessing": json.loads(props.get(META_PREPROCESSING, "{}")),
        "model_card": props.get(META_MODEL_CARD, ""),
    }


def _export_graph(
    model: torch.nn.Module, example_input: torch.Tensor, out_path: pathlib.Path, *, opset: int | None, dynamo: bool
) -> str:
    """Write the bare graph to out_path with a dynamic batch axis; return the exporter's name."""
    # torch.export specialises a dimension whose example size is 1, so trace with batch 2.
    example = example_input[:1].repeat(2, *([1] * (example_input.dim() - 1)))
    if dynamo:
        logger.info("exporting with the dynamo exporter (a few seconds)")
        try:
            batch = torch.export.Dim("batch", min=1, max=4096)
            with torch.no_grad():
                torch.onnx.export(
                    model,
                    (example,),
                    str(out_path),
                    input_names=[INPUT_NAME],
                    output_names=[OUTPUT_NAME],
                    dynamic_shapes=({0: batch},),
                    opset_version=opset,
                    dynamo=True,
                    external_data=False,
                )
            return "dynamo"
        except Exception as exc:  # noqa: BLE001 - any dynamo failure means: try the old exporter
            logger.warning(
                "dynamo export failed (%s: %s); falling back to the TorchScript exporter",
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
            )
            _remove_partial(out_path)
    logger.info("exporting with the TorchScript exporter")
    # Not under no_grad: the TorchScript exporter cannot handle the fused fast path that
    # nn.TransformerEncoderLayer takes under no_grad (see FACTS.md §1).
    with warnings.catch_warnings():
        # It warns that it is deprecated; we chose it knowingly as the fallback.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            str(out_path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset or 17,
            dynamo=False,
        )
    return "torchscript"


def _remove_partial(out_path: pathlib.Path) -> None:
    for path in (out_path, out_path.with_name(out_path.name + ".data")):
        path.unlink(missing_ok=True)


def _set_metadata(
    proto: onnx.ModelProto, labels: Sequence[str], preprocessing: dict[str, Any], model_card: str
) -> None:
    values = {META_LABELS: json.dumps(list(labels)), META_PREPROCESSING: json.dumps(preprocessing, sort_keys=True)}
    if model_card:
        values[META_MODEL_CARD] = model_card
    kept = [p for p in proto.metadata_props if p.key not in values]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in values.items():
        proto.metadata_props.add(key=key, value=value)


def _check_metadata(labels: Sequence[str], preprocessing: dict[str, Any], example_input: torch.Tensor) -> None:
    """Refuse metadata the worker would misread: it is cheaper to fail here than at serving time."""
    if not labels or not all(isinstance(label, str) and label for label in labels):
        raise ExportError("labels must be a non-empty list of non-empty strings")
    unknown = set(preprocessing) - PREPROCESSING_KEYS
    if unknown:
        raise ExportError(f"unknown preprocessing keys: {sorted(unknown)}")
    if example_input.dim() != 4:
        raise ExportError(f"example_input must be NCHW, got shape {tuple(example_input.shape)}")
    channels, height, width = (int(s) for s in example_input.shape[1:])
    mode = str(preprocessing.get("color_mode", "RGB")).upper()
    if mode not in ("RGB", "GRAYSCALE"):
        raise ExportError(f"color_mode must be RGB or GRAYSCALE, got {mode!r}")
    if channels != (3 if mode == "RGB" else 1):
        raise ExportError(f"color_mode {mode} does not match {channels} input channels")
    if (preprocessing.get("crop_height"), preprocessing.get("crop_width")) != (height, width):
        raise ExportError(
            f"crop {preprocessing.get('crop_height')}x{preprocessing.get('crop_width')} "
            f"does not match input {height}x{width}"
        )
    for key in ("mean", "std"):
        values = preprocessing.get(key, [])
        if len(values) != channels:
            raise ExportError(f"{key} needs {channels} values, got {len(values)}")
    if any(s <= 0 for s in preprocessing["std"]):
        raise ExportError("std values must be positive")


def _default_opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
