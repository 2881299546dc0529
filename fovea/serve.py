"""Start and stop a grpc.aio server the same way in every service."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

logger = logging.getLogger(__name__)


def add_health(server: grpc.aio.Server, service_names: list[str]) -> health.aio.HealthServicer:
    servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection([*service_names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return servicer


async def set_serving(servicer: health.aio.HealthServicer, names: list[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *names]:
        await servicer.set(name, status)


async def run_until_signal(stop: Callable[[], Awaitable[None]]) -> None:
    """Wait for SIGTERM or SIGINT, then run stop()."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    logger.info("shutting down")
    await stop()


def run_service(main: Callable[[], Coroutine[object, None, None]]) -> None:
    """Run a service's main coroutine, on uvloop when it is installed (about 15% less CPU per call
    with grpc.aio here); FOVEA_UVLOOP=0 keeps the default loop."""
    import os

    if os.environ.get("FOVEA_UVLOOP", "1") != "0":
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
    asyncio.run(main())


def serve_forever(
    name: str, config: Any, build: Callable[[Any], Awaitable[Any]], address: Callable[[Any], str]
) -> None:
    """What every service's main() does: log, build the server, announce 'NAME: host:port' on
    stdout (fovea.cluster and `fovea up` wait for that line), run until SIGTERM, stop within grace_s."""
    import faulthandler

    from fovea.log import configure_logging

    configure_logging(name, config.log_level, config.log_json)
    # `kill -USR1 PID` writes every thread's Python stack to stderr: how to see where a stuck service is.
    faulthandler.register(signal.SIGUSR1, all_threads=True)

    from fovea import tracing

    tracing.setup(name)  # off unless OTEL_* configure an exporter; before the build, which wraps the handlers

    async def run() -> None:
        srv = await build(config)
        print(f"{name}: {address(srv)}", flush=True)
        await run_until_signal(lambda: srv.stop(config.grace_s))

    try:
        run_service(run)
    finally:
        tracing.shutdown()  # exports the spans still buffered
