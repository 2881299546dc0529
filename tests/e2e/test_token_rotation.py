"""Rotating every service token with no downtime, the way deploy/README.md describes it, through real
registry, worker and gateway processes restarted one at a time (a rolling update):

  1. the registry and the workers accept the old and the new tokens; everyone still sends the old ones;
  2. workers and gateways send the new tokens; both are still accepted;
  3. the old tokens are dropped: they no longer open the registry or a worker.

Each kind of token rotates on its own; here all four go through the same three steps at once.
"""

from __future__ import annotations

import time

import grpc
import numpy as np

from fovea.client import Client, RegistryClient
from fovea.cluster import Cluster, Service
from fovea.v1 import model_pb2, registry_pb2, registry_pb2_grpc
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.tinymodels import color_model, png

KINDS = ("admin", "worker", "gateway", "call")
OLD = {kind: f"old-{kind}-token-" + "a" * 24 for kind in KINDS}
NEW = {kind: f"new-{kind}-token-" + "b" * 24 for kind in KINDS}
Tokens = dict[str, str]


def registry_env(*accept: Tokens) -> dict[str, str]:
    return {
        f"FOVEA_REGISTRY_{kind.upper()}_TOKENS": ",".join(t[kind] for t in accept)
        for kind in ("admin", "worker", "gateway")
    }


def worker_env(send: Tokens, *accept: Tokens) -> dict[str, str]:
    return {
        "FOVEA_WORKER_REGISTRY_TOKEN": send["worker"],
        "FOVEA_WORKER_ACCEPTED_TOKENS": ",".join(t["call"] for t in accept),
    }


def gateway_env(send: Tokens) -> dict[str, str]:
    return {"FOVEA_GATEWAY_REGISTRY_TOKEN": send["gateway"], "FOVEA_GATEWAY_WORKER_TOKEN": send["call"]}


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


def registry_read(address: str, token: str) -> grpc.StatusCode:
    """A read every token kind may make: the production version of colors."""
    with grpc.insecure_channel(address) as channel:
        try:
            registry_pb2_grpc.RegistryServiceStub(channel).GetModelVersion(
                registry_pb2.GetModelVersionRequest(model="colors"),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=10,
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


def test_rolling_rotation_of_every_service_token(cluster: Cluster) -> None:
    reg = cluster.start_registry(port=0, **registry_env(OLD))
    rc = RegistryClient(reg.address, OLD["admin"])
    mv = rc.register(color_model(), model_pb2.ModelVersion(name="colors"))
    rc.set_alias("colors", "production", [(mv.version, 100)])
    _, secret = rc.create_key("infer")
    rc.close()
    worker = cluster.start_worker(reg.address, ["colors"], name="worker", port=0, **worker_env(OLD, OLD))
    gw = cluster.start_gateway(reg.address, port=0, name="gateway", **gateway_env(OLD))
    client = Client(gw.address, secret, timeout_s=10)
    classify_blue(client)
    assert worker_call(worker.address, NEW["call"]) == grpc.StatusCode.UNAUTHENTICATED  # not yet rolled out
    assert registry_read(reg.address, NEW["worker"]) == grpc.StatusCode.UNAUTHENTICATED
    step = 0

    def restart(old: Service, env: dict[str, str]) -> Service:
        nonlocal step, client
        step += 1
        old.stop()
        if old.name == "registry":
            new = cluster.start_registry(port=int(old.address.rsplit(":", 1)[1]), **env)
        elif old.name.startswith("worker"):
            new = cluster.start_worker(reg.address, ["colors"], name=f"worker{step}", port=0, **env)
        else:
            new = cluster.start_gateway(reg.address, port=0, name="gateway", **env)
            client.close()
            client = Client(new.address, secret, timeout_s=10)
        classify_blue(client)  # mixed settings serve at every step of the roll
        return new

    # 1. accept both
    reg = restart(reg, registry_env(OLD, NEW))
    worker = restart(worker, worker_env(OLD, OLD, NEW))
    for kind in ("admin", "worker", "gateway"):
        assert registry_read(reg.address, OLD[kind]) == grpc.StatusCode.OK, kind
        assert registry_read(reg.address, NEW[kind]) == grpc.StatusCode.OK, kind
    assert worker_call(worker.address, OLD["call"]) == grpc.StatusCode.OK
    assert worker_call(worker.address, NEW["call"]) == grpc.StatusCode.OK
    # 2. send the new ones
    worker = restart(worker, worker_env(NEW, OLD, NEW))
    gw = restart(gw, gateway_env(NEW))
    # 3. drop the old ones
    reg = restart(reg, registry_env(NEW))
    worker = restart(worker, worker_env(NEW, NEW))
    for kind in ("admin", "worker", "gateway"):
        assert registry_read(reg.address, OLD[kind]) == grpc.StatusCode.UNAUTHENTICATED, kind
        assert registry_read(reg.address, NEW[kind]) == grpc.StatusCode.OK, kind
    assert worker_call(worker.address, OLD["call"]) == grpc.StatusCode.UNAUTHENTICATED
    assert worker_call(worker.address, NEW["call"]) == grpc.StatusCode.OK
    classify_blue(client)
    client.close()
