"""Open Inference Protocol tensors: data types, BYTES framing, and checked conversions to NumPy."""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fovea.errors import InvalidArgument


@dataclass(frozen=True)
class DType:
    """One Open Inference Protocol datatype and what it is called elsewhere."""

    name: str  # the protocol's name, e.g. "FP32"
    numpy: Any  # NumPy's type; None where NumPy has none (BF16, BYTES)
    size: int  # bytes per element in raw contents; 0 for BYTES (length-prefixed items)
    field: str  # its InferTensorContents field; "" where the protocol has none (FP16, BF16)
    onnx: int  # onnx.TensorProto's element type
    ort: str  # ONNX Runtime's type string in the Python API


# The one table of datatypes. Every mapping below is derived from it, and so is the native parts' table,
# fovea/oip_dtypes.h (`python -m fovea.oip` writes it; tests/test_dtypes.py checks that it is current).
DTYPES = (
    DType("BOOL", np.bool_, 1, "bool_contents", 9, "tensor(bool)"),
    DType("UINT8", np.uint8, 1, "uint_contents", 2, "tensor(uint8)"),
    DType("INT8", np.int8, 1, "int_contents", 3, "tensor(int8)"),
    DType("UINT16", np.uint16, 2, "uint_contents", 4, "tensor(uint16)"),
    DType("INT16", np.int16, 2, "int_contents", 5, "tensor(int16)"),
    DType("FP16", np.float16, 2, "", 10, "tensor(float16)"),
    DType("BF16", None, 2, "", 16, "tensor(bfloat16)"),
    DType("UINT32", np.uint32, 4, "uint_contents", 12, "tensor(uint32)"),
    DType("INT32", np.int32, 4, "int_contents", 6, "tensor(int32)"),
    DType("FP32", np.float32, 4, "fp32_contents", 1, "tensor(float)"),
    DType("UINT64", np.uint64, 8, "uint64_contents", 13, "tensor(uint64)"),
    DType("INT64", np.int64, 8, "int64_contents", 7, "tensor(int64)"),
    DType("FP64", np.float64, 8, "fp64_contents", 11, "tensor(double)"),
    DType("BYTES", None, 0, "bytes_contents", 8, "tensor(string)"),
)
OIP_TO_NUMPY: dict[str, Any] = {d.name: d.numpy for d in DTYPES if d.numpy is not None}
NUMPY_TO_OIP = {np.dtype(v).str: k for k, v in OIP_TO_NUMPY.items()}
TYPED_FIELD = {d.name: d.field for d in DTYPES if d.field}
ELEMENT_BYTES = {d.name: d.size for d in DTYPES}
ONNX_TO_OIP = {d.onnx: d.name for d in DTYPES}
ORT_TO_NUMPY = {d.ort: d.numpy for d in DTYPES if d.numpy is not None}
ONNX_TO_NUMPY = {d.onnx: d.numpy for d in DTYPES if d.numpy is not None}


def oip_dtype(array: np.ndarray) -> str:
    return NUMPY_TO_OIP[array.dtype.str if array.dtype.byteorder != ">" else array.dtype.newbyteorder("<").str]


