"""Checks an uploaded ONNX artifact against its declared metadata before anything is stored."""

from __future__ import annotations

from typing import Any

from fovea.errors import InvalidArgument
from fovea.spec import version_from_onnx


def _dims_match(declared: list[int], actual: list[int]) -> bool:
    if len(declared) != len(actual):
        return False
    return all(d == a or (d == -1 and a == -1) for d, a in zip(declared, actual))


def _check_tensors(kind: str, declared: Any, actual: Any) -> None:
    if len(declared) != len(actual):
        raise InvalidArgument(
            f"declared {len(declared)} {kind}s but the ONNX graph has {len(actual)}: "
            + ", ".join(t.name for t in actual)
        )
    for d, a in zip(declared, actual):
        if d.name != a.name:
            raise InvalidArgument(f"declared {kind} {d.name!r} but the graph's {kind} is {a.name!r}")
        if d.datatype and d.datatype != a.datatype:
            raise InvalidArgument(f"{kind} {d.name!r}: declared {d.datatype}, graph has {a.datatype}")
        if list(d.shape) and not _dims_match(list(d.shape), list(a.shape)):
            raise InvalidArgument(
                f"{kind} {d.name!r}: declared shape {list(d.shape)}, graph has {list(a.shape)} (-1 = dynamic)"
            )


def validate_artifact(data: bytes, declared: Any) -> Any:
    """Return the declared ModelVersion completed from the graph, or raise InvalidArgument.

    Runs onnx.checker and a CPU load in ONNX Runtime; declared inputs, outputs,
    labels and preprocessing must agree with the graph. Blank fields are filled
    from the graph and its fovea.* metadata.
    """
    import onnx
    import onnxruntime as ort

    try:
        graph_version = version_from_onnx(data, declared.name)
        onnx.checker.check_model(onnx.load_from_string(data))
    except Exception as exc:  # noqa: BLE001 - any parse failure is the caller's bad input
        raise InvalidArgument(f"not a valid ONNX model: {str(exc)[:300]}") from None
    try:
        ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise InvalidArgument(f"ONNX Runtime cannot load the model: {str(exc)[:300]}") from None

    result = type(declared)()
    result.CopyFrom(declared)
    if result.inputs:
        _check_tensors("input", result.inputs, graph_version.inputs)
        for d, a in zip(result.inputs, graph_version.inputs):
            d.datatype = d.datatype or a.datatype
            if not d.shape:
                d.shape.extend(a.shape)
    else:
        result.inputs.extend(graph_version.inputs)
    if result.outputs:
        _check_tensors("output", result.outputs, graph_version.outputs)
    else:
        result.outputs.extend(graph_version.outputs)
    if not result.labels:
        result.labels.extend(graph_version.labels)
    if not result.HasField("preprocessing") and graph_version.HasField("preprocessing"):
        result.preprocessing.CopyFrom(graph_version.preprocessing)
    if not result.model_card:
        result.model_card = graph_version.model_card

    for spec in result.inputs:
        if not spec.shape or spec.shape[0] != -1:
            raise InvalidArgument(f"input {spec.name!r} needs a dynamic batch axis (first dimension -1)")
    out = result.outputs[0]
    if result.labels and out.shape and out.shape[-1] > 0 and out.shape[-1] != len(result.labels):
        raise InvalidArgument(f"{len(result.labels)} labels for an output of {out.shape[-1]} classes")
    if result.HasField("preprocessing"):
        _check_preprocessing(result)
    return result


def _check_preprocessing(mv: Any) -> None:
    from fovea.v1 import model_pb2

    pre = mv.preprocessing
    spec = mv.inputs[0]
    if len(spec.shape) != 4:
        raise InvalidArgument(f"image preprocessing needs a 4-D NCHW input; {spec.name!r} is {list(spec.shape)}")
    channels = 1 if pre.color_mode == model_pb2.COLOR_MODE_GRAYSCALE else 3
    _, c, h, w = spec.shape
    if c not in (-1, channels) or h not in (-1, pre.crop_height) or w not in (-1, pre.crop_width):
        raise InvalidArgument(
            f"preprocessing makes {channels}x{pre.crop_height}x{pre.crop_width} but input "
            f"{spec.name!r} is {list(spec.shape)[1:]}"
        )
    for field in ("mean", "std"):
        values = list(getattr(pre, field))
        if values and len(values) not in (1, channels):
            raise InvalidArgument(f"preprocessing {field} has {len(values)} values for {channels} channels")
    if any(s == 0 for s in pre.std):
        raise InvalidArgument("preprocessing std must not be 0")
    if pre.crop_height == 0 or pre.crop_width == 0:
        raise InvalidArgument("preprocessing crop size must be set")
