"""API keys (secret shown once, salted digests, revoke, expiry) and the registry's access rules."""

from __future__ import annotations

import hashlib
import time

import grpc
import redis

from fovea.v1 import model_pb2, registry_pb2
from tests.registry.helpers import Reg, Watch, poll, status_of

INFER, PUBLISH, ADMIN = registry_pb2.ROLE_INFER, registry_pb2.ROLE_PUBLISH, registry_pb2.ROLE_ADMIN
DENIED = grpc.StatusCode.PERMISSION_DENIED
UNAUTH = grpc.StatusCode.UNAUTHENTICATED


def _all_redis_bytes(url: str) -> bytes:
    client = redis.Redis.from_url(url)
    out: list[bytes | str | None] = []
    for k in client.keys("*"):
        kind = client.type(k)
        if kind == b"string":
            out.append(client.get(k))
        elif kind == b"hash":
            out.extend(v for pair in (client.hgetall(k) or {}).items() for v in pair)
        elif kind == b"set":
            out.extend(client.smembers(k))
        elif kind == b"stream":
            out.extend(v for _, fields in client.xrange(k) or [] for v in (fields or {}).values())
        out.append(k)
    client.close()
    # redis-py's types allow str (decode_responses) and None; this client decodes nothing
    values = [v for v in out if isinstance(v, bytes)]
    assert len(values) == len(out), out
    return b"\n".join(values)


async def test_secret_is_shown_once_and_stored_only_as_a_salted_digest(reg: Reg, redis_url: str) -> None:
    key, secret = await reg.create_key(PUBLISH, ("colors-*",), ttl_s=3600)
    other, other_secret = await reg.create_key(INFER)
    assert secret.startswith(f"fv_{key.key_id}_") and len(secret) > 40
    assert key.role == PUBLISH and list(key.model_patterns) == ["colors-*"] and not key.revoked
    assert 3590 <= key.expires_at.seconds - time.time() <= 3610 and not other.HasField("expires_at")
    listed = (await reg.call("ListApiKeys", registry_pb2.ListApiKeysRequest())).keys
    assert sorted(k.key_id for k in listed) == sorted([key.key_id, other.key_id])
    listing_bytes = registry_pb2.ListApiKeysResponse(keys=listed).SerializeToString()
    stored = _all_redis_bytes(redis_url)
    for s in (secret, other_secret):
        rest = s.split("_", 2)[2]
        assert rest.encode() not in listing_bytes and rest.encode() not in stored
        assert hashlib.sha256(s.encode()).digest() not in stored  # not an unsalted hash either
    client = redis.Redis.from_url(redis_url)
    salts = [client.hget(f"fovea:apikey:{k}", "salt") for k in (key.key_id, other.key_id)]
    client.close()
    assert len(set(salts)) == 2 and all(isinstance(s, bytes) and len(s) == 16 for s in salts)
    # The secret works as a credential.
    as_key = reg.with_token(secret)
    assert (await as_key.call("ListModels", model_pb2.ListModelsRequest())).models == []
    await as_key.close()


