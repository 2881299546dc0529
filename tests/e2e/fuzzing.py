"""Property-based fuzzing of live Fovea services: hypothesis strategies for every field of ModelInfer,
Classify/ClassifyStream and the registry's requests, and the Fuzzer that sends them and judges the answers.

The property: every answer is a status from the error table (../shared/STYLE.md section 5), no service
process dies or hangs, and memory stays bounded. A violation is recorded with the request that caused it
(the smallest one seen per kind of violation), so that one run lists every finding; a dead service is
restarted on its port so that the run goes on finding more."""

from __future__ import annotations

import io
import struct
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import Message
from hypothesis import strategies as st
from PIL import Image

from fovea import oip
from fovea.v1 import image_pb2, model_pb2, registry_pb2
from inference import grpc_predict_v2_pb2 as pb
from tests.e2e.live import Live, proc_stats, restart, tokens, wait_ready
from tests.tinymodels import identity_model, png

S = grpc.StatusCode
# The error table: every status a Fovea service may answer with.
TABLE = {
    S.OK,
    S.INVALID_ARGUMENT,
    S.UNAUTHENTICATED,
    S.PERMISSION_DENIED,
    S.NOT_FOUND,
    S.ALREADY_EXISTS,
    S.FAILED_PRECONDITION,
    S.RESOURCE_EXHAUSTED,
    S.UNAVAILABLE,
}
CODE_BY_VALUE = {c.value[0]: c for c in S}
TIMEOUT_S = 10.0  # nothing the fuzzer sends should take this long: past it, the call counts as a hang

OIP = "/inference.GRPCInferenceService/"
IMAGE = "/fovea.v1.ImageService/"
REGISTRY = "/fovea.v1.RegistryService/"

# --- values -------------------------------------------------------------------------------------------------

INT64_EDGES = [0, 1, -1, 2, 3, 4, 5, 64, 65, 2**31 - 1, 2**31, -(2**31), 2**32, 2**53, 2**62, 2**63 - 1, -(2**63)]
UINT64_EDGES = [0, 1, 2, 3, 4, 100, 101, 2**31, 2**32, 2**32 + 1, 2**63 - 1, 2**63, 2**64 - 1]

