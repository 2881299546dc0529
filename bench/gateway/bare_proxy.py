"""The floor of a Python gRPC hop: a grpc.aio server that passes the bytes of any unary
inference call (ModelInfer, and the metadata calls perf_analyzer makes first) to one worker and
back, with no authentication, routing, limits or metrics. bench_gateway.py runs it beside the
gateway so that the gateway's own cost can be told apart from the cost of any Python hop.

    python bench/gateway/bare_proxy.py WORKER_HOST:PORT LISTEN_PORT
    (the token it presents to the worker in FOVEA_GATEWAY_WORKER_TOKEN, as a gateway's)
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import grpc

SERVICE = "/inference.GRPCInferenceService/"


class Forward(grpc.GenericRpcHandler):
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.md = (("authorization", f"Bearer {os.environ['FOVEA_GATEWAY_WORKER_TOKEN']}"),)
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        method = details.method  # type: ignore[attr-defined]
        if not method.startswith(SERVICE):
            return None
        if method not in self.handlers:
            call = self.channel.unary_unary(method, request_serializer=None, response_deserializer=None)

            async def forward(request: bytes, context: Any) -> bytes:
                return await call(request, metadata=self.md, timeout=30)  # type: ignore[no-any-return]

            self.handlers[method] = grpc.unary_unary_rpc_method_handler(forward)
        return self.handlers[method]


async def main(upstream: str, port: int) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((Forward(grpc.aio.insecure_channel(upstream)),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"bare-proxy: 127.0.0.1:{port}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    if os.environ.get("FOVEA_UVLOOP", "1") != "0":  # the same event loop as the services (fovea.serve)
        try:
            import uvloop

            uvloop.install()
        except ImportError:
            pass
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