async def test_revoked_wrong_and_expired_keys_are_unauthenticated(reg: Reg) -> None:
    key, secret = await reg.create_key(INFER)
    short, short_secret = await reg.create_key(INFER, ttl_s=1)
    watch = Watch(reg.stub.WatchApiKeys(registry_pb2.WatchApiKeysRequest(), metadata=reg.md))
    assert (await watch.next())[1].snapshot
    list_models = model_pb2.ListModelsRequest()
    assert await reg.with_token(short_secret).call("ListModels", list_models) is not None

    t0 = time.monotonic()
    revoked = (await reg.call("RevokeApiKey", registry_pb2.RevokeApiKeyRequest(key_id=key.key_id))).key
    assert revoked.revoked
    at, event = await watch.until(lambda e: key.key_id in e.key_ids)
    assert at - t0 < 1.0
    code, msg = await status_of(reg.with_token(secret).call("ListModels", list_models))
    assert code == UNAUTH and "revoked" in msg
    listed = {k.key_id: k for k in (await reg.call("ListApiKeys", registry_pb2.ListApiKeysRequest())).keys}
    assert listed[key.key_id].revoked and not listed[short.key_id].revoked

    forged = secret[:-4] + ("aaaa" if not secret.endswith("aaaa") else "bbbb")
    for token, expected in (
        (forged, "unknown API key"),
        ("fv_short", "malformed API key"),
        ("not-a-key", "not an API key or a current service token"),
    ):
        code, msg = await status_of(reg.with_token(token).call("ListModels", list_models))
        assert code == UNAUTH and expected in msg, token

    async def expired() -> bool:
        try:
            await reg.with_token(short_secret).call("ListModels", list_models)
            return False
        except grpc.aio.AioRpcError as exc:
            return exc.code() == UNAUTH and "expired" in (exc.details() or "")

    await poll(expired, timeout_s=5)
    code, msg = await status_of(reg.call("RevokeApiKey", registry_pb2.RevokeApiKeyRequest(key_id="a" * 12)))
    assert code == grpc.StatusCode.NOT_FOUND
    code, msg = await status_of(reg.call("CreateApiKey", registry_pb2.CreateApiKeyRequest()))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "role is required" in msg
    code, msg = await status_of(
        reg.call("CreateApiKey", registry_pb2.CreateApiKeyRequest(role=INFER, rate_limit_rps=-1))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "rate_limit_rps" in msg
    watch.close()


async def test_missing_or_malformed_credentials(reg: Reg) -> None:
    request = model_pb2.ListModelsRequest()
    code, msg = await status_of(reg.stub.ListModels(request, timeout=5))
    assert code == UNAUTH and "missing credentials" in msg
    code, msg = await status_of(reg.stub.ListModels(request, metadata=(("authorization", "Basic abc"),), timeout=5))
    assert code == UNAUTH and "malformed credentials" in msg
    code, msg = await status_of(reg.with_token("wrong-internal-token").call("ListModels", request))
    assert code == UNAUTH


async def test_roles_allow_exactly_their_calls(reg: Reg) -> None:
    await reg.register("colors")
    await reg.set_alias("colors", "production", (1, 100))
    keys, key_ids = {}, {}
    for role in (INFER, PUBLISH, ADMIN):
        record, secret = await reg.create_key(role)
        keys[role], key_ids[role] = reg.with_token(secret), record.key_id
    target = [model_pb2.AliasTarget(version=1, weight=100)]
    calls = {  # method -> (request, least role); None means a service token only
        "ListModels": (model_pb2.ListModelsRequest(), INFER),
        "GetModelVersion": (registry_pb2.GetModelVersionRequest(model="colors"), INFER),
        "ListVersions": (registry_pb2.ListVersionsRequest(model="colors"), INFER),
        "GetAliasHistory": (registry_pb2.GetAliasHistoryRequest(model="colors"), INFER),
        "SetAlias": (registry_pb2.SetAliasRequest(model="colors", alias="staging", targets=target), PUBLISH),
        "ListApiKeys": (registry_pb2.ListApiKeysRequest(), ADMIN),
        "ListWorkers": (registry_pb2.ListWorkersRequest(), ADMIN),
        "Heartbeat": (
            registry_pb2.HeartbeatRequest(
                status=registry_pb2.WorkerStatus(
                    worker_id="rogue", address="evil.example:1", state=registry_pb2.WORKER_STATE_READY
                )
            ),
            None,
        ),
        "VerifyApiKey": (registry_pb2.VerifyApiKeyRequest(secret="fv_x"), None),
    }
    for method, (request, least) in calls.items():
        for role, client in keys.items():
            if least is not None and role >= least:
                await client.call(method, request)
            else:
                code, msg = await status_of(client.call(method, request))
                assert code == DENIED, (method, role, msg)
                assert ("is only for" in msg) if least is None else ("this call needs" in msg)
    # Streaming and upload calls.
    for role, client in keys.items():
        if role >= PUBLISH:
            assert (await client.register("colors")).published_by == key_ids[role]
            assert await client.download("colors", 1)
        else:
            code, _ = await status_of(client.register("colors"))
            assert code == DENIED
            code, _ = await status_of(client.download("colors", 1))
            assert code == DENIED
        if role < ADMIN:
            code, _ = await status_of(client.call("CreateApiKey", registry_pb2.CreateApiKeyRequest(role=INFER)))
            assert code == DENIED
    for client in keys.values():
        await client.close()


async def test_model_patterns_limit_what_a_key_sees_and_touches(reg: Reg) -> None:
    await reg.register("colors-a")
    await reg.register("other")
    _, secret = await reg.create_key(PUBLISH, ("colors-*",))
    limited = reg.with_token(secret)
    assert [m.name for m in (await limited.call("ListModels", model_pb2.ListModelsRequest())).models] == ["colors-a"]
    assert (await limited.register("colors-b")).version == 1
    code, msg = await status_of(limited.register("other"))
    assert code == DENIED and "may not use model 'other'" in msg
    code, _ = await status_of(limited.resolve("other"))
    assert code == DENIED
    code, _ = await status_of(limited.set_alias("other", "production", (1, 100)))
    assert code == DENIED

    watch = Watch(limited.stub.WatchModels(registry_pb2.WatchModelsRequest(), metadata=limited.md))
    assert (await watch.next())[1].snapshot
    await reg.set_alias("other", "production", (1, 100))
    await reg.set_alias("colors-a", "production", (1, 100))
    _, event = await watch.next()
    assert [a.model for a in event.aliases] == ["colors-a"]  # the change to "other" was not shown
    watch.close()

    _, admin_secret = await reg.create_key(ADMIN, ("colors-*",))
    limited_admin = reg.with_token(admin_secret)
    code, msg = await status_of(limited_admin.call("CreateApiKey", registry_pb2.CreateApiKeyRequest(role=ADMIN)))
    assert code == DENIED and "without model patterns" in msg
    assert (await limited_admin.call("ListWorkers", registry_pb2.ListWorkersRequest(model="colors-a"))).workers == []
    code, _ = await status_of(limited_admin.call("ListWorkers", registry_pb2.ListWorkersRequest(model="other")))
    assert code == DENIED
    await limited.close()
    await limited_admin.close()
