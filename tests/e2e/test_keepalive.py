"""Servers accept the keepalive pings our channels send, instead of closing idle connections."""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fovea.config import channel_options, server_options


async def _channel_survives_idle_pings(options: list[tuple[str, int]]) -> bool:
    server = grpc.aio.server(options=options)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    # Pings every second (production: every 10 s) make the test quick; the default policy
    # closes such a connection after about 3.5 s here.
    client_options = [o for o in channel_options(1 << 20) if o[0] != "grpc.keepalive_time_ms"]
    client_options.append(("grpc.keepalive_time_ms", 1000))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=client_options)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
        await asyncio.sleep(6.0)
        return channel.get_state() == grpc.ChannelConnectivity.READY
    finally:
        await channel.close()
        await server.stop(None)


async def test_idle_connection_is_not_closed_for_too_many_pings() -> None:
    assert await _channel_survives_idle_pings(server_options(1 << 20))


async def test_default_server_policy_would_close_it() -> None:
    """The control: without Fovea's server options gRPC answers the same pings with GOAWAY."""
    assert not await _channel_survives_idle_pings([])
