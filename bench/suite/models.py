"""The suite's models, built or exported once and cached under the work dir (runs/bench/models).

identity      zero-compute ONNX model (output = input, FP32 [N, 4]): pure serving overhead per hop
cifar-cnn     training's small CNN at CIFAR size (3x32x32, 10 classes, random weights: speed only)
effnet-fp32   the pretrained EfficientNet-Lite0 (training.pretrained), 224x224
effnet-int8   its static QDQ INT8 copy (training.quantize.quantize_pretrained)

Not in the suite's default list, for bench/worker/memory.py:
cifar-resnet18  training's CIFAR-style ResNet-18 (11M parameters, 3x32x32, random weights): issue #19's
                "ResNet-18" whose weights the worker must hold once
"""

from __future__ import annotations

import logging
import pathlib
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
ALL = ("identity", "cifar-cnn", "effnet-fp32", "effnet-int8")
SMOKE = ("identity", "cifar-cnn")


@dataclass
class BenchModel:
    name: str
    path: pathlib.Path
    image_size: int = 0
    """Side of the generated JPEGs; 0 = a tensor model (no image preprocessing)."""
    tensor_shape: list[int] = field(default_factory=list)
    """Per-sample input shape, for the in-process ONNX Runtime ceiling."""


def identity(models_dir: pathlib.Path, width: int = 4) -> BenchModel:
    import onnx
    from onnx import TensorProto, helper

    path = models_dir / "identity.onnx"
    if not path.exists():
        graph = helper.make_graph(
            [helper.make_node("Identity", ["input"], ["output"])],
            "identity",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", width])],
            [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", width])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        path.write_bytes(model.SerializeToString())
    return BenchModel("identity", path, 0, [width])


def cifar_cnn(models_dir: pathlib.Path) -> BenchModel:
    return _cifar_export(models_dir, "cnn", "cifar-cnn")


def _cifar_export(models_dir: pathlib.Path, spec: str, name: str) -> BenchModel:
    """training's model `spec` at CIFAR size (3x32x32, 10 classes), random weights, exported once."""
    path = models_dir / f"{name}.onnx"
    if not path.exists():
        import torch

        from training.export import export_onnx
        from training.models import build_model

        torch.manual_seed(0)
        model = build_model(spec, in_channels=3, num_classes=10, image_size=32)
        pre = {
            "resize_short": 32,
            "crop_height": 32,
            "crop_width": 32,
            "mean": [0.5] * 3,
            "std": [0.5] * 3,
            "color_mode": "RGB",
        }
        # The TorchScript exporter: 0.1-0.6 s instead of dynamo's 2-8 s, which matters for --smoke.
        export_onnx(
            model,
            torch.zeros(1, 3, 32, 32),
            path,
            labels=CIFAR10_LABELS,
            preprocessing=pre,
            model_card="Benchmark model: random weights, for speed only.",
            dynamo=False,
        )
    return BenchModel(name, path, 32, [3, 32, 32])


def cifar_resnet18(models_dir: pathlib.Path) -> BenchModel:
    return _cifar_export(models_dir, "resnet18", "cifar-resnet18")


def effnet_fp32(models_dir: pathlib.Path) -> BenchModel:
    from training.pretrained import import_efficientnet_lite0

    path = import_efficientnet_lite0(models_dir / "efficientnet-lite0")
    return BenchModel("effnet-fp32", pathlib.Path(path), 256, [3, 224, 224])


def effnet_int8(models_dir: pathlib.Path) -> BenchModel:
    fp32 = effnet_fp32(models_dir).path
    path = fp32.with_name(fp32.stem + ".int8.onnx")
    if not path.exists():
        from training.quantize import quantize_pretrained

        report = quantize_pretrained(fp32)
        logger.info("int8: %s", report)
    return BenchModel("effnet-int8", path, 256, [3, 224, 224])


BUILDERS = {
    "identity": identity,
    "cifar-cnn": cifar_cnn,
    "cifar-resnet18": cifar_resnet18,
    "effnet-fp32": effnet_fp32,
    "effnet-int8": effnet_int8,
}


def prepare(names: list[str], models_dir: pathlib.Path) -> tuple[list[BenchModel], dict[str, str]]:
    """Build or reuse each model; a model that cannot be built is skipped with its reason."""
    models_dir.mkdir(parents=True, exist_ok=True)
    out, skipped = [], {}
    for name in names:
        try:
            out.append(BUILDERS[name](models_dir))
        except Exception as exc:  # noqa: BLE001 - report the gap, measure the rest
            logger.exception("cannot prepare %s", name)
            skipped[name] = f"{type(exc).__name__}: {exc}"
    return out, skipped
