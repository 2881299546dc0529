"""Checks an uploaded ONNX artifact against its declared metadata before anything is stored.

Validation reads the upload's temporary file in a child process (validate_upload): parsing,
checking and loading the graph in ONNX Runtime hold the model in memory several times over,
and a hostile file may crash a parser. The registry process itself then holds no more than the
upload's current chunk, and gets back the completed ModelVersion or the reason for refusing.
"""

from __future__ import annotations

import multiprocessing
import pathlib
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from fovea.errors import InvalidArgument
from fovea.onnxfile import refuse_external_data
from fovea.spec import META_LABELS, META_MODEL_CARD, version_from_model

MAX_LABELS = 100_000
MAX_LABEL_CHARS = 256
MAX_LABELS_BYTES = 2 * 1024 * 1024
"""All labels together, UTF-8 (ImageNet-21k's 21,843 labels take under 1 MiB)."""
MAX_MODEL_CARD_CHARS = 64 * 1024
MAX_VERSION_BYTES = 4 * 1024 * 1024
"""The whole ModelVersion as stored in Redis and sent to every worker and gateway."""
CHILD_PRELOAD = ["registry.validate", "onnx", "onnxruntime", "numpy"]


def check_labels_and_card(mv: Any, source: str) -> None:
    """Bounds on labels and the model card, wherever they came from (source says where, for the message)."""
    count = len(mv.labels)
    total = sum(len(label.encode()) for label in mv.labels)
    longest = max((len(label) for label in mv.labels), default=0)
    if count > MAX_LABELS or longest > MAX_LABEL_CHARS or total > MAX_LABELS_BYTES:
        raise InvalidArgument(
            f"{source}: {count} labels, the longest {longest} characters, {total} bytes in all; "
            f"at most {MAX_LABELS} labels of up to {MAX_LABEL_CHARS} characters and {MAX_LABELS_BYTES} bytes in all"
        )
    if len(mv.model_card) > MAX_MODEL_CARD_CHARS:
        raise InvalidArgument(
            f"{source}: the model card has {len(mv.model_card)} characters; the limit is {MAX_MODEL_CARD_CHARS}"
        )


def _dims_match(declared: list[int], actual: list[int]) -> bool:
    if len(declared) != len(actual):
        return False
    return all(d == a or (d == -1 and a == -1) for d, a in zip(declared, actual, strict=False))


def _check_tensors(kind: str, declared: Any, actual: Any) -> None:
    if len(declared) != len(actual):
        raise InvalidArgument(
            f"declared {len(declared)} {kind}s but the ONNX graph has {len(actual)}: "
            + ", ".join(t.name for t in actual[:20])
        )
    for d, a in zip(declared, actual, strict=False):
        if d.name != a.name:
            raise InvalidArgument(f"declared {kind} {d.name!r} but the graph's {kind} is {a.name!r}")
        if d.datatype and d.datatype != a.datatype:
            raise InvalidArgument(f"{kind} {d.name!r}: declared {d.datatype}, graph has {a.datatype}")
        if list(d.shape) and not _dims_match(list(d.shape), list(a.shape)):
            raise InvalidArgument(
                f"{kind} {d.name!r}: declared shape {list(d.shape)}, graph has {list(a.shape)} (-1 = dynamic)"
            )


def validate_upload(path: pathlib.Path, declared: Any) -> Any:
    """validate_artifact of the file at path, in a fresh child process; blocks (run it in a thread).

    The child forks from a server that has onnx and onnxruntime imported already, so it starts in
    milliseconds, and it exits when done, giving its memory back.
    """
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(CHILD_PRELOAD)
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        try:
            result, refusal = pool.submit(_validate_in_child, str(path), declared.SerializeToString()).result()
        except BrokenProcessPool:
            raise InvalidArgument(
                "the model could not be validated: the validating process died loading it (crash or out of memory)"
            ) from None
    if refusal:
        raise InvalidArgument(refusal)
    return type(declared).FromString(result)


def _validate_in_child(path: str, declared_bytes: bytes) -> tuple[bytes, str]:
    """The child's side: (ModelVersion bytes, "") or (b"", the reason it is refused)."""
    from fovea.v1 import model_pb2

    try:
        return validate_artifact(path, model_pb2.ModelVersion.FromString(declared_bytes)).SerializeToString(), ""
    except InvalidArgument as exc:
        return b"", str(exc)


