"""Restarts: kill -9 of the registry process (acceptance 3) and a Redis restart under a running registry (acceptance 4).

Both use a dedicated Valkey server with append-only persistence, not the shared test server.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
import time
from typing import Any

import grpc

from fovea.cluster import Cluster
from fovea.redis_server import RedisServer
from fovea.registry_link import RegistryLink
from fovea.v1 import model_pb2, registry_pb2
from tests.registry.conftest import StartRegistry
from tests.registry.helpers import Reg, Watch, poll, status_of
from tests.tinymodels import color_model


async def _populate(reg: Reg) -> dict[str, Any]:
    """Models, versions, canary and plain aliases with history, an archived version, keys (one revoked)."""
    for i in range(3):
        await reg.register("colors", color_model(bias=float(i)), metrics={"top1": 0.5 + i / 10})
    await reg.register("digits", color_model(labels=("zero", "one", "two"), bias=9.0))
    await reg.set_alias("colors", "production", (1, 100))
    await reg.set_alias("colors", "production", (2, 90), (3, 10))
    await reg.set_alias("colors", "staging", (3, 100))
    await reg.set_alias("digits", "production", (1, 100))
    await reg.call("ArchiveVersion", registry_pb2.ArchiveVersionRequest(model="colors", version=1))
    kept, kept_secret = await reg.create_key(registry_pb2.ROLE_PUBLISH, ("colors*",), ttl_s=3600)
    gone, gone_secret = await reg.create_key(registry_pb2.ROLE_INFER)
    await reg.call("RevokeApiKey", registry_pb2.RevokeApiKeyRequest(key_id=gone.key_id))
    return {"kept": kept_secret, "gone": gone_secret, "state": await _state(reg)}


async def _state(reg: Reg) -> dict[str, Any]:
    """Everything the registry knows, as comparable bytes (timestamps included: nothing may change)."""
    models = (await reg.call("ListModels", model_pb2.ListModelsRequest())).models
    out: dict[str, Any] = {"models": [m.SerializeToString(deterministic=True) for m in models]}
    for m in models:
        versions = (await reg.call("ListVersions", registry_pb2.ListVersionsRequest(model=m.name))).versions
        out[f"versions:{m.name}"] = [v.SerializeToString(deterministic=True) for v in versions]
        out[f"artifacts:{m.name}"] = [
            await reg.download(m.name, v.version) for v in versions if v.state == model_pb2.VERSION_STATE_READY
        ]
        for a in m.aliases:
            h = await reg.call("GetAliasHistory", registry_pb2.GetAliasHistoryRequest(model=m.name, alias=a.name))
            out[f"history:{m.name}/{a.name}"] = h.SerializeToString(deterministic=True)
    keys = (await reg.call("ListApiKeys", registry_pb2.ListApiKeysRequest())).keys
    out["keys"] = sorted(k.SerializeToString(deterministic=True) for k in keys)
    return out


async def test_kill_9_registry_and_restart_keeps_everything(tmp_path: pathlib.Path) -> None:
    """Acceptance 3."""
    cluster = Cluster(tmp_path / "c")  # no redis_url: its own Valkey with appendonly yes
    try:
        first = await asyncio.to_thread(cluster.start_registry)
        reg = Reg(first.address, cluster.admin_token, worker_token=cluster.worker_token)
        before = await _populate(reg)
        assert len(before["state"]["versions:colors"]) == 3 and len(before["state"]["keys"]) == 2
        # How gateways and workers watch: RegistryLink.follow reopens the stream after losing it.
        link = RegistryLink(first.address, cluster.gateway_token)
        events: asyncio.Queue[tuple[float, registry_pb2.WatchModelsResponse]] = asyncio.Queue()
        stop = asyncio.Event()
        follower = asyncio.create_task(
            link.follow("models", link.watch_models, lambda e: events.put_nowait((time.monotonic(), e)), stop)
        )
        assert (await asyncio.wait_for(events.get(), 10))[1].snapshot

        first.kill()  # SIGKILL
        assert first.proc.returncode == -9
        port = int(first.address.rsplit(":", 1)[1])
        await asyncio.to_thread(cluster.start_registry, port)  # same address: clients just reconnect
        assert await _state(reg) == before["state"]
        _, resync = await asyncio.wait_for(events.get(), 10)
        assert resync.snapshot and {a.name for a in resync.aliases} == {"production", "staging"}
        t0 = time.monotonic()
        await reg.set_alias("digits", "staging", (1, 100))
        at, event = await asyncio.wait_for(events.get(), 5)
        assert [(a.model, a.name) for a in event.aliases] == [("digits", "staging")] and at - t0 < 1.0
        stop.set()
        follower.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await follower
        await link.close()
        kept = reg.with_token(before["kept"])
        assert (await kept.resolve("colors", alias="staging")).model.version == 3
        code, msg = await status_of(reg.with_token(before["gone"]).call("ListModels", model_pb2.ListModelsRequest()))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in msg
        # Numbering carries on, and a rollback finds the history.
        assert (await reg.register("colors", color_model(bias=5.0))).version == 4
        await reg.set_alias("colors", "production", (4, 100))
        back = await reg.call("RollbackAlias", registry_pb2.RollbackAliasRequest(model="colors"))
        assert [(t.version, t.weight) for t in back.alias.targets] == [(2, 90), (3, 10)]
        await reg.close()
        await kept.close()
    finally:
        await asyncio.to_thread(cluster.stop)


async def test_registry_serves_within_two_seconds_of_redis_coming_back(
    start_registry: StartRegistry, token: str, worker_token: str, tmp_path: pathlib.Path
) -> None:
    """Acceptance 4: restart an append-only Valkey under a running registry; nothing is lost."""
    redis = RedisServer(tmp_path / "aof", appendonly=True).start()
    try:
        server = await start_registry(redis_url=redis.url, heartbeat_ttl_s=30.0)
        reg = Reg(f"127.0.0.1:{server.port}", token, timeout_s=10, worker_token=worker_token)
        before = await _populate(reg)
        models_watch = Watch(reg.stub.WatchModels(registry_pb2.WatchModelsRequest(), metadata=reg.md))
        workers_watch = Watch(reg.stub.WatchWorkers(registry_pb2.WatchWorkersRequest(), metadata=reg.md))
        assert (await models_watch.next())[1].snapshot and (await workers_watch.next())[1].snapshot

        await asyncio.to_thread(redis.stop)  # SIGTERM: Valkey flushes its append-only file
        t0 = time.monotonic()
        code, msg = await status_of(reg.call("ListModels", model_pb2.ListModelsRequest()))
        assert code == grpc.StatusCode.UNAVAILABLE and "Redis" in msg
        assert time.monotonic() - t0 < 8.0  # a bounded wait, never a hang

        await asyncio.to_thread(redis.start)  # same port, same data directory
        back = time.monotonic()
        quick = Reg(reg.address, token, timeout_s=1.0)

        async def serves() -> bool:
            try:
                await quick.call("ListModels", model_pb2.ListModelsRequest())
                return True
            except grpc.aio.AioRpcError:
                return False

        await poll(serves, timeout_s=10, every_s=0.02)
        recovered_s = time.monotonic() - back
        assert recovered_s < 2.0, f"registry served again {recovered_s:.2f}s after Redis came back"
        assert await _state(reg) == before["state"]

        # The streams stayed open: after Redis returns they resync, and changes arrive within a second.
        t1 = time.monotonic()
        await reg.set_alias("colors", "production", (3, 100))
        at, _ = await models_watch.until(
            lambda e: any(
                a.name == "production" and a.model == "colors" and [t.version for t in a.targets] == [3]
                for a in e.aliases
            ),
            timeout_s=5,
        )
        assert at - t1 < 1.0
        t2 = time.monotonic()
        await reg.heartbeat("w-after", (("colors", 3),))
        at, _ = await workers_watch.until(lambda e: any(w.worker_id == "w-after" for w in e.workers), timeout_s=5)
        assert at - t2 < 1.0
        models_watch.close()
        workers_watch.close()
        await quick.close()
        await reg.close()
    finally:
        await asyncio.to_thread(redis.stop)
