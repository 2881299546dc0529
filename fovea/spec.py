"""Model metadata carried inside an ONNX file, and its mapping to the registry's ModelVersion.

Training writes two metadata_props into every exported model:
  fovea.labels         JSON list of class names, indexed by output position
  fovea.preprocessing  JSON object with the fields of fovea.v1.Preprocessing
                       (resize_short, crop_height, crop_width, mean, std,
                        color_mode "RGB" or "GRAYSCALE", outputs_probabilities)
"""

from __future__ import annotations

import json
from typing import Any

from fovea.oip import ONNX_TO_OIP

META_LABELS = "fovea.labels"
META_PREPROCESSING = "fovea.preprocessing"
META_MODEL_CARD = "fovea.model_card"


def preprocessing_to_dict(pre: Any) -> dict[str, Any]:
    from fovea.v1 import model_pb2

    return {
        "resize_short": pre.resize_short,
        "crop_height": pre.crop_height,
        "crop_width": pre.crop_width,
        "mean": list(pre.mean),
        "std": list(pre.std),
        "color_mode": "GRAYSCALE" if pre.color_mode == model_pb2.COLOR_MODE_GRAYSCALE else "RGB",
        "outputs_probabilities": pre.outputs_probabilities,
    }


def preprocessing_from_dict(data: dict[str, Any]) -> Any:
    from fovea.v1 import model_pb2

    mode = str(data.get("color_mode", "RGB")).upper()
    return model_pb2.Preprocessing(
        resize_short=int(data.get("resize_short", 0)),
        crop_height=int(data["crop_height"]),
        crop_width=int(data["crop_width"]),
        mean=[float(x) for x in data.get("mean", [])],
        std=[float(x) for x in data.get("std", [])],
        color_mode=model_pb2.COLOR_MODE_GRAYSCALE if mode == "GRAYSCALE" else model_pb2.COLOR_MODE_RGB,
        outputs_probabilities=bool(data.get("outputs_probabilities", False)),
    )


def version_from_onnx(model_bytes: bytes, name: str) -> Any:
    """A ModelVersion (without number or digest) read from an ONNX file's graph and metadata."""
    import onnx

    return version_from_model(onnx.load_from_string(model_bytes), name)


def version_from_model(model: Any, name: str) -> Any:
    """version_from_onnx of a parsed onnx.ModelProto."""
    from fovea.v1 import model_pb2

    props = {p.key: p.value for p in model.metadata_props}
    mv = model_pb2.ModelVersion(name=name)
    if META_LABELS in props:
        mv.labels.extend(json.loads(props[META_LABELS]))
    if META_PREPROCESSING in props:
        mv.preprocessing.CopyFrom(preprocessing_from_dict(json.loads(props[META_PREPROCESSING])))
    if META_MODEL_CARD in props:
        mv.model_card = props[META_MODEL_CARD]
    initializers = {i.name for i in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        mv.inputs.append(_tensor_spec(value, None))
    for value in model.graph.output:
        mv.outputs.append(_tensor_spec(value, ""))
    return mv


def image_layout(shape: list[int]) -> str:
    """NHWC when a 4-D input plainly ends in its channels ([N, H, W, 1 or 3]); else NCHW."""
    return "NHWC" if shape[3] in (1, 3) and shape[1] not in (1, 3) else "NCHW"


def _tensor_spec(value: Any, layout: str | None) -> Any:
    """layout None: guessed from the shape (inputs); "" for none (outputs)."""
    from fovea.v1 import model_pb2

    ttype = value.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else -1 for d in ttype.shape.dim]
    if layout is None:
        layout = image_layout(shape) if len(shape) == 4 else ""
    return model_pb2.TensorSpec(
        name=value.name,
        datatype=ONNX_TO_OIP.get(ttype.elem_type, "UNKNOWN"),
        shape=shape,
        layout=layout if len(shape) == 4 else "",
    )
