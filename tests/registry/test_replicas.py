"""Acceptance 8: two registry replicas against one Redis behave as one registry."""

from __future__ import annotations

import time

import grpc

from fovea.v1 import model_pb2, registry_pb2
from tests.registry.conftest import StartRegistry
from tests.registry.helpers import Reg, Watch, status_of
from tests.tinymodels import color_model


async def test_register_through_one_read_and_watch_through_the_other(
    start_registry: StartRegistry, token: str, worker_token: str
) -> None:
    a_server, b_server = await start_registry(), await start_registry()
    a = Reg(f"127.0.0.1:{a_server.port}", token, worker_token=worker_token)
    b = Reg(f"127.0.0.1:{b_server.port}", token)
    models_b = Watch(b.stub.WatchModels(registry_pb2.WatchModelsRequest(), metadata=b.md))
    workers_b = Watch(b.stub.WatchWorkers(registry_pb2.WatchWorkersRequest(), metadata=b.md))
    keys_a = Watch(a.stub.WatchApiKeys(registry_pb2.WatchApiKeysRequest(), metadata=a.md))
    for w in (models_b, workers_b, keys_a):
        assert (await w.next())[1].snapshot

    t0 = time.monotonic()
    data = color_model(bias=3.0)
    mv = await a.register("colors", data, tags={"via": "a"})
    at, event = await models_b.until(lambda e: bool(e.versions))
    assert event.versions[0].version == 1 and at - t0 < 1.5  # validation included
    got = (await b.resolve("colors", version=1)).model
    assert got.SerializeToString(deterministic=True) == mv.SerializeToString(deterministic=True)
    assert await b.download("colors", 1) == data
    assert [m.name for m in (await b.call("ListModels", model_pb2.ListModelsRequest())).models] == ["colors"]

    t0 = time.monotonic()
    await a.set_alias("colors", "production", (1, 100))
    at, event = await models_b.until(lambda e: bool(e.aliases))
    assert event.aliases[0].name == "production" and at - t0 < 1.0
    assert (await b.resolve("colors")).alias.name == "production"
    # Numbers continue across replicas, and a rollback on one undoes a promotion on the other.
    assert (await b.register("colors", color_model(bias=4.0))).version == 2
    await b.set_alias("colors", "production", (2, 100))
    back = await a.call("RollbackAlias", registry_pb2.RollbackAliasRequest(model="colors"))
    assert [t.version for t in back.alias.targets] == [1]
    code, _ = await status_of(b.call("ArchiveVersion", registry_pb2.ArchiveVersionRequest(model="colors", version=1)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION  # b sees the alias a restored

    t0 = time.monotonic()
    await a.heartbeat("w1", (("colors", 1),))
    at, event = await workers_b.until(lambda e: bool(e.workers))
    assert event.workers[0].worker_id == "w1" and at - t0 < 1.0
    listed = await b.call("ListWorkers", registry_pb2.ListWorkersRequest(model="colors", ready_only=True))
    assert [w.worker_id for w in listed.workers] == ["w1"]

    key, secret = await a.create_key(registry_pb2.ROLE_INFER)
    as_key_on_b = b.with_token(secret)
    assert (await as_key_on_b.resolve("colors")).model.version == 1
    t0 = time.monotonic()
    await b.call("RevokeApiKey", registry_pb2.RevokeApiKeyRequest(key_id=key.key_id))
    at, _ = await keys_a.until(lambda e: key.key_id in e.key_ids)
    assert at - t0 < 1.0
    code, _ = await status_of(a.with_token(secret).resolve("colors"))
    assert code == grpc.StatusCode.UNAUTHENTICATED

    # One replica going away leaves the other serving everything.
    await a_server.stop(0.1)
    assert (await b.resolve("colors")).model.version == 1
    for w in (models_b, workers_b, keys_a):
        w.close()
    for c in (a, b, as_key_on_b):
        await c.close()
