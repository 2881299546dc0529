"""The Open Inference Protocol's REST binding (KServe v2, as Triton serves it): JSON inference requests, with
the binary tensor data extension, to a pb.ModelInferRequest, and a pb.ModelInferResponse back to JSON.

Binary data extension: the header `Inference-Header-Content-Length: N` says the body's first N bytes are the
JSON; each input with parameter binary_data_size has that many bytes of raw tensor data after it, in input
order. An output asked for with parameter binary_data (or every output, with the request parameter
binary_data_output) comes back the same way. BYTES tensors in binary are the protocol's 4-byte-length framing,
which is what Fovea's image models take: one encoded image per element.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from fovea import oip
from fovea.errors import InvalidArgument
from gateway.fast_port import tensor_elements
from inference import grpc_predict_v2_pb2 as pb

HEADER_LENGTH = "Inference-Header-Content-Length"
MAX_OUTPUTS = 16
MAX_ID_LEN = 128
MAX_NAME_LEN = 256


@dataclass
class Outputs:
    """How the caller wants each output: binary or JSON (by name; `binary` for the rest), and the call's
    deadline from Triton's `timeout` request parameter (microseconds), if it set one."""

    binary: bool
    by_name: dict[str, bool]
    timeout_s: float | None = None

    def wants_binary(self, name: str) -> bool:
        return self.by_name.get(name, self.binary)


def parse_request(
    body: bytes, header_length: int | None, model: str, version: str
) -> tuple[pb.ModelInferRequest, Outputs]:
    """The request as a ModelInferRequest, every input as raw contents (what the front checks and workers read)."""
    json_part = body if header_length is None else body[:header_length]
    if header_length is not None and header_length > len(body):
        raise InvalidArgument(f"{HEADER_LENGTH} is {header_length}, but the body has only {len(body)} bytes")
    try:
        doc = json.loads(json_part, parse_constant=_not_a_number)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"the inference request is not valid JSON: {str(exc)[:200]}") from None
    except RecursionError:
        raise InvalidArgument("the inference request's JSON is nested too deeply") from None
    if not isinstance(doc, dict):
        raise InvalidArgument("the inference request must be a JSON object with an 'inputs' list")
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    rid = doc.get("id", "")
    if not isinstance(rid, str) or len(rid) > MAX_ID_LEN:
        raise InvalidArgument(f"'id' must be a string of at most {MAX_ID_LEN} characters")
    request.id = rid
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidArgument("'inputs' must be a non-empty list of tensors")
    binary = memoryview(body)[len(json_part) :]
    offset = 0
    for item in inputs:
        data, offset = _input(request, item, binary, offset)
        request.raw_input_contents.append(data)
    if offset != len(binary):
        raise InvalidArgument(
            f"the body has {len(binary)} bytes of binary data after the JSON, but the inputs' binary_data_size "
            f"add up to {offset}"
        )
    return request, _outputs(request, doc)


def _input(request: pb.ModelInferRequest, item: Any, binary: memoryview, offset: int) -> tuple[bytes, int]:
    """Add one input's description to the request; returns its raw contents and the new binary offset."""
    if not isinstance(item, dict):
        raise InvalidArgument("each input must be a JSON object with name, shape, datatype and data")
    name, shape, datatype = item.get("name"), item.get("shape"), item.get("datatype")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_LEN:
        raise InvalidArgument("each input needs a 'name' (a non-empty string)")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidArgument(f"input {name[:40]!r}: 'shape' must be a list of integers")
    if not isinstance(datatype, str):
        raise InvalidArgument(f"input {name[:40]!r}: 'datatype' must be a string such as FP32 or BYTES")
    tensor = request.inputs.add(name=name, datatype=datatype)
    try:
        tensor.shape.extend(shape)
    except ValueError:
        raise InvalidArgument(f"input {name[:40]!r}: a dimension of its shape is out of range") from None
    count = tensor_elements(tensor.SerializeToString())  # datatype, rank and element count: the front's checks
    params = item.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidArgument(f"input {name[:40]!r}: 'parameters' must be an object")
    size = params.get("binary_data_size")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise InvalidArgument(f"input {name[:40]!r}: binary_data_size must be a non-negative integer")
        if offset + size > len(binary):
            raise InvalidArgument(
                f"input {name[:40]!r}: binary_data_size {size} runs past the body's end "
                f"({len(binary) - offset} bytes left); send the header's length in {HEADER_LENGTH}"
            )
        return bytes(binary[offset : offset + size]), offset + size
    if "data" not in item:
        raise InvalidArgument(f"input {name[:40]!r} has neither 'data' nor a binary_data_size parameter")
    return _json_data(name, datatype, count, item["data"]), offset


