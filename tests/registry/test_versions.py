"""Model versions: atomic numbering, validation that stores nothing on failure, the upload limit, downloads."""

from __future__ import annotations

import asyncio
import hashlib
import pathlib
from typing import Any

import grpc

from fovea.v1 import model_pb2, registry_pb2
from tests.registry.conftest import StartRegistry
from tests.registry.helpers import Reg, files_under, redis_state, status_of
from tests.registry.models import batch_one_reshape_model, fixed_batch_model, unloadable_model
from tests.tinymodels import color_model, identity_model

INVALID = grpc.StatusCode.INVALID_ARGUMENT


async def test_twenty_concurrent_registrations_get_twenty_consecutive_versions(
    start_registry: StartRegistry, token: str
) -> None:
    """Acceptance 1, through two replicas at once so that two processes race for the numbers."""
    a, b = await start_registry(), await start_registry()
    clients = [Reg(f"127.0.0.1:{a.port}", token), Reg(f"127.0.0.1:{b.port}", token)]
    artifacts = [color_model(bias=float(i)) for i in range(20)]
    results = await asyncio.gather(*(clients[i % 2].register("race", artifacts[i]) for i in range(20)))

    assert sorted(mv.version for mv in results) == list(range(1, 21))
    for data, mv in zip(artifacts, results, strict=False):
        assert mv.sha256 == hashlib.sha256(data).hexdigest()
        stored = (await clients[0].resolve("race", version=mv.version)).model
        assert stored.sha256 == mv.sha256 and stored.version == mv.version
        assert await clients[1].download("race", mv.version) == data
    listed = (await clients[0].call("ListVersions", registry_pb2.ListVersionsRequest(model="race"))).versions
    assert [v.version for v in listed] == list(range(1, 21))
    summary = (await clients[1].call("ListModels", model_pb2.ListModelsRequest())).models
    assert [(m.name, m.latest_version) for m in summary] == [("race", 20)]
    for c in clients:
        await c.close()


async def test_registration_records_metadata_and_computes_the_digest(reg: Reg) -> None:
    data = color_model()
    mv = await reg.register(
        "colors", data, chunk=7, metrics={"top1": 0.91}, tags={"team": "vision"}, model_card="# colors"
    )
    assert mv.version == 1 and mv.sha256 == hashlib.sha256(data).hexdigest() and mv.size_bytes == len(data)
    assert list(mv.labels) == ["red", "green", "blue"]  # from the file's fovea.labels
    assert mv.inputs[0].name == "input" and list(mv.inputs[0].shape) == [-1, 3, 8, 8]
    assert mv.inputs[0].datatype == "FP32" and mv.inputs[0].layout == "NCHW"
    assert mv.outputs[0].name == "logits" and list(mv.outputs[0].shape) == [-1, 3]
    assert mv.preprocessing.crop_height == 8
    assert mv.metrics["top1"] == 0.91 and mv.tags["team"] == "vision" and mv.model_card == "# colors"
    assert mv.published_by == "admin-token" and mv.state == model_pb2.VERSION_STATE_READY
    assert mv.created_at.seconds > 0 and not mv.encrypted
    # Fields only the registry sets are ignored when a client sends them.
    forged = await reg.register("colors", data, version=99, sha256="0" * 64, published_by="someone-else")
    assert forged.version == 2 and forged.sha256 == mv.sha256 and forged.published_by == "admin-token"


