"""A zero-compute Open Inference Protocol server: ModelInfer answers at once with the input echoed.

It exists to measure the harness itself (how many requests/s one client process can drive) and
the pure cost of a gRPC hop, with nothing behind it. ModelInfer is a raw-bytes handler that
returns one pre-serialized response without parsing the request: a Python server that parses
protobufs tops out near the client's own speed on a small machine, and then the figure would
measure the server, not the harness. With --processes N, N processes share the port through
SO_REUSEPORT (on by default in gRPC on Linux).

    python -m loadtest.zero_server --port 0      # prints "oip: 127.0.0.1:PORT", serves until SIGTERM
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
from typing import Any

import grpc

from fovea import codegen

codegen.require()

from inference import grpc_predict_v2_pb2 as pb  # noqa: E402
from inference import grpc_predict_v2_pb2_grpc as pb_grpc  # noqa: E402

SERVICE = "inference.GRPCInferenceService"


class ZeroComputeServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Health and metadata as a real OIP server answers them; ModelInfer echoes (slow path only:
    build_server routes ModelInfer to the raw handler below)."""

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=True)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        resp = pb.ModelMetadataResponse(name=request.name or "zero", versions=["1"], platform="zero-compute")
        resp.inputs.add(name="input", datatype="FP32", shape=[-1, 4])
        resp.outputs.add(name="output", datatype="FP32", shape=[-1, 4])
        return resp

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        return echo(request)


def echo(request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    resp = pb.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version or "1", id=request.id
    )
    for tensor in request.inputs:
        resp.outputs.add(name="output", datatype=tensor.datatype, shape=list(tensor.shape))
    resp.raw_output_contents.extend(request.raw_input_contents)
    return resp


ZERO_RESPONSE = pb.ModelInferResponse(model_name="zero", model_version="1").SerializeToString()


async def raw_model_infer(request: bytes, context: Any) -> bytes:
    return ZERO_RESPONSE


def build_server(
    servicer: pb_grpc.GRPCInferenceServiceServicer, host: str = "127.0.0.1", port: int = 0, raw_infer: bool = False
) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server for an OIP servicer; returns it (not started) and its bound port.

    raw_infer routes ModelInfer to a handler that neither parses nor builds protobufs.
    """
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ]
    )
    if raw_infer:
        # Registered first, so it wins over the servicer's ModelInfer.
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    SERVICE, {"ModelInfer": grpc.unary_unary_rpc_method_handler(raw_model_infer)}
                ),
            )
        )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    return server, bound


async def serve(
    servicer: pb_grpc.GRPCInferenceServiceServicer, host: str, port: int, raw_infer: bool = False, quiet: bool = False
) -> None:
    """Serve until SIGTERM or SIGINT; print 'oip: host:port' once listening (fovea.cluster reads it)."""
    server, bound = build_server(servicer, host, port, raw_infer)
    await server.start()
    if not quiet:
        print(f"oip: {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.zero_server", description=__doc__.split("\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port")
    p.add_argument("--processes", type=int, default=1, help="server processes sharing the port")
    p.add_argument("--quiet", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.processes < 1:
        p.error("--processes must be at least 1")
    port = args.port
    if args.processes > 1 and port == 0:
        from fovea.redis_server import free_port

        port = free_port(args.host)
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "loadtest.zero_server", "--host", args.host, "--port", str(port), "--quiet"]
        )
        for _ in range(args.processes - 1)
    ]
    try:
        asyncio.run(serve(ZeroComputeServicer(), args.host, port, raw_infer=True, quiet=args.quiet))
    finally:
        for child in children:
            child.terminate()
            child.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
