"""What the harness calls: a gateway's Classify, a gateway's or worker's ModelInfer, or any server
that speaks the Open Inference Protocol over gRPC (Triton, KServe, MLServer).

Requests are serialized once, before the run; the hot loop only sends bytes and never parses a
response, so protobuf work on the client does not eat into the measured rate.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fovea import codegen, oip

codegen.require()

from fovea.v1 import image_pb2  # noqa: E402
from inference import grpc_predict_v2_pb2 as pb  # noqa: E402

KINDS = ("classify", "gateway", "worker", "oip")
CLASSIFY_METHOD = "/fovea.v1.ImageService/Classify"
INFER_METHOD = "/inference.GRPCInferenceService/ModelInfer"
METADATA_METHOD = "/inference.GRPCInferenceService/ModelMetadata"


@dataclass
class Target:
    """One endpoint and the request to send it.

    kind: classify (gateway fovea.v1 Classify, API key), gateway (gateway ModelInfer, API key),
    worker (worker ModelInfer, internal token) or oip (any OIP server; token optional).
    payload: "images" sends encoded images (Classify, or a BYTES input for ModelInfer);
    "tensor" sends random numbers of input_shape/input_dtype.
    """

    kind: str
    address: str
    model: str
    token: str = ""
    version: str = ""
    payload: str = "images"
    batch: int = 1
    top_k: int = 5
    input_name: str = ""
    input_shape: list[int] = field(default_factory=list)
    input_dtype: str = "FP32"
    output_name: str = ""
    classification: int = 0
    max_message_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown target {self.kind!r}; choose from {', '.join(KINDS)}")
        if self.payload not in ("images", "tensor"):
            raise ValueError("payload must be 'images' or 'tensor'")
        if self.kind == "classify" and self.payload != "images":
            raise ValueError("Classify takes encoded images; use payload 'images'")
        if self.kind in ("classify", "gateway", "worker") and not self.token:
            who = "an API key" if self.kind != "worker" else "a gateway's worker token (FOVEA_GATEWAY_WORKER_TOKEN)"
            raise ValueError(f"target {self.kind} needs {who}")
        if self.batch < 1:
            raise ValueError("batch must be at least 1")
        if not self.model:
            raise ValueError("a model name is needed")

    @property
    def method(self) -> str:
        return CLASSIFY_METHOD if self.kind == "classify" else INFER_METHOD

    def call_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()

    def describe(self) -> dict[str, Any]:
        """The target as JSON, without its secret."""
        out = asdict(self)
        out["token"] = "***" if self.token else ""
        return out


def discover_input(target: Target, timeout_s: float = 10.0) -> None:
    """Fill input_name/shape/dtype (and output_name) from the server's ModelMetadata when unset."""
    import grpc

    if target.input_name and (target.payload == "images" or target.input_shape):
        return
    with grpc.insecure_channel(target.address) as channel:
        call = channel.unary_unary(
            METADATA_METHOD,
            request_serializer=pb.ModelMetadataRequest.SerializeToString,
            response_deserializer=pb.ModelMetadataResponse.FromString,
        )
        meta = call(
            pb.ModelMetadataRequest(name=target.model, version=target.version),
            metadata=target.call_metadata(),
            timeout=timeout_s,
        )
    if not meta.inputs:
        raise ValueError(f"model {target.model} reports no inputs")
    first = meta.inputs[0]
    target.input_name = target.input_name or first.name
    if target.payload == "tensor" and not target.input_shape:
        target.input_shape = [target.batch if d < 0 else int(d) for d in first.shape]
        target.input_dtype = first.datatype
    if not target.output_name and meta.outputs:
        target.output_name = meta.outputs[0].name


def build_requests(target: Target, images: list[bytes], count: int = 8, seed: int = 0) -> list[bytes]:
    """Up to `count` distinct serialized requests; the run cycles through them."""
    if target.payload == "images":
        if not images:
            raise ValueError("no images to send")
        groups = [
            [images[(i * target.batch + j) % len(images)] for j in range(target.batch)]
            for i in range(min(count, max(1, len(images))))
        ]
        return [_classify(target, g) if target.kind == "classify" else _infer_images(target, g) for g in groups]
    rng = np.random.default_rng(seed)
    return [_infer_tensor(target, rng) for _ in range(count)]


def _classify(target: Target, group: list[bytes]) -> bytes:
    req = image_pb2.ClassifyRequest(model=target.model, top_k=target.top_k)
    if target.version:
        req.version = int(target.version)
    for i, data in enumerate(group):
        req.images.add(data=data, id=str(i))
    return req.SerializeToString()


def _infer_base(target: Target) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=target.model, model_version=target.version)
    if target.output_name:
        out = req.outputs.add(name=target.output_name)
        if target.classification:
            out.parameters["classification"].int64_param = target.classification
    return req


def _infer_images(target: Target, group: list[bytes]) -> bytes:
    req = _infer_base(target)
    req.inputs.add(name=target.input_name or "input", datatype="BYTES", shape=[len(group)])
    req.raw_input_contents.append(oip.encode_bytes(group))
    return req.SerializeToString()


def _infer_tensor(target: Target, rng: np.random.Generator) -> bytes:
    if not target.input_shape:
        raise ValueError("tensor payload needs an input shape (or a server that answers ModelMetadata)")
    dtype = oip.OIP_TO_NUMPY.get(target.input_dtype)
    if dtype is None:
        raise ValueError(f"unsupported input dtype {target.input_dtype}")
    shape = [target.batch if d < 0 else d for d in target.input_shape]
    if np.issubdtype(dtype, np.floating):
        array = rng.standard_normal(shape).astype(dtype)
    else:
        array = rng.integers(0, 100, shape).astype(dtype)
    req = _infer_base(target)
    req.inputs.add(name=target.input_name or "input", datatype=target.input_dtype, shape=shape)
    req.raw_input_contents.append(array.tobytes())
    return req.SerializeToString()
