"""The gateway's checks of a ModelInferRequest, so that a malformed call never reaches a worker.

One rule, one message, here. The native front (gateway/native/front.cc, `valid_request`) applies the same
rules without messages: a request it finds invalid is relayed to the Python server, which answers with these.
"""

from __future__ import annotations

from fovea.errors import InvalidArgument
from fovea.names import check_name
from fovea.oip import ELEMENT_BYTES
from inference import grpc_predict_v2_pb2 as pb

MAX_INPUTS = 16
MAX_RANK = 8
MAX_ELEMENTS = 1 << 40  # far above any message limit: only guards the product against overflow


def check_version(version: str) -> int:
    """The version asked for, 0 for none."""
    if not version:
        return 0
    if len(version) > 18 or not version.isascii() or not version.isdigit() or int(version) == 0:
        raise InvalidArgument(f"model_version must be a positive number, got {version[:40]!r}")
    return int(version)


def check_infer(request: pb.ModelInferRequest, max_top_k: int) -> None:
    """Raise InvalidArgument for a request no worker could serve."""
    check_name(request.model_name)
    check_version(request.model_version)
    if not request.inputs:
        raise InvalidArgument("no inputs: a ModelInferRequest needs at least one input tensor")
    if len(request.inputs) > MAX_INPUTS:
        raise InvalidArgument(f"{len(request.inputs)} inputs; the limit is {MAX_INPUTS}")
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidArgument(
            f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: send one per input, or none"
        )
    for i, tensor in enumerate(request.inputs):
        elements = check_tensor(tensor)
        size = ELEMENT_BYTES[tensor.datatype]
        if raw and size and len(raw[i]) != elements * size:
            raise InvalidArgument(
                f"input {tensor.name[:40]!r} has {len(raw[i])} bytes of raw contents; "
                f"shape {list(tensor.shape)} of {tensor.datatype} needs {elements * size}"
            )
    for output in request.outputs:
        check_classification(output, max_top_k)


def check_tensor(tensor: pb.ModelInferRequest.InferInputTensor) -> int:
    """Its datatype and shape; returns its element count."""
    name = tensor.name[:40]
    if tensor.datatype not in ELEMENT_BYTES:
        raise InvalidArgument(
            f"input {name!r} has unknown datatype {tensor.datatype[:20]!r}; expected one of {', '.join(ELEMENT_BYTES)}"
        )
    if not 1 <= len(tensor.shape) <= MAX_RANK:
        raise InvalidArgument(f"input {name!r} has {len(tensor.shape)} dimensions; expected 1 to {MAX_RANK}")
    elements = 1
    for dim in tensor.shape:
        if dim < 0:
            raise InvalidArgument(f"input {name!r} has a negative dimension in its shape {list(tensor.shape)}")
        elements *= dim
        if elements > MAX_ELEMENTS:
            raise InvalidArgument(f"input {name!r} has too many elements in its shape {list(tensor.shape)}")
    return elements


def check_classification(output: pb.ModelInferRequest.InferRequestedOutputTensor, max_top_k: int) -> None:
    """The classification extension's k: an int64 from 1 to max_top_k (the worker checks it against the width)."""
    if "classification" not in output.parameters:
        return
    param = output.parameters["classification"]
    name = output.name[:40]
    if param.WhichOneof("parameter_choice") != "int64_param":
        raise InvalidArgument(f"output {name!r}: the classification parameter must be an int64_param")
    k = param.int64_param
    if not 1 <= k <= max_top_k:
        raise InvalidArgument(f"output {name!r}: classification asks for {k} classes; expected 1 to {max_top_k}")
