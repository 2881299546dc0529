"""Acceptance 1: every way a key can be wrong gets its own status, and a revocation reaches
a second gateway replica within a second. Also: ListModels/GetModel see only the key's models."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest

from fovea.v1 import image_pb2
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.gateway.conftest import GatewayFactory, Stack, auth, classify_request, image_stub, status_of
from tests.tinymodels import png

RED = png((240, 20, 20))
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("method", ["Classify", "ModelInfer"])
async def test_authentication_matrix(stack: Stack, gateways: GatewayFactory, method: str) -> None:
    """Through the gateway's one port: Classify and raw-tensor ModelInfer, each answered by the native front itself
    once the key is verified and cached (its refusals worded by the Python server behind it)."""
    gw = await gateways()
    staging = await gateways(min_role="publish")  # a gateway that takes only publish (or admin) keys
    good = await asyncio.to_thread(stack.key)
    revoked = await asyncio.to_thread(stack.key)
    other_models = await asyncio.to_thread(lambda: stack.key(model_patterns=["other-*"]))
    key_id_of_revoked = revoked.split("_")[1]
    await asyncio.to_thread(stack.rc.revoke_key, key_id_of_revoked)
    expired = await asyncio.to_thread(lambda: stack.key(ttl_s=2))  # valid for at least 1 s more
    channel, stub = image_stub(gw)
    staging_channel, staging_stub = image_stub(staging)
    model = "colors" if method == "Classify" else "ident"

    async def call(md: tuple[tuple[str, str], ...] | None, s: object = stub) -> tuple[grpc.StatusCode, str]:
        if method == "Classify":
            return await status_of(s.Classify(classify_request(RED), metadata=md, timeout=10))  # type: ignore[attr-defined]
        infer = pb_grpc.GRPCInferenceServiceStub(channel if s is stub else staging_channel)
        req = pb.ModelInferRequest(model_name="ident")
        req.inputs.add(name="input", datatype="FP32", shape=[1, 4])
        req.raw_input_contents.append(np.ones(4, np.float32).tobytes())
        return await status_of(infer.ModelInfer(req, metadata=md, timeout=10))

    assert (await call(auth(good)))[0] == grpc.StatusCode.OK
    assert (await call(auth(expired)))[0] == grpc.StatusCode.OK  # now cached at the gateway
    cases = {
        "no key": (None, UNAUTHENTICATED, "missing credentials"),
        "not bearer": ((("authorization", "Basic dXNlcjpwYXNz"),), UNAUTHENTICATED, "malformed credentials"),
        "malformed key": (auth("not-a-fovea-key"), UNAUTHENTICATED, "malformed API key"),
        "unknown key": (auth("fv_aaaaaaaaaaaa_" + "x" * 43), UNAUTHENTICATED, "unknown API key"),
        "revoked key": (auth(revoked), UNAUTHENTICATED, "revoked"),
        "model outside patterns": (auth(other_models), PERMISSION_DENIED, f"may not use model '{model}'"),
    }
    for name, (md, code, text) in cases.items():
        got, message = await call(md)
        assert (got, text in message) == (code, True), f"{name}: {got} {message!r}"
    # the key expires while cached at the gateway: refused from the cache, no registry call needed
    while time.time() < (await asyncio.to_thread(lambda: _expiry(stack, expired))):
        await asyncio.sleep(0.05)
    got, message = await call(auth(expired))
    assert got == UNAUTHENTICATED and "expired" in message, message
    got, message = await call(auth(good), staging_stub)
    assert got == PERMISSION_DENIED and "ROLE_INFER" in message and "ROLE_PUBLISH" in message, message
    publisher = await asyncio.to_thread(lambda: stack.key("publish"))
    assert (await call(auth(publisher), staging_stub))[0] == grpc.StatusCode.OK
    # the gateway keeps serving the good key after all that
    assert (await call(auth(good)))[0] == grpc.StatusCode.OK
    assert gw.native is not None
    # the good key's calls after its first, and the expiring key's while cached, ran in C++
    assert gw.native.counts()["native"] >= 2, gw.native.counts()
    await channel.close()
    await staging_channel.close()


def _expiry(stack: Stack, secret: str) -> float:
    key_id = secret.split("_")[1]
    record = next(k for k in stack.rc.list_keys() if k.key_id == key_id)
    return record.expires_at.ToNanoseconds() / 1e9


async def test_revocation_reaches_second_replica_within_one_second(stack: Stack, gateways: GatewayFactory) -> None:
    first, second = await gateways(), await gateways()
    key, secret = await asyncio.to_thread(stack.rc.create_key, "infer")
    req = classify_request(RED)
    channels = [image_stub(first), image_stub(second)]
    for _, stub in channels:  # both replicas have the key cached
        resp = await stub.Classify(req, metadata=auth(secret), timeout=10)
        assert resp.results[0].labels[0].label == "red"
    await asyncio.to_thread(stack.rc.revoke_key, key.key_id)  # revoked through the registry
    revoked_at = time.monotonic()
    stub = channels[1][1]
    code = grpc.StatusCode.OK
    while code == grpc.StatusCode.OK and time.monotonic() - revoked_at < 5:
        code, message = await status_of(stub.Classify(req, metadata=auth(secret), timeout=10))
        if code == grpc.StatusCode.OK:
            await asyncio.sleep(0.01)
    took_s = time.monotonic() - revoked_at
    print(f"revocation refused on the second replica {took_s * 1000:.0f} ms after RevokeApiKey returned")
    assert code == UNAUTHENTICATED and "revoked" in message
    assert took_s < 1.0
    code, _ = await status_of(channels[0][1].Classify(req, metadata=auth(secret), timeout=10))
    assert code == UNAUTHENTICATED
    for channel, _ in channels:
        await channel.close()


async def test_list_and_get_models_follow_key_patterns(stack: Stack, gateways: GatewayFactory) -> None:
    gw = await gateways()
    only_colors = await asyncio.to_thread(lambda: stack.key(model_patterns=["col*"]))
    everything = await asyncio.to_thread(stack.key)
    channel, stub = image_stub(gw)
    listed = await stub.ListModels(image_pb2.ImageServiceListModelsRequest(), metadata=auth(only_colors), timeout=10)
    assert [m.name for m in listed.models] == ["colors"]
    listed = await stub.ListModels(image_pb2.ImageServiceListModelsRequest(), metadata=auth(everything), timeout=10)
    assert {m.name for m in listed.models} >= {"colors", "ident"}
    got = await stub.GetModel(image_pb2.GetModelRequest(model="colors"), metadata=auth(only_colors), timeout=10)
    assert got.model.name == "colors" and list(got.model.labels) == ["red", "green", "blue"]
    code, message = await status_of(
        stub.GetModel(image_pb2.GetModelRequest(model="ident"), metadata=auth(only_colors), timeout=10)
    )
    assert code == PERMISSION_DENIED and "ident" in message
    code, _ = await status_of(
        stub.GetModel(image_pb2.GetModelRequest(model="no-such"), metadata=auth(everything), timeout=10)
    )
    assert code == grpc.StatusCode.NOT_FOUND
    code, _ = await status_of(
        stub.GetModel(image_pb2.GetModelRequest(model="Bad Name!"), metadata=auth(everything), timeout=10)
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    await channel.close()
