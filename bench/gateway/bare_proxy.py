"""The floor of a Python gRPC hop: a grpc.aio server that passes ModelInfer bytes to one worker
and back, with no authentication, routing, limits or metrics. bench_gateway.py runs it beside the
gateway so that the gateway's own cost can be told apart from the cost of any Python hop.

    python bench/gateway/bare_proxy.py WORKER_HOST:PORT LISTEN_PORT   (internal token in FOVEA_INTERNAL_TOKEN)
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import grpc

METHOD = "/inference.GRPCInferenceService/ModelInfer"


async def main(upstream: str, port: int) -> None:
    channel = grpc.aio.insecure_channel(upstream)
    call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
    md = (("authorization", f"Bearer {os.environ['FOVEA_INTERNAL_TOKEN']}"),)

    async def infer(request: bytes, context: Any) -> bytes:
        return await call(request, metadata=md, timeout=30)  # type: ignore[no-any-return]

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)}),))
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