def encode_bytes(items: list[bytes]) -> bytes:
    """BYTES raw framing: each element preceded by its length as a 4-byte little-endian integer."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


def decode_bytes(raw: bytes, count: int) -> list[bytes]:
    out, pos = [], 0
    view = memoryview(raw)
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise InvalidArgument("BYTES tensor is truncated: a 4-byte length prefix is cut off")
        (size,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + size > len(raw):
            raise InvalidArgument("BYTES tensor is truncated: an element is shorter than its length prefix")
        out.append(bytes(view[pos : pos + size]))
        pos += size
    if len(out) != count:
        raise InvalidArgument(f"BYTES tensor holds {len(out)} elements but its shape says {count}")
    return out


def element_count(shape: list[int]) -> int:
    n = 1
    for d in shape:
        if d < 0:
            raise InvalidArgument(f"negative dimension in shape {shape}")
        n *= d
    return n


def bytes_input(tensor: Any, raw: bytes | None, max_items: int) -> list[bytes]:
    """The elements of a BYTES input (encoded images), from raw or typed contents."""
    shape = list(tensor.shape)
    count = element_count(shape)
    if count > max_items:
        raise InvalidArgument(f"input {tensor.name!r} holds {count} elements; the limit is {max_items}")
    if raw is not None:
        return decode_bytes(raw, count)
    items = list(tensor.contents.bytes_contents)
    if len(items) != count:
        raise InvalidArgument(f"input {tensor.name!r} has {len(items)} bytes_contents for shape {shape}")
    return items


def parameter_value(param: Any) -> Any:
    which = param.WhichOneof("parameter_choice")
    return getattr(param, which) if which else None


def model_metadata(mv: Any, versions: list[str]) -> Any:
    from inference import grpc_predict_v2_pb2 as pb

    resp = pb.ModelMetadataResponse(name=mv.name, versions=versions, platform="onnxruntime_onnx")
    for spec in mv.inputs:
        resp.inputs.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
    for spec in mv.outputs:
        resp.outputs.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
    return resp


def model_config(
    mv: Any,
    max_batch_size: int,
    *,
    preferred_batch_sizes: list[int] | None = None,
    max_queue_delay_us: int = 0,
    instances: int = 0,
    gpu_id: int | None = None,
) -> Any:
    """Triton's ModelConfig for a model version, for the tools that ask for one (perf_analyzer,
    tritonclient's get_model_config). Triton leaves the batch dimension out of dims when
    max_batch_size > 0; a model whose tensors have no leading -1 is reported as unbatched."""
    from inference import model_config_pb2 as mc

    batched = max_batch_size > 0 and all(s.shape and s.shape[0] == -1 for s in [*mv.inputs, *mv.outputs])
    skip = 1 if batched else 0
    cfg = mc.ModelConfig(
        name=mv.name,
        platform="onnxruntime_onnx",
        backend="onnxruntime",
        max_batch_size=max_batch_size if batched else 0,
    )
    for spec in mv.inputs:
        cfg.input.add(name=spec.name, data_type=config_type(spec.datatype), dims=list(spec.shape)[skip:])
    for spec in mv.outputs:
        cfg.output.add(
            name=spec.name,
            data_type=config_type(spec.datatype),
            dims=list(spec.shape)[skip:],
            label_filename="labels.txt" if mv.labels else "",
        )
    if preferred_batch_sizes is not None:
        cfg.dynamic_batching.preferred_batch_size.extend(preferred_batch_sizes)
        cfg.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    if instances:
        kind = mc.ModelInstanceGroup.KIND_CPU if gpu_id is None else mc.ModelInstanceGroup.KIND_GPU
        cfg.instance_group.add(name=mv.name, count=instances, kind=kind, gpus=[] if gpu_id is None else [gpu_id])
    return cfg


def config_type(datatype: str) -> int:
    """The protocol's datatype name as Triton's DataType enum value (BYTES is TYPE_STRING there)."""
    from inference import model_config_pb2 as mc

    name = "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"
    return mc.DataType.Value(name) if name in mc.DataType.keys() else mc.TYPE_INVALID


DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


def merge_statistics(reports: Iterable[Any]) -> Any:
    """Sum ModelStatisticsResponses per (model, version); last_inference is the latest."""
    from inference import grpc_predict_v2_pb2 as pb

    merged: dict[tuple[str, str], pb.ModelStatistics] = {}
    batches: dict[tuple[str, str, int], pb.InferBatchStatistics] = {}
    for report in reports:
        for st in report.model_stats:
            key = (st.name, st.version)
            out = merged.setdefault(key, pb.ModelStatistics(name=st.name, version=st.version))
            out.last_inference = max(out.last_inference, st.last_inference)
            out.inference_count += st.inference_count
            out.execution_count += st.execution_count
            for field in DURATIONS:
                total, part = getattr(out.inference_stats, field), getattr(st.inference_stats, field)
                total.count += part.count
                total.ns += part.ns
            for b in st.batch_stats:
                bkey = (*key, b.batch_size)
                if bkey not in batches:
                    batches[bkey] = out.batch_stats.add(batch_size=b.batch_size)
                for field in ("compute_input", "compute_infer", "compute_output"):
                    total, part = getattr(batches[bkey], field), getattr(b, field)
                    total.count += part.count
                    total.ns += part.ns
    return pb.ModelStatisticsResponse(model_stats=[merged[k] for k in sorted(merged)])


HEADER = "oip_dtypes.h"


def c_header() -> str:
    """fovea/oip_dtypes.h: DTYPES for the native parts (name, bytes per element, ONNX element type, and whether
    it is a plain number, which the worker's native compute takes)."""
    rows = "\n".join(f'    {{"{d.name}", {d.size}, {d.onnx}, {str(d.numpy is not None).lower()}}},' for d in DTYPES)
    return f"""// Generated by `python -m fovea.oip` from fovea/oip.py DTYPES, the one table of the Open Inference
// Protocol's datatypes. Do not edit: tests/test_dtypes.py fails when this file and the table differ.
#pragma once

#include <cstring>

namespace fovea::oip {{

struct DType {{
  const char* name;  // the protocol's name, e.g. "FP32"
  int size;          // bytes per element in raw contents; 0 for BYTES (length-prefixed items)
  int onnx;          // onnx.TensorProto's element type (ONNX Runtime's ONNXTensorElementDataType)
  bool numeric;      // a plain number NumPy has (not BF16, not BYTES)
}};

inline constexpr DType kDtypes[] = {{
{rows}
}};

// The row of a datatype name, or nullptr for a name the protocol does not have.
inline const DType* dtype(const char* name) {{
  for (const DType& d : kDtypes)
    if (std::strcmp(d.name, name) == 0) return &d;
  return nullptr;
}}

// The row of an ONNX element type, or nullptr for one the protocol cannot carry.
inline const DType* dtype_of_onnx(int onnx) {{
  for (const DType& d : kDtypes)
    if (d.onnx == onnx) return &d;
  return nullptr;
}}

}}  // namespace fovea::oip
"""


if __name__ == "__main__":
    import pathlib

    out = pathlib.Path(__file__).with_name(HEADER)
    out.write_text(c_header())
    print(f"wrote {out}")