int64s = st.one_of(st.sampled_from(INT64_EDGES), st.integers(-(2**63), 2**63 - 1))
uint64s = st.one_of(st.sampled_from(UINT64_EDGES), st.integers(0, 2**64 - 1))
uint32s = st.one_of(st.sampled_from([0, 1, 3, 5, 100, 101, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
doubles = st.one_of(
    st.sampled_from([0.0, -1.0, 1e308, float("inf"), float("-inf"), float("nan"), 1e-300]), st.floats(width=64)
)

WEIRD_NAMES = [
    "",
    "../../etc/passwd",
    "..",
    "ident/../colors",
    "IDENT",
    "ident\x00",
    "ident\n",
    "ident:1",
    "*",
    "fovea:model:ident",
    "a" * 64,
    "a" * 10_000,
    "модель",
    "🦀",
    "\u202eident",
    " ident",
    "nope",
    "-ident",
]
names = st.one_of(st.sampled_from(["ident", "colors", *WEIRD_NAMES]), st.text(max_size=80))
versions = st.one_of(
    st.sampled_from(
        ["", "1", "0", "-1", "2", "01", " 1", "1.0", "abc", "99999999999999999999999", "18446744073709551616"]
    ),
    st.text(max_size=24),
)
DATATYPES = ["FP32", "FP64", "FP16", "INT64", "INT32", "INT8", "UINT8", "UINT64", "BOOL", "BYTES", "", "fp32", "FP3"]
datatypes = st.one_of(st.sampled_from(DATATYPES), st.text(max_size=12))


def png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR chunk only: a header that claims any size (a decompression-bomb probe)."""
    chunk = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))


def _encoded(mode: str, fmt: str, size: int = 16, **save: Any) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (size, size), 200 if mode in ("L", "I;16", "P") else (200, 30, 30)).save(buf, format=fmt, **save)
    return buf.getvalue()


def _samples() -> list[bytes]:
    red = png((240, 20, 20))
    return [
        red,
        png((20, 240, 20), size=64),
        _encoded("RGB", "JPEG"),
        _encoded("CMYK", "JPEG"),
        _encoded("RGB", "GIF"),
        _encoded("RGB", "WEBP"),
        _encoded("I;16", "PNG"),
        _encoded("P", "PNG", transparency=0),
        _encoded("RGB", "BMP"),
        red[:40],
        red[:-12],
        png_header(100_000, 100_000),
        png_header(1, 1),
        png_header(0, 0),
        png_header(2**31 - 1, 1),
        png_header(2**32 - 1, 2**32 - 1),
        b"",
        b"GIF89a",
        b"\xff\xd8\xff",
        b"not an image",
    ]


IMAGE_SAMPLES = _samples()


@st.composite
def image_data(draw: st.DrawFn) -> bytes:
    """Valid images of several formats, truncated and lying headers, and mutations of a valid PNG."""
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return draw(st.sampled_from(IMAGE_SAMPLES))
    if kind == 1:
        return draw(st.binary(max_size=64))
    data = bytearray(draw(st.sampled_from(IMAGE_SAMPLES[:9])))
    for _ in range(draw(st.integers(1, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


# Any number for a protobuf enum field (proto3 enums are open: a receiver sees unknown values as they are).
open_enums: st.SearchStrategy[Any] = st.integers(-3, 6)


# --- the call and its target ---------------------------------------------------------------------------------


@dataclass
class Call:
    """One call to send: which port, which method, which credentials, and the request(s)."""

    # each of gateway, gateway_relayed, worker, registry: the call goes to all. gateway_relayed is the
    # gateway's one port again, with a twin of the drawn key that has a rate limit never reached: the front relays
    # its calls to the Python server, which routes them, where it answers the plain key's itself
    targets: tuple[str, ...]
    method: str
    auth: (
        str  # a name in Fuzzer.credentials, "raw:<header value>", "twice:<name>" (a garbage header, then it), or "none"
    )
    requests: list[bytes]  # one for a unary call, several for a client stream
    stream_out: bool = False
    described: str = ""


REGISTRY_AUTHS = [
    "infer",
    "publish",
    "admin",
    "admin",
    "admin-token",
    "worker-token",
    "gateway-token",
    "internal",
    "none",
]
VALID_AUTHS = ["infer", "infer", "infer", "publish", "admin", "ident-only"]
AUTHS = ["twice:infer", "bin:infer", "internal", "none"]
GARBAGE_AUTH = [
    "Bearer",
    "Bearer ",
    "bearer fv_aaaaaaaaaaaa_" + "x" * 43,
    "Basic dXNlcjpwYXNz",
    "Bearer fv_",
    "Bearer " + "x" * 8000,
    "Bearer fv_ ",
    "Token abc",
]
bad_auths = st.one_of(
    st.sampled_from(AUTHS),
    st.sampled_from(GARBAGE_AUTH).map(lambda v: "raw:" + v),
    st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60).map(lambda v: "raw:Bearer " + v),
)
# Three calls in four carry a key, so that most requests get past authentication to the code behind it.
auths = st.integers(0, 3).flatmap(lambda i: bad_auths if i == 0 else st.sampled_from(VALID_AUTHS))


def describe(msg: Message, limit: int = 600) -> str:
    """A message on one line, bytes fields shortened to their length and first bytes."""

    def walk(m: Message) -> str:
        parts = []
        for fd, value in m.ListFields():
            items = value if fd.is_repeated else [value]
            if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                items = [f"{k}: {walk(v) if isinstance(v, Message) else repr(v)}" for k, v in value.items()]
                parts.append(f"{fd.name}={{{', '.join(items)}}}")
                continue
            shown = [
                walk(v) if isinstance(v, Message) else short(v) if isinstance(v, bytes) else repr(v)[:120]
                for v in items
            ]
            parts.append(f"{fd.name}=" + (f"[{', '.join(shown)}]" if fd.is_repeated else shown[0]))
        return f"{type(m).__name__}({', '.join(parts)})"

    text = walk(msg)
    return text if len(text) <= limit else text[:limit] + "…"


def short(data: bytes) -> str:
    return f"<{len(data)} bytes {data[:12].hex()}>"


# --- ModelInfer ----------------------------------------------------------------------------------------------


@st.composite
def infer_parameters(draw: st.DrawFn) -> pb.InferParameter:
    kind = draw(st.integers(0, 5))
    p = pb.InferParameter()
    if kind <= 1:
        p.int64_param = draw(int64s)
    elif kind == 2:
        p.uint64_param = draw(uint64s)
    elif kind == 3:
        p.string_param = draw(st.sampled_from(["3", "-1", "", "2147483648", "x" * 1000]))
    elif kind == 4:
        p.double_param = draw(doubles)
    else:
        p.bool_param = draw(st.booleans())
    return p


def parameter_maps(keys: list[str]) -> st.SearchStrategy[dict[str, pb.InferParameter]]:
    return st.dictionaries(st.one_of(st.sampled_from(keys), st.text(max_size=20)), infer_parameters(), max_size=3)


classification_parameters = st.one_of(st.builds(pb.InferParameter, int64_param=int64s), infer_parameters())


@st.composite
def model_infer_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    """A request near a valid one for ident (FP32 [N,4]) or colors (images as BYTES, or FP32 [N,3,8,8]),
    with any field replaced by something hostile."""
    base = draw(st.sampled_from(["ident", "colors_bytes", "colors_fp32"]))
    req = pb.ModelInferRequest(model_name="colors" if base.startswith("colors") else "ident")
    n = draw(st.sampled_from([1, 2, 3]))
    if base == "colors_bytes":
        items = [draw(image_data()) for _ in range(n)]
        raw = oip.encode_bytes(items)
        tensor = req.inputs.add(name="input", datatype="BYTES", shape=[n])
    else:
        shape = [n, 4] if base == "ident" else [n, 3, 8, 8]
        raw = np.zeros(shape, np.float32).tobytes()
        tensor = req.inputs.add(name="input", datatype="FP32", shape=shape)
    if draw(st.booleans()):
        req.raw_input_contents.append(raw)
    elif base == "colors_bytes":
        tensor.contents.bytes_contents.extend(oip.decode_bytes(raw, n))
    else:
        tensor.contents.fp32_contents.extend(np.frombuffer(raw, np.float32).tolist())
    if draw(st.booleans()):
        out = req.outputs.add(name="logits" if base.startswith("colors") else "output")
        out.parameters["classification"].CopyFrom(draw(classification_parameters))
    mutate_infer(draw, req)
    return req


# Half the requests keep their near-valid shape (they reach the model), half get up to three hostile fields.
MUTATIONS = st.one_of(st.just(frozenset[int]()), st.sets(st.integers(0, 12), min_size=1, max_size=3))
ids = st.one_of(st.text(max_size=40), st.just("x" * 100_000))
request_parameters = parameter_maps(["classification", "priority", "timeout", "binary_data_output"])
tensor_parameters = parameter_maps(["binary_data_size", "classification"])
output_parameters = parameter_maps(["classification", "binary_data"])
shapes = st.lists(int64s, max_size=6)
size_changes = st.one_of(st.integers(-8, 8), st.integers(-100_000, 4096))
extra_raw = st.lists(st.binary(max_size=64), max_size=3)
extra_int64 = st.lists(int64s, max_size=4)
extra_bytes = st.lists(st.binary(max_size=16), max_size=3)


def mutate_infer(draw: st.DrawFn, req: pb.ModelInferRequest) -> None:
    """Replace up to three fields of the request with hostile values (a near-valid request reaches deeper)."""
    tensor = req.inputs[0]
    for m in draw(MUTATIONS):
        if m == 0:
            req.model_name = draw(names)
        elif m == 1:
            req.model_version = draw(versions)
        elif m == 2:
            req.id = draw(ids)
        elif m == 3:
            for k, v in draw(request_parameters).items():
                req.parameters[k].CopyFrom(v)
        elif m == 4:
            tensor.name = draw(names)
        elif m == 5:
            tensor.datatype = draw(datatypes)
        elif m == 6:
            tensor.ClearField("shape")
            tensor.shape.extend(draw(shapes))
        elif m == 7:
            for k, v in draw(tensor_parameters).items():
                tensor.parameters[k].CopyFrom(v)
        elif m == 8 and req.raw_input_contents:  # a raw content size that does not match the shape
            raw = req.raw_input_contents[0]
            cut = draw(size_changes)
            req.raw_input_contents[0] = raw[: max(0, len(raw) + cut)] if cut < 0 else raw + bytes(cut)
        elif m == 9:
            req.raw_input_contents.extend(draw(extra_raw))
        elif m == 10:
            extra = req.inputs.add(name=draw(names), datatype=draw(datatypes))
            extra.shape.extend(draw(shapes))
        elif m == 11:
            tensor.contents.int64_contents.extend(draw(extra_int64))
            tensor.contents.bytes_contents.extend(draw(extra_bytes))
        elif m == 12:
            out = req.outputs.add(name=draw(names))
            for k, v in draw(output_parameters).items():
                out.parameters[k].CopyFrom(v)
    if draw(st.integers(0, 19)) == 0:
        del req.inputs[:]


# --- Classify --------------------------------------------------------------------------------------------------


@st.composite
def classify_requests(draw: st.DrawFn) -> image_pb2.ClassifyRequest:
    req = image_pb2.ClassifyRequest(model=draw(st.one_of(st.just("colors"), names)))
    if draw(st.booleans()):
        req.version = draw(uint64s)
    if draw(st.integers(0, 3)) == 0:
        req.alias = draw(st.one_of(st.sampled_from(["production", "staging"]), names))
    if draw(st.booleans()):
        req.top_k = draw(uint32s)
    count = draw(st.sampled_from([0, 1, 1, 2, 3, 65]))
    data = [draw(image_data()) for _ in range(min(count, 3))]
    for i in range(count):
        req.images.add(data=data[i % len(data)], id=draw(st.text(max_size=8)) if i < 3 else str(i))
    return req


@st.composite
def classify_streams(draw: st.DrawFn) -> list[image_pb2.ClassifyStreamRequest]:
    items = draw(st.lists(classify_requests(), min_size=0, max_size=3))
    return [image_pb2.ClassifyStreamRequest(request=r, sequence=draw(uint64s)) for r in items]


# --- the calls -------------------------------------------------------------------------------------------------


def unary(targets: tuple[str, ...], method: str, auth: str, msg: Message) -> Call:
    return Call(targets, method, auth, [msg.SerializeToString()], described=describe(msg))


GATEWAY_PORTS = ("gateway", "gateway_relayed")
ALL_OIP_PORTS = ("gateway", "gateway_relayed", "worker")


@st.composite
def model_infer_calls(draw: st.DrawFn) -> Call:
    """ModelInfer to both paths of the gateway (with the drawn credentials) and a worker's one port (with the token
    gateways present, unless the drawn credentials are none at all)."""
    return unary(ALL_OIP_PORTS, OIP + "ModelInfer", draw(auths), draw(model_infer_requests()))


@st.composite
def classify_calls(draw: st.DrawFn) -> Call:
    """Classify (unary) or ClassifyStream to both ports of the gateway."""
    target = GATEWAY_PORTS
    auth = draw(auths)
    if draw(st.integers(0, 2)) == 0:
        items = draw(classify_streams())
        return Call(
            target,
            IMAGE + "ClassifyStream",
            auth,
            [i.SerializeToString() for i in items],
            stream_out=True,
            described=" | ".join(describe(i, 300) for i in items),
        )
    return unary(target, IMAGE + "Classify", auth, draw(classify_requests()))


@st.composite
def other_public_calls(draw: st.DrawFn) -> Call:
    """The rest of both public faces: OIP metadata, readiness, config, statistics and streams; GetModel, ListModels."""
    target = GATEWAY_PORTS
    auth = draw(auths)
    kind = draw(st.integers(0, 6))
    name, version = draw(names), draw(versions)
    if kind == 0:
        return unary(target, OIP + "ModelMetadata", auth, pb.ModelMetadataRequest(name=name, version=version))
    if kind == 1:
        return unary(target, OIP + "ModelReady", auth, pb.ModelReadyRequest(name=name, version=version))
    if kind == 2:
        return unary(target, OIP + "ModelConfig", auth, pb.ModelConfigRequest(name=name, version=version))
    if kind == 3:
        return unary(target, OIP + "ModelStatistics", auth, pb.ModelStatisticsRequest(name=name, version=version))
    if kind == 4:
        req = image_pb2.GetModelRequest(model=name, version=draw(uint64s), alias=draw(st.one_of(st.just(""), names)))
        return unary(target, IMAGE + "GetModel", auth, req)
    if kind == 5:
        return unary(target, IMAGE + "ListModels", auth, model_pb2.ListModelsRequest())
    items = draw(st.lists(model_infer_requests(), max_size=3))
    return Call(
        target,
        OIP + "ModelStreamInfer",
        auth,
        [i.SerializeToString() for i in items],
        stream_out=True,
        described=" | ".join(describe(i, 300) for i in items),
    )


# Models and aliases the registry fuzzer may change; the other tests' models keep their production aliases.
FUZZ_MODELS = ["fuzzed", "fuzzed-2"]


def safe_name(name: str) -> str:
    return "fuzzed" if name in ("ident", "colors") else name


@st.composite
def model_versions(draw: st.DrawFn) -> model_pb2.ModelVersion:
    mv = model_pb2.ModelVersion(name=safe_name(draw(st.one_of(st.sampled_from(FUZZ_MODELS), names))))
    if draw(st.booleans()):
        mv.labels.extend(draw(st.lists(st.one_of(st.text(max_size=20), st.just("l" * 5000)), max_size=5)))
    if draw(st.booleans()):
        mv.model_card = draw(st.sampled_from(["", "card", "c" * 70_000]))
    if draw(st.booleans()):
        mv.version = draw(uint64s)
        mv.sha256 = draw(st.sampled_from(["", "0" * 64, "zz"]))
        mv.size_bytes = draw(uint64s)
    if draw(st.booleans()):
        mv.tags.update(draw(st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3)))
        for k, v in draw(st.dictionaries(st.text(max_size=10), doubles, max_size=3)).items():
            mv.metrics[k] = v
    if draw(st.booleans()):
        pre = mv.preprocessing
        pre.resize_short, pre.crop_height, pre.crop_width = draw(uint32s), draw(uint32s), draw(uint32s)
        pre.mean.extend(draw(st.lists(st.floats(width=32), max_size=4)))
        pre.std.extend(draw(st.lists(st.floats(width=32), max_size=4)))
        pre.color_mode = draw(open_enums)
    if draw(st.booleans()):
        mv.inputs.add(name=draw(names), datatype=draw(datatypes), shape=draw(st.lists(int64s, max_size=4)))
    return mv


IDENT_ARTIFACT = identity_model()


@st.composite
def register_calls(draw: st.DrawFn) -> Call:
    mv = draw(model_versions())
    artifact = draw(st.sampled_from([IDENT_ARTIFACT, b"", b"\x08\x07garbage", IDENT_ARTIFACT[:-20]]))
    parts = [registry_pb2.RegisterModelRequest(metadata=mv)]
    shape = draw(st.integers(0, 3))
    if shape == 1:  # no metadata first
        parts = []
    if shape == 2:  # metadata twice
        parts.append(registry_pb2.RegisterModelRequest(metadata=mv))
    step = draw(st.sampled_from([7, 1024, 1 << 20]))
    parts += [registry_pb2.RegisterModelRequest(chunk=artifact[i : i + step]) for i in range(0, len(artifact), step)]
    auth = draw(st.sampled_from(["publish", "admin", "admin-token", "worker-token", "infer", "none"]))
    described = describe(mv, 400) + f" + artifact {short(artifact)} in {len(parts)} messages"
    return Call(
        ("registry",), REGISTRY + "RegisterModel", auth, [p.SerializeToString() for p in parts], False, described
    )


@st.composite
def registry_calls(draw: st.DrawFn) -> Call:
    """Every registry request but the endless watches, with any role; calls that change state only touch
    the fuzzer's own models (a heartbeat names a fuzzer-only model too, so no gateway routes to it)."""
    auth = draw(st.one_of(st.sampled_from(REGISTRY_AUTHS), auths))
    kind = draw(st.integers(0, 15))
    name, alias = draw(names), draw(st.one_of(st.sampled_from(["production", "staging"]), names))
    r = registry_pb2
    if kind == 0:
        return draw(register_calls())
    if kind == 1:
        return unary(
            ("registry",),
            REGISTRY + "GetModelVersion",
            auth,
            r.GetModelVersionRequest(model=name, version=draw(uint64s), alias=alias),
        )
    if kind == 2:
        return unary(("registry",), REGISTRY + "ListVersions", auth, r.ListVersionsRequest(model=name))
    if kind == 3:
        targets = [
            model_pb2.AliasTarget(version=draw(uint64s), weight=draw(uint32s)) for _ in range(draw(st.integers(0, 3)))
        ]
        req = r.SetAliasRequest(model=safe_name(name), alias=alias, targets=targets)
        return unary(("registry",), REGISTRY + "SetAlias", auth, req)
    if kind == 4:
        req = r.ArchiveVersionRequest(model=safe_name(name), version=draw(uint64s))
        return unary(("registry",), REGISTRY + "ArchiveVersion", auth, req)
    if kind == 5:
        req = r.DownloadArtifactRequest(model=name, version=draw(uint64s))
        return Call(("registry",), REGISTRY + "DownloadArtifact", auth, [req.SerializeToString()], True, describe(req))
    if kind == 6:
        req = r.CreateApiKeyRequest(
            role=draw(open_enums),
            model_patterns=draw(
                st.lists(st.one_of(names, st.sampled_from(["*", "ident*", "**", "[", "a" * 3000])), max_size=3)
            ),
            ttl_s=draw(uint64s),
            description=draw(st.one_of(st.text(max_size=30), st.just("d" * 100_000))),
            rate_limit_rps=draw(doubles),
            rate_limit_ips=draw(doubles),
            rate_burst=draw(doubles),
        )
        return unary(("registry",), REGISTRY + "CreateApiKey", auth, req)
    if kind == 7:
        return unary(("registry",), REGISTRY + "ListApiKeys", auth, r.ListApiKeysRequest())
    if kind == 8:
        key_id = draw(st.one_of(st.text(max_size=40), st.sampled_from(["", "aaaaaaaa", "a" * 33, "../x"])))
        return unary(("registry",), REGISTRY + "RevokeApiKey", auth, r.RevokeApiKeyRequest(key_id=key_id))
    if kind == 9:
        secret = draw(
            st.one_of(
                st.text(max_size=80), st.sampled_from(["", "fv_", "fv_aaaaaaaaaaaa_" + "x" * 43, "fv_" + "x" * 10_000])
            )
        )
        return unary(("registry",), REGISTRY + "VerifyApiKey", auth, r.VerifyApiKeyRequest(secret=secret))
    if kind == 10:
        status = r.WorkerStatus(
            worker_id=draw(
                st.one_of(st.sampled_from(["fuzz-worker", "", "a" * 200, "../w", "w:1"]), st.text(max_size=20))
            ),
            address=draw(st.sampled_from(["127.0.0.1:1", "", "nohost", "[::1]:99999", "a" * 3000])),
            state=draw(open_enums),
            queue_depth=draw(uint32s),
            in_flight=draw(uint32s),
            fast_address=draw(st.sampled_from(["", "127.0.0.1:2", "x"])),
        )
        for _ in range(draw(st.integers(0, 2))):
            status.models.add(
                name=draw(st.sampled_from(FUZZ_MODELS + ["", "Bad Name"])),
                version=draw(uint64s),
                ready=draw(st.booleans()),
            )
        return unary(("registry",), REGISTRY + "Heartbeat", auth, r.HeartbeatRequest(status=status))
    if kind == 11:
        req = r.ListWorkersRequest(model=name, version=draw(uint64s), ready_only=draw(st.booleans()))
        return unary(("registry",), REGISTRY + "ListWorkers", auth, req)
    if kind == 12:
        req = r.RollbackAliasRequest(model=safe_name(name), alias=alias)
        return unary(("registry",), REGISTRY + "RollbackAlias", auth, req)
    if kind == 13:
        return unary(
            ("registry",), REGISTRY + "DeleteAlias", auth, r.DeleteAliasRequest(model=safe_name(name), alias=alias)
        )
    if kind == 14:
        return unary(
            ("registry",), REGISTRY + "GetAliasHistory", auth, r.GetAliasHistoryRequest(model=name, alias=alias)
        )
    return unary(("registry",), REGISTRY + "ListModels", auth, model_pb2.ListModelsRequest())


# (target, method, server streams) for raw bytes: every method each port serves, and one it does not.
RAW_METHODS = [
    ("gateway", OIP + "ModelInfer", False),
    ("gateway_relayed", OIP + "ModelInfer", False),
    ("worker", OIP + "ModelInfer", False),
    ("gateway", IMAGE + "Classify", False),
    ("gateway_relayed", IMAGE + "Classify", False),
    ("gateway", IMAGE + "GetModel", False),
    ("gateway", OIP + "ModelMetadata", False),
    ("gateway", OIP + "ModelStatistics", False),
    ("gateway_relayed", OIP + "ModelConfig", False),
    ("registry", REGISTRY + "GetModelVersion", False),
    ("registry", REGISTRY + "CreateApiKey", False),
    ("registry", REGISTRY + "SetAlias", False),
    ("registry", REGISTRY + "VerifyApiKey", False),
    ("registry", REGISTRY + "Heartbeat", False),
    ("registry", REGISTRY + "DownloadArtifact", True),
]
UNKNOWN_METHOD = "/fovea.v1.NoSuchService/Nothing"


@st.composite
def raw_byte_calls(draw: st.DrawFn) -> Call:
    """Random or mutated protobuf bytes through a generic channel, as if from a broken or hostile client."""
    target, method, stream_out = draw(st.sampled_from(RAW_METHODS))
    if draw(st.integers(0, 40)) == 0:
        method, stream_out = UNKNOWN_METHOD, False
    kind = draw(st.integers(0, 3))
    if kind == 0:
        data = draw(st.binary(max_size=200))
    else:  # a valid request for the method, then truncated, with bytes flipped, or with garbage appended
        buf = bytearray(draw(model_infer_requests()).SerializeToString() if "Model" in method else b"")
        if not buf:
            buf = bytearray(
                image_pb2.ClassifyRequest(
                    model="colors", images=[image_pb2.Image(data=IMAGE_SAMPLES[0])]
                ).SerializeToString()
            )
        if kind == 1:
            buf = buf[: draw(st.integers(0, len(buf)))]
        elif kind == 2:
            for _ in range(draw(st.integers(1, 6))):
                buf[draw(st.integers(0, len(buf) - 1))] = draw(st.integers(0, 255))
        else:
            buf += draw(st.binary(min_size=1, max_size=40))
        data = bytes(buf)
    if target.startswith("worker"):
        auth = "internal"
    else:
        auth = draw(st.sampled_from(["admin-token", "worker-token"] if target == "registry" else ["infer", "none"]))
    return Call((target,), method, auth, [bytes(data)], stream_out, f"{len(data)} raw bytes {bytes(data[:48]).hex()}")


# --- sending and judging ---------------------------------------------------------------------------------------


@dataclass
class Finding:
    kind: str
    call: Call
    target: str
    status: str
    detail: str
    count: int = 1

    def __str__(self) -> str:
        return (
            f"{self.kind} x{self.count}: {self.target} {self.call.method} auth={self.call.auth[:40]!r} -> "
            f"{self.status} {self.detail[:200]!r}\n    request: {self.call.described}"
        )


@dataclass
class Fuzzer:
    """Sends calls to a live cluster and records every answer outside the error table, every hang, and every
    service that died (restarting it, at most max_restarts times, so that the run can go on)."""

    live: Live
    sent: int = 0
    restarts: int = 0
    max_restarts: int = 6
    findings: dict[tuple[str, ...], Finding] = field(default_factory=dict)
    recent: list[tuple[Call, str]] = field(default_factory=list)
    channels: dict[str, grpc.Channel] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    statuses: dict[tuple[str, str], dict[str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.credentials = {k: ("authorization", f"Bearer {v}") for k, v in self.live.keys.items()}
        for holder, token in tokens(self.live.cluster).items():
            self.credentials[holder] = ("authorization", f"Bearer {token}")
        # Each API key's twin with a rate limit never reached: its calls take the gateway's Python path.
        self.relayed_credentials = dict(self.credentials)
        for name, (role, patterns) in {
            "infer": ("infer", []),
            "publish": ("publish", []),
            "admin": ("admin", []),
            "ident-only": ("infer", ["ident"]),
        }.items():
            if name in self.live.keys:
                twin = self.live.rc.create_key(role, model_patterns=patterns, rate_limit_rps=1e6, rate_burst=1e6)[1]
                self.relayed_credentials[name] = ("authorization", f"Bearer {twin}")
        self.pids = {s.name: s.proc.pid for s in self.live.services()}
        self._open_channels()

    def _open_channels(self) -> None:
        for ch in self.channels.values():
            ch.close()
        addresses = {
            "gateway": self.live.gateways[0].address,
            "gateway_relayed": self.live.gateways[0].address,
            "worker": self.live.workers[0].address,
            "registry": self.live.registry.address,
        }
        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        self.channels = {t: grpc.insecure_channel(a, options=options) for t, a in addresses.items()}

    def metadata(self, auth: str, target: str) -> tuple[tuple[str, str | bytes], ...]:
        """The call's credentials; a worker gets the token gateways present (unless the call has none at all),
        gateway_relayed the key's twin with a rate limit."""
        if target.startswith("worker") and auth != "none":
            auth = "internal"
        if auth == "none":
            return ()
        if auth.startswith("raw:"):
            return (("authorization", auth[4:]),)
        credentials = self.relayed_credentials if target == "gateway_relayed" else self.credentials
        if auth.startswith("twice:"):  # two authorization headers: a garbage one first
            return (("authorization", "Bearer fv_garbage"), credentials[auth[6:]])
        if auth.startswith("bin:"):  # the key in a binary header, which is not where credentials go
            return (("authorization-bin", credentials[auth[4:]][1].encode()),)
        return (credentials[auth],)

    def send(self, call: Call) -> None:
        """Send the call to each of its targets, judge each answer, and check that no service died."""
        codes: dict[str, tuple[grpc.StatusCode, str]] = {}
        for target in call.targets:
            self.sent += 1
            self.recent = (self.recent + [(call, target)])[-5:]
            code, detail = self._invoke(call, target)
            codes[target] = (code, detail)
            self.judge(call, target, code, detail)
            self.check_alive()
        self.compare_ports(call, codes)

    def compare_ports(self, call: Call, codes: dict[str, tuple[grpc.StatusCode, str]]) -> None:
        """The gateway's two paths are one service: the same call gets the same status whether the front routes
        it or relays it to the Python server. Quota and availability aside, which depend on the moment."""
        if "gateway" not in codes or "gateway_relayed" not in codes:
            return
        (native, text), (relayed, relayed_text) = codes["gateway"], codes["gateway_relayed"]
        if native != relayed and not {native, relayed} & {S.RESOURCE_EXHAUSTED, S.UNAVAILABLE}:
            detail = f"native path {native.name} {text[:150]!r}; relayed path {relayed.name} {relayed_text[:150]!r}"
            self.record("ports disagree", call, "gateway/gateway_relayed", f"{native.name}/{relayed.name}", detail)

    def _invoke(self, call: Call, target: str) -> tuple[grpc.StatusCode, str]:
        channel = self.channels[target]
        md = self.metadata(call.auth, target)
        try:
            if len(call.requests) == 1 and not call.method.endswith(("Stream", "StreamInfer", "RegisterModel")):
                if call.stream_out:
                    fn = channel.unary_stream(call.method, request_serializer=None, response_deserializer=None)
                    for _ in fn(call.requests[0], metadata=md, timeout=TIMEOUT_S):
                        pass
                    return S.OK, ""
                fn = channel.unary_unary(call.method, request_serializer=None, response_deserializer=None)
                fn(call.requests[0], metadata=md, timeout=TIMEOUT_S)
                return S.OK, ""
            if call.stream_out:
                fn = channel.stream_stream(call.method, request_serializer=None, response_deserializer=None)
                answers = list(fn(iter(call.requests), metadata=md, timeout=TIMEOUT_S))
                return self._stream_items(call, answers)
            fn = channel.stream_unary(call.method, request_serializer=None, response_deserializer=None)
            fn(iter(call.requests), metadata=md, timeout=TIMEOUT_S)
            return S.OK, ""
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""

    def _stream_items(self, call: Call, answers: list[bytes]) -> tuple[grpc.StatusCode, str]:
        """The worst status among a stream's items (each failed item carries its own status)."""
        for raw in answers:
            if call.method.endswith("ClassifyStream"):
                item = image_pb2.ClassifyStreamResponse.FromString(raw)
                code = CODE_BY_VALUE.get(item.error_code, S.UNKNOWN)
                if code not in TABLE:
                    return code, "stream item: " + item.error_message
            else:
                text = pb.ModelStreamInferResponse.FromString(raw).error_message
                name = text.split(":", 1)[0] if text else "OK"
                if name not in {c.name for c in TABLE}:
                    return S.UNKNOWN, "stream item: " + text
        return S.OK, ""

    def judge(self, call: Call, target: str, code: grpc.StatusCode, detail: str) -> None:
        counts = self.statuses.setdefault((call.method.rsplit("/", 1)[1], target), {})
        counts[code.name] = counts.get(code.name, 0) + 1
        if code in TABLE:
            return
        if code == S.UNIMPLEMENTED and call.method == UNKNOWN_METHOD:
            return  # gRPC's own answer for a method that no service has
        kind = "hang" if code == S.DEADLINE_EXCEEDED else "status outside the error table"
        self.record(kind, call, target, code.name, detail)

    def record(self, kind: str, call: Call, target: str, status: str, detail: str) -> None:
        """Keep one finding per (kind, port, method, status, first words), with the smallest request seen."""
        group = (kind, target, call.method, status, " ".join(detail.split()[:3]))
        old = self.findings.get(group)
        if old is None:
            self.findings[group] = Finding(kind, call, target, status, detail)
            return
        old.count += 1
        if len(call.described) < len(old.call.described):
            old.call, old.detail = call, detail

    def check_alive(self) -> None:
        for service in self.live.services():
            if proc_stats(service.proc.pid).alive and service.proc.poll() is None:
                continue
            time.sleep(0.2)  # its log's last lines
            tail = " / ".join(service.log_path.read_text(errors="replace").strip().splitlines()[-2:])[-300:]
            culprit, target = self.recent[-1]
            before = " || ".join(f"{t}: {c.described[:200]}" for c, t in self.recent[:-1])
            detail = (tail or "(no log)") + ("\n    calls just before: " + before if before else "")
            self.record("process died", culprit, target, f"{service.name} exit {service.proc.poll()}", detail)
            self.restart(service.name)

    def restart(self, name: str) -> None:
        """Start a dead service again on its port, so that the rest of the run can look for other findings."""
        self.restarts += 1
        if self.restarts > self.max_restarts:
            raise AssertionError("too many service deaths to go on:\n" + self.report())
        old = next(s for s in self.live.services() if s.name == name)
        restart(self.live, old)
        if name.startswith("worker"):
            wait_ready(self.live, len(self.live.workers))
        self._open_channels()
        self.wait_serving()

    def wait_serving(self, timeout_s: float = 30.0) -> None:
        """Until a plain call through the gateway succeeds again (the gateway re-admits a restarted worker)."""
        req = pb.ModelInferRequest(model_name="ident")
        req.inputs.add(name="input", datatype="FP32", shape=[1, 4])
        req.raw_input_contents.append(bytes(16))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            code, _ = self._invoke(unary(("gateway",), OIP + "ModelInfer", "infer", req), "gateway")
            if code == S.OK:
                return
            time.sleep(0.2)

    def findings_for(self, methods: Callable[[str], bool]) -> list[Finding]:
        """Answers outside the table, hangs and deaths for these methods (the ports' agreement is apart)."""
        return [f for f in self.findings.values() if methods(f.call.method) and f.kind != "ports disagree"]

    def report(self, findings: list[Finding] | None = None) -> str:
        chosen = list(self.findings.values()) if findings is None else findings
        return "\n".join(str(f) for f in chosen)

    def histogram(self) -> str:
        """How the answers spread over statuses, per method and port: shows how deep the requests reached."""
        lines = []
        for (method, target), counts in sorted(self.statuses.items()):
            shown = ", ".join(f"{k} {v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
            lines.append(f"{method:<18} {target:<13} {shown}")
        return "\n".join(lines)

    def close(self) -> None:
        for ch in self.channels.values():
            ch.close()
