"""Acceptance 4: a key limited to R requests/s gets R accepted (within 15%) over 5 s, across two
gateway replicas that share their token buckets through Redis."""

from __future__ import annotations

import asyncio

import grpc

from tests.gateway.conftest import GatewayFactory, Stack, auth, classify_request, image_stub, status_of
from tests.tinymodels import png

R = 20.0
WINDOW_S = 5.0


async def test_rate_limit_shared_by_two_replicas(stack: Stack, gateways: GatewayFactory) -> None:
    first = await gateways(redis_url=stack.redis_url)
    second = await gateways(redis_url=stack.redis_url)
    _, secret = await asyncio.to_thread(lambda: stack.rc.create_key("infer", rate_limit_rps=R, rate_burst=2))
    req = classify_request(png((240, 20, 20)))
    channels = [image_stub(first), image_stub(second)]
    accepted = {0: 0, 1: 0}
    refused = 0
    hints: list[int] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + WINDOW_S

    async def client(replica: int) -> None:
        nonlocal refused
        stub = channels[replica][1]
        while loop.time() < end:
            call = stub.Classify(req, metadata=auth(secret), timeout=10)
            try:
                await call
                accepted[replica] += 1
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, exc
                assert "rate limit" in (exc.details() or "")
                refused += 1
                hint = dict(exc.trailing_metadata() or ()).get("retry-after-ms")
                assert hint is not None, "no retry-after-ms in the trailing metadata"
                hints.append(int(hint))
                await asyncio.sleep(min(int(hint), 20) / 1000)  # a polite client, capped to keep pressure on

    await asyncio.gather(*(client(i % 2) for i in range(8)))
    total = sum(accepted.values())
    print(
        f"accepted {total} in {WINDOW_S:.0f} s (limit {R:g}/s: {R * WINDOW_S:.0f}), "
        f"per replica {accepted}, refused {refused}"
    )
    assert abs(total - R * WINDOW_S) <= 0.15 * R * WINDOW_S
    assert accepted[0] > 0 and accepted[1] > 0
    assert refused > 0 and all(0 < h <= 1000 / R + 1 for h in hints)
    # images/s: a second key limited to 4 images/s with a burst of 4 takes one 4-image call, then waits
    _, img_secret = await asyncio.to_thread(lambda: stack.rc.create_key("infer", rate_limit_ips=4, rate_burst=4))
    four = classify_request(*[png((240, 20, 20))] * 4)
    stub = channels[0][1]
    assert (await status_of(stub.Classify(four, metadata=auth(img_secret), timeout=10)))[0] == grpc.StatusCode.OK
    code, message = await status_of(channels[1][1].Classify(four, metadata=auth(img_secret), timeout=10))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "images/s" in message
    for channel, _ in channels:
        await channel.close()
