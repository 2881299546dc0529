"""Tiny real ONNX models built with onnx.helper, for tests that must not wait on torch."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fovea.spec import META_LABELS, META_PREPROCESSING


def _image_model(graph: Any, labels: list[str], size: int, mean: float = 0.0, std: float = 1.0) -> bytes:
    """An RGB image model from its graph: labels and size x size preprocessing in its metadata."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    pre = {
        "resize_short": size,
        "crop_height": size,
        "crop_width": size,
        "mean": [mean] * 3,
        "std": [std] * 3,
        "color_mode": "RGB",
    }
    helper.set_model_props(model, {META_LABELS: json.dumps(labels), META_PREPROCESSING: json.dumps(pre)})
    onnx.checker.check_model(model)
    return model.SerializeToString()


def color_model(labels: tuple[str, ...] = ("red", "green", "blue"), size: int = 8, bias: float = 0.0) -> bytes:
    """Classifies an RGB image by its dominant channel: logits = 10 * mean colour per channel."""
    n = len(labels)
    w = np.zeros((3, n), np.float32)
    for i in range(min(3, n)):
        w[i, i] = 10.0
    b = np.full((n,), bias, np.float32)
    nodes = [
        helper.make_node("GlobalAveragePool", ["input"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "color",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", n])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    return _image_model(graph, list(labels), size)


def pixel_mean_model(
    dtype: int = TensorProto.UINT8, layout: str = "NHWC", size: int = 8, mean: float = 0.0, std: float = 1.0
) -> bytes:
    """Scores red/green/blue by the mean of each channel of what it is fed, as fed: it shows what the
    worker's preprocessing produced (raw 0-255 pixels for UINT8, normalised values for floats)."""
    axes = [1, 2] if layout == "NHWC" else [2, 3]
    shape: list[str | int] = ["N", size, size, 3] if layout == "NHWC" else ["N", 3, size, size]
    nodes = [
        helper.make_node("Cast", ["input"], ["x"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["x"], ["logits"], axes=axes, keepdims=0),
    ]
    graph = helper.make_graph(
        nodes,
        "pixel_mean",
        [helper.make_tensor_value_info("input", dtype, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
    )
    return _image_model(graph, ["red", "green", "blue"], size, mean, std)


def corner_model(size: int = 16) -> bytes:
    """Scores red/green/blue from the top-left quarter of the image only: what an explanation must find."""
    half = size // 2
    starts = numpy_helper.from_array(np.array([0, 0], np.int64), "starts")
    ends = numpy_helper.from_array(np.array([half, half], np.int64), "ends")
    axes = numpy_helper.from_array(np.array([2, 3], np.int64), "axes")
    scale = numpy_helper.from_array(np.array(3.0, np.float32), "scale")  # softmax far from saturation
    nodes = [
        helper.make_node("Slice", ["input", "starts", "ends", "axes"], ["corner"]),
        helper.make_node("ReduceMean", ["corner"], ["mean"], axes=[2, 3], keepdims=0),
        helper.make_node("Mul", ["mean", "scale"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "corner",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [starts, ends, axes, scale],
    )
    return _image_model(graph, ["red", "green", "blue"], size)


def identity_model(width: int = 4) -> bytes:
    """A zero-compute model: output = input, shape [N, width]; measures pure serving overhead."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input"], ["output"])],
        "identity",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", width])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def slow_model(size: int = 3072) -> bytes:
    """[N, 4] FP32 in, the same out, after multiplying two size x size matrices made from the input
    (not foldable at load time): a call that stays in flight long enough for a test to act on it."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["input"], ["total"], keepdims=0),
            helper.make_node(
                "Constant", [], ["square"], value=helper.make_tensor("square", TensorProto.INT64, [2], [size, size])
            ),
            helper.make_node("Expand", ["total", "square"], ["matrix"]),
            helper.make_node("MatMul", ["matrix", "matrix"], ["product"]),
            helper.make_node("ReduceMax", ["product"], ["peak"], keepdims=0),
            helper.make_node("Constant", [], ["zero"], value=helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])),
            helper.make_node("Mul", ["peak", "zero"], ["nothing"]),
            helper.make_node("Add", ["input", "nothing"], ["output"]),
        ],
        "slow",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def sink_model(shape: tuple[int, int, int] = (3, 224, 224), keep: int = 1000) -> bytes:
    """Almost no compute: [N, *shape] FP32 in, the first `keep` values of each sample out. With the
    default shape it moves the bytes of an ImageNet-sized request and a 1000-class answer, so that a
    benchmark sees only what serving the call costs."""
    size = int(np.prod(shape))
    const = [
        helper.make_node("Constant", [], [n], value=helper.make_tensor(n, TensorProto.INT64, [len(v)], v))
        for n, v in (("flat_shape", [0, size]), ("starts", [0]), ("ends", [keep]), ("axes", [1]))
    ]
    graph = helper.make_graph(
        [
            *const,
            helper.make_node("Reshape", ["input", "flat_shape"], ["flat"]),
            helper.make_node("Slice", ["flat", "starts", "ends", "axes"], ["output"]),
        ],
        "sink",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", *shape])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["N", keep])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def png(color: tuple[int, int, int], size: int = 16) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()
