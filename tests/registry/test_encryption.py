"""Acceptance 6: artifacts encrypted at rest (AES-256-GCM); workers with the key serve, workers without refuse."""

from __future__ import annotations

import hashlib
import os
import pathlib
import time

import grpc
import numpy as np
import onnx
import pytest
import redis

from fovea.client import RegistryClient
from fovea.cluster import Cluster
from fovea.errors import IntegrityError
from fovea.registry_link import RegistryLink
from fovea.v1 import model_pb2
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.registry.conftest import StartRegistry
from tests.tinymodels import color_model

# Strings that appear in the plaintext ONNX file: op types, tensor and initializer names, metadata.
GRAPH_STRINGS = [b"GlobalAveragePool", b"MatMul", b"Flatten", b"logits", b"pooled", b"fovea.labels",
                 b"fovea.preprocessing", b"green"]


def _key_file(tmp_path: pathlib.Path) -> tuple[pathlib.Path, bytes]:
    key = os.urandom(32)
    path = tmp_path / "artifact.key"
    path.write_text(key.hex())
    path.chmod(0o600)
    return path, key


def _infer(address: str, token: str, version: str = "") -> pb.ModelInferResponse:
    image = np.zeros((1, 3, 8, 8), np.float32)
    image[:, 0] = 1.0  # all red
    req = pb.ModelInferRequest(model_name="colors", model_version=version,
                               inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32",
                                                                             shape=[1, 3, 8, 8])],
                               raw_input_contents=[image.tobytes()])
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            req, metadata=(("authorization", f"Bearer {token}"),), timeout=10)


def test_encrypted_artifacts_reveal_no_model_and_only_keyed_workers_serve(
        cluster: Cluster, tmp_path: pathlib.Path, redis_url: str) -> None:
    key_path, key = _key_file(tmp_path)
    registry = cluster.start_registry(FOVEA_REGISTRY_ENCRYPTION_KEY_FILE=str(key_path),
                                      FOVEA_REGISTRY_HEARTBEAT_TTL_S="2")
    rc = RegistryClient(registry.address, cluster.internal_token, timeout_s=10)
    plain = color_model(labels=("red", "green", "blue"))
    mv = rc.register(plain, model_pb2.ModelVersion(name="colors"))
    rc.set_alias("colors", "production", [(mv.version, 100)])
    assert mv.encrypted and mv.sha256 == hashlib.sha256(plain).hexdigest()

    # A copied artifact directory reveals no model.
    files = [p for p in (cluster.data_dir / "artifacts").rglob("*") if p.is_file()]
    assert len(files) == 1 and files[0].name == mv.sha256
    blob = files[0].read_bytes()
    assert plain not in blob and hashlib.sha256(blob).hexdigest() != mv.sha256
    assert not [s for s in GRAPH_STRINGS if s in blob]
    with pytest.raises(Exception):
        onnx.load_from_string(blob)
    # The key lives only in its file: not in Redis, not beside the artifacts.
    client = redis.Redis.from_url(redis_url)
    values = b"".join((client.dump(k) or b"") for k in client.keys("*"))
    client.close()
    for form in (key, key.hex().encode()):
        assert form not in values and form not in blob

    keyed = cluster.start_worker(registry.address, ["colors"], name="keyed",
                                 FOVEA_WORKER_ENCRYPTION_KEY_FILE=str(key_path))
    keyless = cluster.start_worker(registry.address, ["colors"], name="keyless")
    deadline = time.monotonic() + 60
    while [w.worker_id for w in rc.list_workers("colors", ready_only=True)] != [f"keyed-{keyed.address.rsplit(':')[1]}"]:
        assert time.monotonic() < deadline, keyed.log_path.read_text()[-2000:]
        time.sleep(0.05)

    resp = _infer(keyed.address, cluster.internal_token)
    logits = np.frombuffer(resp.raw_output_contents[0], np.float32)
    assert resp.model_version == "1" and int(np.argmax(logits)) == 0  # red

    while "refusing colors v1" not in keyless.log_path.read_text():
        assert time.monotonic() < deadline, keyless.log_path.read_text()[-2000:]
        time.sleep(0.05)
    assert "no decryption key" in keyless.log_path.read_text()
    with pytest.raises(grpc.RpcError) as err:
        _infer(keyless.address, cluster.internal_token, version="1")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "encrypted at rest and this process has no decryption key" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        _infer(keyless.address, cluster.internal_token)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "no ready version" in err.value.details()
    rc.close()


async def test_wrong_key_fails_authentication_of_the_ciphertext(start_registry: StartRegistry, token: str,
                                                                tmp_path: pathlib.Path) -> None:
    """The worker's own download path (RegistryLink) with a wrong key: a clear error, never garbage."""
    key_path, key = _key_file(tmp_path)
    server = await start_registry(encryption_key_file=str(key_path))
    link = RegistryLink(f"127.0.0.1:{server.port}", token)
    from tests.registry.helpers import Reg

    reg = Reg(link.address, token)
    mv = await reg.register("colors")
    assert await link.download(mv, key) == color_model()
    with pytest.raises(IntegrityError, match="wrong key or tampered file"):
        await link.download(mv, os.urandom(32))
    with pytest.raises(IntegrityError, match="no decryption key"):
        await link.download(mv, None)
    await reg.close()
    await link.close()


async def test_switching_encryption_on_rewrites_an_existing_plaintext_artifact(
        start_registry: StartRegistry, token: str, tmp_path: pathlib.Path) -> None:
    from tests.registry.helpers import Reg

    plain_server = await start_registry(artifact_dir=tmp_path / "shared")
    reg = Reg(f"127.0.0.1:{plain_server.port}", token)
    mv = await reg.register("colors")
    path = tmp_path / "shared" / mv.sha256[:2] / mv.sha256
    assert not mv.encrypted and path.read_bytes() == color_model()
    key_path, _ = _key_file(tmp_path)
    enc_server = await start_registry(artifact_dir=tmp_path / "shared", encryption_key_file=str(key_path))
    enc = Reg(f"127.0.0.1:{enc_server.port}", token)
    again = await enc.register("colors")  # same bytes, so the same digest
    assert again.encrypted and again.sha256 == mv.sha256 and b"MatMul" not in path.read_bytes()
    await reg.close()
    await enc.close()
