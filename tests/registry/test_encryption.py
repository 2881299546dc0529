"""Acceptance 6: artifacts encrypted at rest (AES-256-GCM); workers with the key serve, workers without refuse."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys
import time

import google.protobuf.message
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
GRAPH_STRINGS = [
    b"GlobalAveragePool",
    b"MatMul",
    b"Flatten",
    b"logits",
    b"pooled",
    b"fovea.labels",
    b"fovea.preprocessing",
    b"green",
]


def _key_file(tmp_path: pathlib.Path) -> tuple[pathlib.Path, bytes]:
    key = os.urandom(32)
    path = tmp_path / "artifact.key"
    path.write_text(key.hex())
    path.chmod(0o600)
    return path, key


def _infer(address: str, token: str, version: str = "") -> pb.ModelInferResponse:
    image = np.zeros((1, 3, 8, 8), np.float32)
    image[:, 0] = 1.0  # all red
    req = pb.ModelInferRequest(
        model_name="colors",
        model_version=version,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=[1, 3, 8, 8])],
        raw_input_contents=[image.tobytes()],
    )
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            req, metadata=(("authorization", f"Bearer {token}"),), timeout=10
        )


def test_encrypted_artifacts_reveal_no_model_and_only_keyed_workers_serve(
    cluster: Cluster, tmp_path: pathlib.Path, redis_url: str
) -> None:
    key_path, key = _key_file(tmp_path)
    registry = cluster.start_registry(
        FOVEA_REGISTRY_ENCRYPTION_KEY_FILE=str(key_path), FOVEA_REGISTRY_HEARTBEAT_TTL_S="2"
    )
    rc = RegistryClient(registry.address, cluster.admin_token, timeout_s=10)
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
    with pytest.raises(google.protobuf.message.DecodeError):
        onnx.load_from_string(blob)
    # The key lives only in its file: not in Redis, not beside the artifacts.
    client = redis.Redis.from_url(redis_url)
    values = b"".join((client.dump(k) or b"") for k in client.keys("*"))
    client.close()
    for form in (key, key.hex().encode()):
        assert form not in values and form not in blob

    keyed = cluster.start_worker(
        registry.address, ["colors"], name="keyed", FOVEA_WORKER_ENCRYPTION_KEY_FILE=str(key_path)
    )
    keyless = cluster.start_worker(registry.address, ["colors"], name="keyless")
    deadline = time.monotonic() + 60
    while [w.worker_id for w in rc.list_workers("colors", ready_only=True)] != [
        f"keyed-{keyed.address.rsplit(':')[1]}"
    ]:
        assert time.monotonic() < deadline, keyed.log_path.read_text()[-2000:]
        time.sleep(0.05)

    resp = _infer(keyed.address, cluster.worker_call_token)
    logits = np.frombuffer(resp.raw_output_contents[0], np.float32)
    assert resp.model_version == "1" and int(np.argmax(logits)) == 0  # red

    while "refusing colors v1" not in keyless.log_path.read_text():
        assert time.monotonic() < deadline, keyless.log_path.read_text()[-2000:]
        time.sleep(0.05)
    assert "no decryption key" in keyless.log_path.read_text()
    with pytest.raises(grpc.RpcError) as err:
        _infer(keyless.address, cluster.worker_call_token, version="1")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "encrypted at rest and this process has no decryption key" in err.value.details()
    with pytest.raises(grpc.RpcError) as err:
        _infer(keyless.address, cluster.worker_call_token)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "no ready version" in err.value.details()
    rc.close()


async def test_wrong_key_fails_authentication_of_the_ciphertext(
    start_registry: StartRegistry, token: str, tmp_path: pathlib.Path
) -> None:
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
    start_registry: StartRegistry, token: str, tmp_path: pathlib.Path
) -> None:
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


def _key_at(path: pathlib.Path) -> bytes:
    key = os.urandom(32)
    path.write_text(key.hex())
    path.chmod(0o600)
    return key


def _opens_with(path: pathlib.Path, sha256: str, key: bytes) -> bool:
    from fovea import crypto

    try:
        crypto.decrypt(key, path.read_bytes(), sha256)
        return True
    except IntegrityError:
        return False


def test_key_rotation_reencrypts_every_artifact_and_models_keep_serving(
    cluster: Cluster, tmp_path: pathlib.Path
) -> None:
    """Rotate the encryption key as deploy/README.md says: registry and workers get the new key
    with the old one as previous, `fovea model reencrypt` rewrites the store, then the old key goes."""
    old_file, new_file, empty = tmp_path / "old.key", tmp_path / "new.key", tmp_path / "none.key"
    old, new = _key_at(old_file), _key_at(new_file)
    empty.write_text("")
    registry = cluster.start_registry(FOVEA_REGISTRY_ENCRYPTION_KEY_FILE=str(old_file))
    port = int(registry.address.rsplit(":", 1)[1])
    rc = RegistryClient(registry.address, cluster.admin_token, timeout_s=10)
    versions = [rc.register(color_model(bias=b), model_pb2.ModelVersion(name="colors")) for b in (0.0, 0.5)]
    rc.set_alias("colors", "production", [(versions[0].version, 100)])
    files = [cluster.data_dir / "artifacts" / mv.sha256[:2] / mv.sha256 for mv in versions]
    assert all(_opens_with(f, mv.sha256, old) for f, mv in zip(files, versions, strict=False))

    # 1. new key current, old key previous, on the registry and the worker
    registry.stop()
    cluster.start_registry(
        port=port,
        FOVEA_REGISTRY_ENCRYPTION_KEY_FILE=str(new_file),
        FOVEA_REGISTRY_PREVIOUS_ENCRYPTION_KEY_FILE=str(old_file),
    )
    worker = cluster.start_worker(
        registry.address,
        ["colors"],
        FOVEA_WORKER_ENCRYPTION_KEY_FILE=str(new_file),
        FOVEA_WORKER_PREVIOUS_ENCRYPTION_KEY_FILE=str(old_file),
    )
    _wait_serving(worker.address, cluster.worker_call_token)  # still under the old key: previous opens it

    # 2. re-encrypt, through the CLI as an operator would
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "fovea.cli",
            "model",
            "reencrypt",
            "--registry",
            registry.address,
            f"--token={cluster.admin_token}",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    done = json.loads(out.stdout)
    assert done.get("rewritten") == 2 and not done.get("unreadable"), done
    for f, mv in zip(files, versions, strict=False):
        assert _opens_with(f, mv.sha256, new) and not _opens_with(f, mv.sha256, old)
        assert not any(s in f.read_bytes() for s in GRAPH_STRINGS)
    again = rc.reencrypt_artifacts()
    assert (again.rewritten, again.unchanged) == (0, 2)

    # 3. the old key is gone everywhere (an empty previous-key file, as the Secret leaves it): both versions load
    worker.stop()
    rc.set_alias("colors", "production", [(versions[0].version, 50), (versions[1].version, 50)])
    worker = cluster.start_worker(
        registry.address,
        ["colors"],
        name="worker-new-key",
        FOVEA_WORKER_ENCRYPTION_KEY_FILE=str(new_file),
        FOVEA_WORKER_PREVIOUS_ENCRYPTION_KEY_FILE=str(empty),
    )
    for v in versions:
        _wait_serving(worker.address, cluster.worker_call_token, str(v.version))


def test_reencrypt_reports_artifacts_no_key_opens_and_needs_admin(cluster: Cluster, tmp_path: pathlib.Path) -> None:
    first, second = tmp_path / "first.key", tmp_path / "second.key"
    _key_at(first), _key_at(second)
    registry = cluster.start_registry(FOVEA_REGISTRY_ENCRYPTION_KEY_FILE=str(first))
    port = int(registry.address.rsplit(":", 1)[1])
    rc = RegistryClient(registry.address, cluster.admin_token, timeout_s=10)
    mv = rc.register(color_model(), model_pb2.ModelVersion(name="colors"))
    _, publisher = rc.create_key("publish")
    registry.stop()
    cluster.start_registry(port=port, FOVEA_REGISTRY_ENCRYPTION_KEY_FILE=str(second))  # the first key was lost
    with pytest.raises(grpc.RpcError) as err:
        RegistryClient(registry.address, publisher, timeout_s=10).reencrypt_artifacts()
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    done = rc.reencrypt_artifacts()
    assert (done.rewritten, done.unchanged, list(done.unreadable)) == (0, 0, [mv.sha256])


def _wait_serving(address: str, token: str, version: str = "", timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            _infer(address, token, version)
            return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
