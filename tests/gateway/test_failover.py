"""Acceptance 2: two workers under steady load, kill -9 one: only the calls in flight on it fail (they may be
what killed it, so they are not retried: issue 18), and the dead worker is no longer chosen."""

from __future__ import annotations

import asyncio

import grpc

from tests.gateway.conftest import Stack, auth, classify_request, gateway_over_workers, image_stub
from tests.tinymodels import png


async def test_kill_9_one_worker_under_load(own_stack: Stack) -> None:
    stack = own_stack
    gw = await gateway_over_workers(stack, "colors")
    assert len(gw.gateway.workers.endpoints) == 2
    secret = await asyncio.to_thread(stack.key)
    channel, stub = image_stub(gw)
    req = classify_request(png((240, 20, 20)))
    ok, failures = 0, []
    stop = asyncio.Event()

    async def client() -> None:
        nonlocal ok
        while not stop.is_set():
            try:
                resp = await stub.Classify(req, metadata=auth(secret), timeout=30)
                assert resp.results[0].labels[0].label == "red"
                ok += 1
            except Exception as exc:  # noqa: BLE001 - every failure is collected and reported
                failures.append(exc)

    clients = [asyncio.create_task(client()) for _ in range(4)]
    await asyncio.sleep(1.5)
    victim = stack.workers[0]
    victim_id = next(wid for wid, ep in gw.gateway.workers.endpoints.items() if ep.status.address == victim.address)
    before_kill = ok
    victim.kill()  # SIGKILL: no draining heartbeat, connections drop mid-call
    await asyncio.sleep(1.5)
    chosen_after_ejection = _attempts(gw, victim_id)
    await asyncio.sleep(2.5)
    stop.set()
    await asyncio.gather(*clients)
    await asyncio.sleep(0.3)  # the native front's records reach the metrics every 0.2 s
    assert gw.native is not None
    retries = gw.native.counts()["retries"]  # the front routes every call, and counts its retries
    print(
        f"{ok} calls ({ok - before_kill} after the kill), {len(failures)} failed, "
        f"{retries} retried; attempts on the dead worker {chosen_after_ejection}; front {gw.native.counts()}"
    )
    # only calls sent on the killed worker's connection: the one in flight and one sent before the drop was seen
    assert len(failures) <= 2 * 4, failures
    for exc in failures:
        assert isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNAVAILABLE, exc
        assert "dropped the connection while running this call" in (exc.details() or ""), exc
    assert f"fovea_gateway_upstream_retries_total {float(retries)}" in gw.metrics.exposition().decode()
    assert ok - before_kill > 20
    assert _attempts(gw, victim_id) == chosen_after_ejection, "the dead worker was still chosen"
    await channel.close()
    await gw.stop(0)


def _attempts(gw: object, worker_id: str) -> float:
    """Every call the gateway sent to the worker, whatever its outcome."""
    total = 0.0
    for sample in gw.metrics.upstream.collect()[0].samples:  # type: ignore[attr-defined]
        if sample.name.endswith("_total") and sample.labels["worker"] == worker_id:
            total += sample.value
    return total
