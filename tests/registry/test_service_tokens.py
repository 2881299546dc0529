"""Service tokens at the registry: each kind of service may make exactly its own calls; tokens are
accepted as SHA-256 digests; a list of tokens lets one rotate; malformed settings stop the start."""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

import grpc
import pytest

from fovea.tokens import TokenTable
from fovea.v1 import model_pb2, registry_pb2
from gateway.config import GatewayConfig
from registry.config import RegistryConfig
from tests.registry.conftest import StartRegistry
from tests.registry.helpers import Reg, Watch, status_of
from worker.config import WorkerConfig

OK, DENIED, UNAUTH = grpc.StatusCode.OK, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED
TARGET = [model_pb2.AliasTarget(version=1, weight=100)]
BEAT = registry_pb2.HeartbeatRequest(
    status=registry_pb2.WorkerStatus(worker_id="w1", address="127.0.0.1:9", state=registry_pb2.WORKER_STATE_READY)
)

# method -> (request, who may call it); unary calls, made with Reg.call
UNARY: dict[str, tuple[Any, set[str]]] = {
    "GetModelVersion": (registry_pb2.GetModelVersionRequest(model="colors"), {"worker", "gateway", "admin"}),
    "ListModels": (model_pb2.ListModelsRequest(), {"worker", "gateway", "admin"}),
    "ListVersions": (registry_pb2.ListVersionsRequest(model="colors"), {"worker", "gateway", "admin"}),
    "GetAliasHistory": (registry_pb2.GetAliasHistoryRequest(model="colors"), {"worker", "gateway", "admin"}),
    "Heartbeat": (BEAT, {"worker"}),
    "VerifyApiKey": (registry_pb2.VerifyApiKeyRequest(secret="fv_x"), {"gateway"}),
    "SetAlias": (registry_pb2.SetAliasRequest(model="colors", alias="staging", targets=TARGET), {"admin"}),
    "RollbackAlias": (registry_pb2.RollbackAliasRequest(model="colors", alias="staging"), {"admin"}),
    "DeleteAlias": (registry_pb2.DeleteAliasRequest(model="colors", alias="canary"), {"admin"}),
    "ArchiveVersion": (registry_pb2.ArchiveVersionRequest(model="colors", version=9), {"admin"}),
    "CreateApiKey": (registry_pb2.CreateApiKeyRequest(role=registry_pb2.ROLE_ADMIN), {"admin"}),
    "ListApiKeys": (registry_pb2.ListApiKeysRequest(), {"admin"}),
    "RevokeApiKey": (registry_pb2.RevokeApiKeyRequest(key_id="abcdefghijkl"), {"admin"}),
    "ListWorkers": (registry_pb2.ListWorkersRequest(), {"admin"}),
    "ReencryptArtifacts": (registry_pb2.ReencryptArtifactsRequest(), {"admin"}),
}