def _json_data(name: str, datatype: str, count: int, data: Any) -> bytes:
    """A JSON tensor's values (flat or nested, row-major) as the protocol's raw bytes."""
    if datatype == "BYTES":
        items = _flat(data)
        if not all(isinstance(s, str) for s in items):
            raise InvalidArgument(f"input {name[:40]!r}: BYTES data in JSON must be strings")
        if len(items) != count:
            raise InvalidArgument(f"input {name[:40]!r}: {len(items)} values for a shape of {count} elements")
        return oip.encode_bytes([s.encode() for s in items])
    dtype = oip.OIP_TO_NUMPY.get(datatype)
    if dtype is None:
        raise InvalidArgument(f"input {name[:40]!r}: {datatype} data must be sent as binary data")
    try:
        array = np.asarray(data, dtype=dtype)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidArgument(f"input {name[:40]!r}: data is not a list of {datatype} values ({exc})"[:300]) from None
    if array.size != count:
        raise InvalidArgument(f"input {name[:40]!r}: {array.size} values for a shape of {count} elements")
    if array.dtype.kind == "f" and np.isnan(array).any():  # JSON has no NaN (refused above): these were nulls
        raise InvalidArgument(f"input {name[:40]!r}: its data holds null; every value must be a number")
    return array.astype(np.dtype(dtype).newbyteorder("<"), copy=False).tobytes()


def _not_a_number(constant: str) -> Any:
    """NaN, Infinity and -Infinity: Python's json reads them, but they are not JSON (RFC 8259), and a model fed
    one answers NaN for the whole row."""
    raise ValueError(f"{constant} is not a JSON number")


def _flat(data: Any) -> list[Any]:
    """Nested lists' leaves in row-major order; a loop, not recursion, however deep the nesting."""
    out: list[Any] = []
    stack = [iter([data])]
    while stack:
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            stack.append(iter(item))
        else:
            out.append(item)
    return out


_END = object()


def _outputs(request: pb.ModelInferRequest, doc: dict[str, Any]) -> Outputs:
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidArgument("'parameters' must be an object")
    wanted = Outputs(_flag(params, "binary_data_output", "the request"), {})
    timeout = params.get("timeout")
    if timeout is not None:
        if not isinstance(timeout, int) or isinstance(timeout, bool) or not 0 < timeout < 2**63:
            raise InvalidArgument("parameter timeout must be a positive number of microseconds")
        wanted.timeout_s = timeout / 1e6
    outputs = doc.get("outputs") or []
    if not isinstance(outputs, list) or len(outputs) > MAX_OUTPUTS:
        raise InvalidArgument(f"'outputs' must be a list of at most {MAX_OUTPUTS} objects")
    for item in outputs:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            raise InvalidArgument("each requested output must be an object with a 'name'")
        name = item["name"][:MAX_NAME_LEN]
        out = request.outputs.add(name=name)
        oparams = item.get("parameters") or {}
        if not isinstance(oparams, dict):
            raise InvalidArgument(f"output {name[:40]!r}: 'parameters' must be an object")
        if "binary_data" in oparams:
            wanted.by_name[name] = _flag(oparams, "binary_data", f"output {name[:40]!r}")
        k = oparams.get("classification")
        if k is not None:  # bounds checked by the front's checks, as for gRPC
            if not isinstance(k, int) or isinstance(k, bool) or not -(2**63) <= k < 2**63:
                raise InvalidArgument(f"output {name[:40]!r}: classification must be an integer")
            out.parameters["classification"].int64_param = k
    return wanted


