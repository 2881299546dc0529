"""Rotating the internal token with no downtime, the way deploy/README.md describes it, through
real registry, worker and gateway processes restarted one at a time (a rolling update):

  1. every service accepts the new token, still sends the old one;
  2. every service sends the new token, still accepts the old one;
  3. the old token is dropped: it no longer opens a worker or the registry.
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from fovea.client import Client, RegistryClient
from fovea.cluster import Cluster
from fovea.v1 import model_pb2
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.tinymodels import color_model, png

OLD, NEW = "old-internal-token-" + "a" * 24, "new-internal-token-" + "b" * 24


def tokens(send: str, accept: str = "") -> dict[str, str]:
    return {"FOVEA_INTERNAL_TOKEN": send, "FOVEA_ACCEPTED_INTERNAL_TOKEN": accept}


def worker_call(address: str, token: str) -> grpc.StatusCode:
    with grpc.insecure_channel(address) as channel:
        req = pb.ModelInferRequest(model_name="colors")
        req.inputs.add(name="input", datatype="FP32", shape=[1, 3, 8, 8])
        req.raw_input_contents.append(np.zeros((1, 3, 8, 8), np.float32).tobytes())
        try:
            pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                req, metadata=(("authorization", f"Bearer {token}"),), timeout=10
            )
            return grpc.StatusCode.OK
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]


def classify_blue(client: Client, within_s: float = 20.0) -> None:
    """The cluster serves (allowing a restarted worker the time to load and be seen)."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            resp = client.classify([png((10, 10, 220))], model="colors", top_k=1)
            assert resp.results[0].labels[0].label == "blue"
            return
        except grpc.RpcError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_rolling_rotation_of_the_internal_token(cluster: Cluster) -> None:
    reg = cluster.start_registry(**tokens(OLD))
    rc = RegistryClient(reg.address, OLD)
    mv = rc.register(color_model(), model_pb2.ModelVersion(name="colors"))
    rc.set_alias("colors", "production", [(mv.version, 100)])
    _, secret = rc.create_key("infer")
    worker = cluster.start_worker(reg.address, ["colors"], **tokens(OLD))
    gw = cluster.start_gateway(reg.address, **tokens(OLD))
    client = Client(gw.address, secret, timeout_s=10)
    classify_blue(client)
    assert worker_call(worker.address, NEW) == grpc.StatusCode.UNAUTHENTICATED  # not yet rolled out

    def roll(send: str, accept: str) -> None:
        nonlocal reg, worker, gw, client
        for old_service in (reg, worker, gw):
            old_service.stop()
            if old_service is reg:
                reg = cluster.start_registry(port=int(reg.address.rsplit(":", 1)[1]), **tokens(send, accept))
            elif old_service is worker:
                worker = cluster.start_worker(
                    reg.address, ["colors"], name=f"worker-{send[:3]}-{accept[:3]}", **tokens(send, accept)
                )
            else:
                gw = cluster.start_gateway(reg.address, **tokens(send, accept))
                client.close()
                client = Client(gw.address, secret, timeout_s=10)
            classify_blue(client)  # mixed versions serve at every step of the roll

    roll(OLD, NEW)
    assert worker_call(worker.address, NEW) == grpc.StatusCode.OK
    roll(NEW, OLD)
    assert worker_call(worker.address, OLD) == grpc.StatusCode.OK
    roll(NEW, "")
    assert worker_call(worker.address, OLD) == grpc.StatusCode.UNAUTHENTICATED
    assert worker_call(worker.address, NEW) == grpc.StatusCode.OK
    with pytest.raises(grpc.RpcError) as err:
        RegistryClient(reg.address, OLD).list_workers("colors")
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    client.close()
