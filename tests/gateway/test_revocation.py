"""Issue #18, fix 6: a key revoked while the gateway verifies it is never cached as valid, whether the call is one
the gateway's front answers itself (ModelInfer) or one it relays to the Python server (ModelMetadata).

The race needs the registry's answer ("valid") to reach the gateway after the revocation's watch event
does. A clearly named fault injection holds the real registry's answer back until the test has revoked
the key and seen the gateway take the event in; everything else is real (registry, Valkey, workers)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from fovea.v1 import registry_pb2
from gateway.auth import KeyVerifier
from inference import grpc_predict_v2_pb2 as pb
from tests.gateway.conftest import GatewayFactory, Stack, auth, status_of, wait_routable
from tests.gateway.test_fast_port import ident_request, until
from tests.gateway.test_quotas import infer_stub


class DelayedVerifications:
    """Fault injection: the registry's real VerifyApiKey answer, handed to the gateway only once released."""

    def __init__(self, link: KeyVerifier) -> None:
        self.link = link
        self.answered = asyncio.Event()
        self.release = asyncio.Event()

    async def verify_key(self, secret: str) -> registry_pb2.ApiKey:
        record = await self.link.verify_key(secret)
        self.answered.set()
        await self.release.wait()
        return record


@pytest.mark.parametrize("method", ["ModelInfer", "ModelMetadata"])
async def test_key_revoked_during_a_delayed_verification_is_refused_on_every_path(
    stack: Stack, gateways: GatewayFactory, method: str
) -> None:
    gw = await gateways()
    await wait_routable(gw, "ident")
    record, secret = await asyncio.to_thread(stack.rc.create_key, "infer")
    delayed = DelayedVerifications(gw.keys.link)
    gw.keys.link = delayed
    events: list[registry_pb2.WatchApiKeysResponse] = []
    forward = gw.keys.on_change

    def seen(event: registry_pb2.WatchApiKeysResponse) -> None:
        events.append(event)
        if forward is not None:
            forward(event)

    gw.keys.on_change = seen
    channel, stub = infer_stub(gw)
    calls = {
        "ModelInfer": lambda: stub.ModelInfer(ident_request(), metadata=auth(secret), timeout=10),
        "ModelMetadata": lambda: stub.ModelMetadata(
            pb.ModelMetadataRequest(name="ident"), metadata=auth(secret), timeout=10
        ),
    }
    in_flight = asyncio.ensure_future(status_of(calls[method]()))
    await asyncio.wait_for(delayed.answered.wait(), 10)  # the registry has said "valid"
    await asyncio.to_thread(stack.rc.revoke_key, record.key_id)
    assert await until(lambda: any(record.key_id in e.key_ids for e in events), 5), "the watch never said"
    delayed.release.set()  # the stale "valid" reaches the key cache only now
    code, message = await in_flight
    assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in message, (code, message)
    assert all(r.key_id != record.key_id for r, _ in gw.keys.entries.values()), "cached as valid"
    # refused on both paths from now on; a cached stale answer would be served for the cache's TTL (300 s)
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        for name, call in calls.items():
            code, message = await status_of(call())
            assert code == grpc.StatusCode.UNAUTHENTICATED, (name, code, message)
        await asyncio.sleep(0.05)
    assert gw.native is not None and gw.native.counts()["native"] == 0
    await channel.close()
