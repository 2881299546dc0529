"""Issue 18, fix 7, the worker's side: a model with external-data tensors is refused before ONNX
Runtime loads it, with a clear reason in the log and in the answer to calls for it.

The registry refuses such models at registration (tests/registry/test_upload_bounds.py), so this
test plants one behind its back: fault injection straight into its Redis and artifact store.
"""

from __future__ import annotations

import hashlib
import logging
import pathlib

import grpc
import numpy as np
import pytest
import redis

from fovea.names import redis_key
from fovea.onnxfile import EXTERNAL_DATA_REFUSED
from fovea.spec import version_from_onnx
from fovea.v1 import model_pb2
from registry.artifacts import LocalArtifactStore
from tests.registry.test_upload_bounds import external_data_model
from tests.tinymodels import color_model
from tests.worker.conftest import MD, LocalRegistry, StartWorker, stub, tensor_request


def plant_version_bypassing_validation(redis_url: str, artifact_dir: pathlib.Path, name: str, data: bytes) -> None:
    """Fault injection: version 1 of `name`, aliased production, written as RegisterModel would
    store it but without its validation."""
    sha256 = hashlib.sha256(data).hexdigest()
    LocalArtifactStore(artifact_dir).put(data, sha256)
    mv = version_from_onnx(data, name)
    mv.version, mv.sha256, mv.size_bytes = 1, sha256, len(data)
    mv.state = model_pb2.VERSION_STATE_READY
    alias = model_pb2.Alias(model=name, name="production", targets=[model_pb2.AliasTarget(version=1, weight=100)])
    client = redis.Redis.from_url(redis_url)
    try:
        client.set(redis_key("model", name, "seq"), 1)
        client.set(redis_key("model", name, "v", 1), mv.SerializeToString())
        client.sadd(redis_key("models"), name)
        client.hset(redis_key("model", name, "aliases"), "production", alias.SerializeToString())
    finally:
        client.close()


async def test_worker_refuses_a_planted_external_data_model_before_loading_it(
    registry: LocalRegistry,
    start_worker: StartWorker,
    redis_url: str,
    tmp_path: pathlib.Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    plant_version_bypassing_validation(redis_url, tmp_path / "artifacts", "planted", external_data_model())
    await registry.publish("colors", color_model())
    with caplog.at_level(logging.ERROR, logger="worker.models"):
        ws = await start_worker(["planted", "colors"])
    refusals = [r.getMessage() for r in caplog.records if r.name == "worker.models" and "planted v1" in r.getMessage()]
    assert any(EXTERNAL_DATA_REFUSED in m for m in refusals), refusals
    assert ("planted", 1) not in ws.manager.loaded
    channel, s = stub(ws.port)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        zeros = np.zeros((1, 3, 8, 8), np.float32)
        await s.ModelInfer(tensor_request("planted", zeros, version="1"), metadata=MD, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and EXTERNAL_DATA_REFUSED in (err.value.details() or "")
    # The worker itself is fine: its other model serves.
    resp = await s.ModelInfer(tensor_request("colors", np.zeros((1, 3, 8, 8), np.float32)), metadata=MD, timeout=10)
    assert resp.model_name == "colors"
    await channel.close()