async def test_invalid_artifacts_are_refused_and_change_nothing(
    reg: Reg, redis_url: str, tmp_path: pathlib.Path
) -> None:
    """Acceptance 2: corrupt files and spec mismatches get INVALID_ARGUMENT; Redis and artifacts are untouched."""
    await reg.register("colors")
    before = redis_state(redis_url)
    files_before = files_under(tmp_path / "artifacts")
    good = color_model()

    def spec(name: str = "input", datatype: str = "FP32", shape: tuple[int, ...] = (-1, 3, 8, 8)) -> dict:
        return {"inputs": [model_pb2.TensorSpec(name=name, datatype=datatype, shape=shape)]}

    cases = [
        ("random bytes", b"\x08\x01 definitely not onnx \xff" * 10, {}, "not a valid ONNX model"),
        ("truncated file", good[: len(good) // 2], {}, "not a valid ONNX model"),
        ("input name", good, spec(name="image"), "declared input 'image' but the graph's input is 'input'"),
        ("input dtype", good, spec(datatype="FP16"), "declared FP16, graph has FP32"),
        ("input shape", good, spec(shape=(-1, 3, 16, 16)), "declared shape [-1, 3, 16, 16]"),
        (
            "input count",
            good,
            {"inputs": [model_pb2.TensorSpec(name="input"), model_pb2.TensorSpec(name="extra")]},
            "declared 2 inputs but the ONNX graph has 1",
        ),
        ("output", good, {"outputs": [model_pb2.TensorSpec(name="probs")]}, "declared output 'probs'"),
        ("labels", good, {"labels": ["a", "b"]}, "2 labels for an output of 3 classes"),
        (
            "preprocessing",
            good,
            {"preprocessing": model_pb2.Preprocessing(crop_height=16, crop_width=16)},
            "preprocessing makes 3x16x16",
        ),
        ("layout", good, {"inputs": [model_pb2.TensorSpec(name="input", layout="CHWN")]}, "feeds NCHW or NHWC tensors"),
        ("fixed batch", fixed_batch_model(), {}, "needs a dynamic batch axis"),
        ("batch-1 reshape", batch_one_reshape_model(), {}, "fails on a batch of 2"),
        ("unknown operator", unloadable_model(), {}, "ONNX Runtime cannot load the model"),
        ("empty artifact", b"", {}, "empty artifact"),
        ("metric", good, {"metrics": {"top1": float("nan")}}, "finite values"),
    ]
    for what, data, fields, expected in cases:
        code, msg = await status_of(reg.register("colors", data, **fields))
        assert code == INVALID, (what, code, msg)
        assert expected in msg, (what, msg)
    assert redis_state(redis_url) == before
    assert files_under(tmp_path / "artifacts") == files_before
    assert (await reg.register("colors")).version == 2  # no number was used up


async def test_upload_over_the_size_limit_is_refused_and_stores_nothing(
    start_registry: StartRegistry, token: str, redis_url: str, tmp_path: pathlib.Path
) -> None:
    data = color_model()
    server = await start_registry(max_artifact_bytes=len(data) - 1, artifact_dir=tmp_path / "small")
    client = Reg(f"127.0.0.1:{server.port}", token)
    code, msg = await status_of(client.register("big", data, chunk=100))
    assert code == INVALID and f"exceeds the limit of {len(data) - 1} bytes" in msg
    assert redis_state(redis_url) == {} and files_under(tmp_path / "small") == []

    exact = await start_registry(max_artifact_bytes=len(data), artifact_dir=tmp_path / "small")
    ok = Reg(f"127.0.0.1:{exact.port}", token)
    assert (await ok.register("big", data, chunk=100)).version == 1
    await client.close()
    await ok.close()


async def test_malformed_upload_streams_are_refused(reg: Reg) -> None:
    async def chunk_first():  # type: ignore[no-untyped-def]
        yield registry_pb2.RegisterModelRequest(chunk=b"abc")

    async def metadata_twice():  # type: ignore[no-untyped-def]
        yield registry_pb2.RegisterModelRequest(metadata=model_pb2.ModelVersion(name="m"))
        yield registry_pb2.RegisterModelRequest(metadata=model_pb2.ModelVersion(name="m"))

    async def nothing():  # type: ignore[no-untyped-def]
        return
        yield

    for stream, expected in (
        (chunk_first, "first RegisterModel message must carry the metadata"),
        (metadata_twice, "metadata may only be sent once"),
        (nothing, "empty RegisterModel stream"),
    ):
        code, msg = await status_of(reg.stub.RegisterModel(stream(), metadata=reg.md, timeout=10))
        assert code == INVALID and expected in msg


async def test_download_streams_chunks_of_the_configured_size(start_registry: StartRegistry, token: str) -> None:
    server = await start_registry(chunk_bytes=64)
    client = Reg(f"127.0.0.1:{server.port}", token)
    data = identity_model(width=64)
    await client.register("ident", data)
    sizes = [
        len(r.chunk)
        async for r in client.stub.DownloadArtifact(
            registry_pb2.DownloadArtifactRequest(model="ident", version=1), metadata=client.md, timeout=10
        )
    ]
    assert sum(sizes) == len(data) and max(sizes) == 64 and len(sizes) == -(-len(data) // 64)
    code, msg = await status_of(client.download("ident", 2))
    assert code == grpc.StatusCode.NOT_FOUND and "has no version 2" in msg
    code, msg = await status_of(client.download("nope", 1))
    assert code == grpc.StatusCode.NOT_FOUND and "unknown model 'nope'" in msg
    await client.close()


async def test_missing_artifact_file_is_data_loss_not_a_crash(reg: Reg, tmp_path: pathlib.Path) -> None:
    mv = await reg.register("colors")
    # Fault injection: the file vanishes behind the registry's back.
    (tmp_path / "artifacts" / mv.sha256[:2] / mv.sha256).unlink()
    code, msg = await status_of(reg.download("colors", 1))
    assert code == grpc.StatusCode.DATA_LOSS and "missing from the artifact store" in msg


async def test_resolution_by_version_alias_and_latest(reg: Reg) -> None:
    for i in range(3):
        await reg.register("colors", color_model(bias=float(i)))
    assert (await reg.resolve("colors")).model.version == 3  # no production alias: the latest
    await reg.set_alias("colors", "production", (2, 100))
    resp = await reg.resolve("colors")
    assert resp.model.version == 2 and resp.alias.name == "production"
    assert (await reg.resolve("colors", version=1)).model.version == 1
    code, msg = await status_of(reg.resolve("colors", alias="staging"))
    assert code == grpc.StatusCode.NOT_FOUND and "no alias 'staging'" in msg
    code, msg = await status_of(reg.resolve("colors", version=9))
    assert code == grpc.StatusCode.NOT_FOUND and "no version 9" in msg
    code, msg = await status_of(reg.resolve("ghost"))
    assert code == grpc.StatusCode.NOT_FOUND and "unknown model 'ghost'" in msg


def test_config_limits_must_be_positive() -> None:
    import pytest
    from pydantic import ValidationError

    from registry.config import RegistryConfig

    for field in (
        "max_artifact_bytes",
        "chunk_bytes",
        "heartbeat_ttl_s",
        "watch_poll_s",
        "max_concurrent_uploads",
        "max_alias_history",
    ):
        zero: dict[str, Any] = {field: 0}  # any of the fields above
        with pytest.raises(ValidationError):
            RegistryConfig(**zero)