def validate_artifact(path: str, declared: Any) -> Any:
    """Return the declared ModelVersion completed from the graph, or raise InvalidArgument.

    Refuses external-data tensors before anything else reads the file, then runs onnx.checker
    and a CPU load in ONNX Runtime; declared inputs, outputs, labels and preprocessing must
    agree with the graph. Blank fields are filled from the graph and its fovea.* metadata, and
    what is filled in must pass the same bounds as what a caller declares.
    """
    import onnx
    import onnxruntime as ort

    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the caller's bad input
        raise InvalidArgument(f"not a valid ONNX model: {str(exc)[:300]}") from None
    refuse_external_data(model)
    try:
        graph_version = version_from_model(model, declared.name)
        onnx.checker.check_model(model)
    except Exception as exc:  # noqa: BLE001
        raise InvalidArgument(f"not a valid ONNX model: {str(exc)[:300]}") from None
    del model  # before ONNX Runtime loads its own copy
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 4  # a bad upload is the caller's error, not a log line
        options.intra_op_num_threads = 1
        session = ort.InferenceSession(path, sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        raise InvalidArgument(f"ONNX Runtime cannot load the model: {str(exc)[:300]}") from None

    result = type(declared)()
    result.CopyFrom(declared)
    if result.inputs:
        _check_tensors("input", result.inputs, graph_version.inputs)
        for d, a in zip(result.inputs, graph_version.inputs, strict=False):
            d.datatype = d.datatype or a.datatype
            d.layout = d.layout or a.layout
            if not d.shape:
                d.shape.extend(a.shape)
    else:
        result.inputs.extend(graph_version.inputs)
    if result.outputs:
        _check_tensors("output", result.outputs, graph_version.outputs)
    else:
        result.outputs.extend(graph_version.outputs)
    from_file = []
    if not result.labels and graph_version.labels:
        result.labels.extend(graph_version.labels)
        from_file.append(META_LABELS)
    if not result.HasField("preprocessing") and graph_version.HasField("preprocessing"):
        result.preprocessing.CopyFrom(graph_version.preprocessing)
    if not result.model_card and graph_version.model_card:
        result.model_card = graph_version.model_card
        from_file.append(META_MODEL_CARD)
    check_labels_and_card(result, f"read from the ONNX file ({', '.join(from_file)})" if from_file else "declared")
    if result.ByteSize() > MAX_VERSION_BYTES:
        raise InvalidArgument(
            f"the model's metadata takes {result.ByteSize()} bytes (inputs, outputs, labels, card, tags); "
            f"the limit is {MAX_VERSION_BYTES}"
        )

    for spec in [*result.inputs, *result.outputs]:
        if len(spec.layout) > 16 or (spec.layout and not spec.layout.isalpha()):
            raise InvalidArgument(f"layout of {spec.name!r} must be letters such as NCHW, up to 16")
    for spec in result.inputs:
        if not spec.shape or spec.shape[0] != -1:
            raise InvalidArgument(f"input {spec.name!r} needs a dynamic batch axis (first dimension -1)")
    out = result.outputs[0]
    if result.labels and out.shape and out.shape[-1] > 0 and out.shape[-1] != len(result.labels):
        raise InvalidArgument(f"{len(result.labels)} labels for an output of {out.shape[-1]} classes")
    if result.HasField("preprocessing"):
        _check_preprocessing(result)
    _smoke_run(session, result)
    return result


NUMPY_DTYPES = {
    "FP32": "float32",
    "FP16": "float16",
    "FP64": "float64",
    "UINT8": "uint8",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
}
SMOKE_BATCH = 2


def _smoke_run(session: Any, mv: Any) -> None:
    """Run a batch of SMOKE_BATCH zero inputs: proves the batch axis really is dynamic.

    Exports often mark the batch axis dynamic while a Reshape inside still assumes
    batch 1; such a model passes the checker and loads, then fails on the first
    batched request. Skipped when other dimensions are dynamic too (no safe size).
    """
    import numpy as np

    feeds = {}
    for spec in mv.inputs:
        dims = list(spec.shape)[1:]
        if any(d <= 0 for d in dims) or spec.datatype not in NUMPY_DTYPES:
            return
        if int(np.prod(dims)) > 64 * 1024 * 1024:
            return
        feeds[spec.name] = np.zeros([SMOKE_BATCH, *dims], dtype=NUMPY_DTYPES[spec.datatype])
    try:
        outputs = session.run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - the model's failure is the caller's bad input
        raise InvalidArgument(
            f"the model fails on a batch of {SMOKE_BATCH} (is the batch axis really dynamic?): {str(exc)[:300]}"
        ) from None
    for spec, out in zip(mv.outputs, outputs, strict=False):
        if out.ndim == 0 or out.shape[0] != SMOKE_BATCH:
            raise InvalidArgument(
                f"output {spec.name!r} has shape {list(out.shape)} for a batch of "
                f"{SMOKE_BATCH}; its first axis must be the batch"
            )
        declared = list(spec.shape)[1:]
        mismatch = any(d > 0 and d != a for d, a in zip(declared, out.shape[1:], strict=False))
        if len(declared) == out.ndim - 1 and mismatch:
            raise InvalidArgument(
                f"output {spec.name!r} has shape {list(out.shape)[1:]} per sample, declared {declared}"
            )
    first = outputs[0] if outputs else None
    if mv.labels and first is not None and first.ndim >= 2 and first.shape[-1] != len(mv.labels):
        raise InvalidArgument(f"{len(mv.labels)} labels, but the model scores {first.shape[-1]} classes")


def _check_preprocessing(mv: Any) -> None:
    from fovea.v1 import model_pb2

    pre = mv.preprocessing
    spec = mv.inputs[0]
    if spec.layout not in ("", "NCHW", "NHWC"):
        raise InvalidArgument(f"image preprocessing feeds NCHW or NHWC tensors; input {spec.name!r} is {spec.layout}")
    if len(spec.shape) != 4:
        raise InvalidArgument(f"image preprocessing needs a 4-D image input; {spec.name!r} is {list(spec.shape)}")
    if spec.datatype not in ("FP32", "FP16", "UINT8"):
        raise InvalidArgument(f"image preprocessing feeds FP32, FP16 or UINT8 inputs; {spec.name!r} is {spec.datatype}")
    if spec.datatype == "UINT8" and (any(m != 0 for m in pre.mean) or any(v != 1 for v in pre.std)):
        raise InvalidArgument(
            f"input {spec.name!r} takes UINT8 pixels (0-255) as they are: "
            "preprocessing mean and std cannot apply; leave them unset"
        )
    channels = 1 if pre.color_mode == model_pb2.COLOR_MODE_GRAYSCALE else 3
    if spec.layout == "NHWC":
        _, h, w, c = spec.shape
    else:
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