def _flag(params: dict[str, Any], key: str, where: str) -> bool:
    value = params.get(key, False)
    if not isinstance(value, bool):
        raise InvalidArgument(f"{where}: parameter {key} must be true or false")
    return value


def render_response(response: pb.ModelInferResponse, wanted: Outputs) -> tuple[bytes, int | None]:
    """The JSON answer and any binary outputs after it; the JSON's length when there are binary outputs."""
    doc: dict[str, Any] = {"model_name": response.model_name, "model_version": response.model_version}
    if response.id:
        doc["id"] = response.id
    outputs, chunks = [], []
    for i, tensor in enumerate(response.outputs):
        out: dict[str, Any] = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        raw = response.raw_output_contents[i] if i < len(response.raw_output_contents) else None
        if wanted.wants_binary(tensor.name):
            data = raw if raw is not None else _typed_raw(tensor)
            out["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            out["data"] = _json_values(tensor, raw)
        outputs.append(out)
    doc["outputs"] = outputs
    header = json.dumps(doc, separators=(",", ":")).encode()
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def _json_values(tensor: pb.ModelInferResponse.InferOutputTensor, raw: bytes | None) -> list[Any]:
    count = oip.element_count(list(tensor.shape))
    if raw is None:
        field = oip.TYPED_FIELD.get(tensor.datatype)
        values = list(getattr(tensor.contents, field)) if field else []
        if tensor.datatype == "BYTES":
            return [v.decode("utf-8", "replace") for v in values]
        return values
    if tensor.datatype == "BYTES":
        return [v.decode("utf-8", "replace") for v in oip.decode_bytes(raw, count)]
    dtype = oip.OIP_TO_NUMPY.get(tensor.datatype)
    if dtype is None:
        raise InvalidArgument(f"output {tensor.name!r} is {tensor.datatype}: ask for it as binary data")
    flat: list[Any] = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).tolist()
    return flat


def _typed_raw(tensor: pb.ModelInferResponse.InferOutputTensor) -> bytes:
    """A typed-contents output in the raw layout, for a caller that asked for binary data."""
    field = oip.TYPED_FIELD.get(tensor.datatype)
    values = list(getattr(tensor.contents, field)) if field else []
    if tensor.datatype == "BYTES":
        return oip.encode_bytes(values)
    dtype = np.dtype(oip.OIP_TO_NUMPY[tensor.datatype]).newbyteorder("<")
    return np.asarray(values, dtype=dtype).tobytes()


def metadata_json(meta: pb.ModelMetadataResponse) -> dict[str, Any]:
    def tensors(items: Any) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in items]

    return {
        "name": meta.name,
        "versions": list(meta.versions),
        "platform": meta.platform,
        "inputs": tensors(meta.inputs),
        "outputs": tensors(meta.outputs),
    }


def message_json(message: Any) -> dict[str, Any]:
    """A protobuf message as Triton writes it in JSON: proto field names, enums by name, and 64-bit integers as
    numbers (protobuf's own JSON mapping writes them as strings: a model configuration's dims ["3", "8", "8"])."""
    out: dict[str, Any] = {}
    for field, value in message.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            out[field.name] = {str(k): _field_value(value_field, v) for k, v in value.items()}
        elif field.is_repeated:
            out[field.name] = [_field_value(field, v) for v in value]
        else:
            out[field.name] = _field_value(field, value)
    return out


def _field_value(field: Any, value: Any) -> Any:
    if field.message_type is not None:
        return message_json(value)
    if field.enum_type is not None:
        number = field.enum_type.values_by_number.get(value)
        return number.name if number is not None else value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value