async def _code(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return OK


async def _stream_code(client: Reg, method: str, request: Any) -> grpc.StatusCode:
    """The status of a watch: OK once its first event (the snapshot) arrives."""
    watch = Watch(getattr(client.stub, method)(request, metadata=client.md))
    try:
        _, first = await watch.next(5)
    finally:
        watch.close()
    return first.code() if isinstance(first, grpc.aio.AioRpcError) else OK


async def test_each_kind_of_token_makes_exactly_its_own_calls(
    start_registry: StartRegistry, token: str, worker_token: str, gateway_token: str
) -> None:
    server = await start_registry()
    address = f"127.0.0.1:{server.port}"
    admin = Reg(address, token)
    await admin.register("colors")
    await admin.set_alias("colors", "production", (1, 100))
    await admin.set_alias("colors", "staging", (1, 100))
    await admin.set_alias("colors", "canary", (1, 100))
    clients = {"admin": admin, "worker": Reg(address, worker_token), "gateway": Reg(address, gateway_token)}
    for method, (request, allowed) in UNARY.items():
        for kind, client in clients.items():
            code = await _code(client.call(method, request))
            if method == "VerifyApiKey" and kind in allowed:
                assert code == UNAUTH  # the registry looked the made-up key up: a gateway may ask
            elif kind in allowed:
                # past the access check; the call itself may still fail (an unknown key id: NOT_FOUND)
                assert code not in (DENIED, UNAUTH), (method, kind, code)
            else:
                assert code == DENIED, (method, kind, code)
    watches = {
        "WatchModels": (registry_pb2.WatchModelsRequest(), {"worker", "gateway", "admin"}),
        "WatchWorkers": (registry_pb2.WatchWorkersRequest(), {"gateway", "admin"}),
        "WatchApiKeys": (registry_pb2.WatchApiKeysRequest(), {"gateway", "admin"}),
    }
    for method, (request, allowed) in watches.items():
        for kind, client in clients.items():
            assert await _stream_code(client, method, request) == (OK if kind in allowed else DENIED), (method, kind)
    # Artifacts: workers download them, gateways may not; only the admin registers.
    assert await clients["worker"].download("colors", 1) == await admin.download("colors", 1)
    assert (await status_of(clients["gateway"].download("colors", 1)))[0] == DENIED
    for kind in ("worker", "gateway"):
        code, msg = await status_of(clients[kind].register("colors"))
        assert code == DENIED and f"a {kind} token may not" in msg
    for client in clients.values():
        await client.close()


async def test_a_worker_token_cannot_mint_a_key_or_move_an_alias(
    start_registry: StartRegistry, token: str, worker_token: str
) -> None:
    """The hole this closes: any worker could mint an admin key with the shared token."""
    server = await start_registry()
    admin, worker = Reg(f"127.0.0.1:{server.port}", token), Reg(f"127.0.0.1:{server.port}", worker_token)
    await admin.register("colors")
    await admin.register("colors")
    await admin.set_alias("colors", "production", (1, 100))
    code, _ = await status_of(worker.create_key(registry_pb2.ROLE_ADMIN))
    assert code == DENIED
    code, _ = await status_of(worker.set_alias("colors", "production", (2, 100)))
    assert code == DENIED
    assert (await admin.resolve("colors")).model.version == 1
    assert len((await admin.call("ListApiKeys", registry_pb2.ListApiKeysRequest())).keys) == 0
    await admin.close()
    await worker.close()


async def test_tokens_configured_as_sha256_digests(
    start_registry: StartRegistry, token: str, worker_token: str
) -> None:
    gateway_secret = secrets.token_hex(24)
    digest = "sha256:" + hashlib.sha256(gateway_secret.encode()).hexdigest()
    server = await start_registry(gateway_tokens=digest)
    address = f"127.0.0.1:{server.port}"
    gateway = Reg(address, gateway_secret)
    assert (await gateway.call("ListModels", model_pb2.ListModelsRequest())) is not None
    code, _ = await status_of(gateway.call("VerifyApiKey", registry_pb2.VerifyApiKeyRequest(secret="fv_x")))
    assert code == UNAUTH  # past the access check: the made-up key is unknown
    # The digest itself is no credential.
    code, _ = await status_of(Reg(address, digest).call("ListModels", model_pb2.ListModelsRequest()))
    assert code == UNAUTH
    await gateway.close()


async def test_rotation_old_and_new_both_work_then_the_old_is_unauthenticated(
    start_registry: StartRegistry, token: str
) -> None:
    old, new = secrets.token_hex(24), secrets.token_hex(24)
    listing = model_pb2.ListModelsRequest()
    during = await start_registry(worker_tokens=f"{old}, {new}")
    for t in (old, new):
        assert await Reg(f"127.0.0.1:{during.port}", t).heartbeat("w-rot") > 0
    after = await start_registry(worker_tokens=new)
    assert await Reg(f"127.0.0.1:{after.port}", new).heartbeat("w-rot") > 0
    code, msg = await status_of(Reg(f"127.0.0.1:{after.port}", old).call("ListModels", listing))
    assert code == UNAUTH and "not an API key or a current service token" in msg


def test_token_settings_that_stop_the_start(monkeypatch: pytest.MonkeyPatch) -> None:
    shared = secrets.token_hex(24)
    with pytest.raises(ValueError, match="both worker and gateway"):
        RegistryConfig(worker_tokens=shared, gateway_tokens=shared).token_table()
    for bad in ("short", "sha256:abc", "fv_" + "a" * 30):
        with pytest.raises(ValueError):
            TokenTable({"worker": bad})
    with pytest.raises(ValueError):
        WorkerConfig(accepted_tokens="sha256:" + "0" * 64)  # the fast port compares plain tokens
    for name in ("FOVEA_INTERNAL_TOKEN", "FOVEA_ACCEPTED_INTERNAL_TOKEN"):
        monkeypatch.setenv(name, shared)
        for config in (RegistryConfig, WorkerConfig, GatewayConfig):
            with pytest.raises(ValueError, match="no longer read"):
                config()
        monkeypatch.delenv(name)
    assert TokenTable({"worker": f"{shared},"}).kind_of(shared) == "worker"
    assert TokenTable({"worker": shared}).kind_of(shared + "x") is None
