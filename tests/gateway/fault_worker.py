"""Fault injection: stand-in workers for the gateway's poison-call and refusal tests.

`python -m tests.gateway.fault_worker PORT` serves ModelInfer by dying: on the first call it receives, the
process exits at once (os._exit), so the gateway loses the connection with the call in flight, as when a
request crashes a real worker. `CountingWorker` is a healthy stand-in in the test's own process that records
every ModelInfer it receives and answers it. Both register through the registry's real Heartbeat call.
"""

from __future__ import annotations

import asyncio
import os
import sys
from typing import Any

import grpc

from fovea.registry_link import RegistryLink
from fovea.serve import add_health
from fovea.v1 import registry_pb2
from inference import grpc_predict_v2_pb2 as pb

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def _server(answer: Any, port: int = 0) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    handler = grpc.unary_unary_rpc_method_handler(answer)  # bytes in, bytes out
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {"ModelInfer": handler}),)
    )
    add_health(server, ["inference.GRPCInferenceService"])
    return server, server.add_insecure_port(f"127.0.0.1:{port}")


class CountingWorker:
    """A stand-in worker: every ModelInfer it receives is kept in `received` and answered, or with
    refuse=True refused as a draining worker refuses a call it will not run (UNAVAILABLE, `fovea-unserved: 1`)."""

    def __init__(self, refuse: bool = False) -> None:
        self.received: list[pb.ModelInferRequest] = []
        self.refuse = refuse
        self.server, self.port = _server(self._infer)

    async def _infer(self, request: bytes, context: Any) -> bytes:
        req = pb.ModelInferRequest.FromString(request)
        self.received.append(req)
        if self.refuse:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE, "worker is draining; retry on another worker", (("fovea-unserved", "1"),)
            )
        resp = pb.ModelInferResponse(model_name=req.model_name, model_version=req.model_version, id=req.id)
        return resp.SerializeToString()

    async def start(self) -> CountingWorker:
        await self.server.start()
        return self

    async def stop(self) -> None:
        await self.server.stop(0)


def status(worker_id: str, address: str, model: str, version: int, queue_depth: int) -> registry_pb2.WorkerStatus:
    """A ready worker serving model/version on both its ports at one address."""
    return registry_pb2.WorkerStatus(
        worker_id=worker_id,
        address=address,
        fast_address=address,
        state=registry_pb2.WORKER_STATE_READY,
        models=[registry_pb2.LoadedModel(name=model, version=version, ready=True)],
        queue_depth=queue_depth,
    )


async def heartbeat_forever(link: RegistryLink, statuses: list[registry_pb2.WorkerStatus]) -> None:
    """Keep the stand-ins listed at the registry as a worker's own heartbeat loop would."""
    while True:
        for st in statuses:
            await link.heartbeat(st)
        await asyncio.sleep(0.5)


async def _die_on_first_call(port: int) -> None:
    async def infer(request: bytes, context: Any) -> bytes:
        os._exit(3)  # fault injection: the call is in flight on this connection

    server, bound = _server(infer, port)
    await server.start()
    print(f"fault_worker: 127.0.0.1:{bound}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    asyncio.run(_die_on_first_call(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
