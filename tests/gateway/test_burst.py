"""A burst of thousands of calls opened at once gets answers, never a bare CANCELLED.

gRPC's core cancels calls that wait to be started beyond a pending-call limit (1000 by
default); clients get CANCELLED with no message and do not retry it, so each one is a lost
request. Fovea sets the limit from `max_pending_calls`; past its own limits (a worker's queue)
a call gets RESOURCE_EXHAUSTED with a reason instead.
"""

from __future__ import annotations

import asyncio
import collections

import grpc
import numpy as np

from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from tests.gateway.conftest import GatewayFactory, Stack, auth

BURST = 3000


def ident_request() -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name="ident")
    req.inputs.add(name="input", datatype="FP32", shape=[1, 4])
    req.raw_input_contents.append(np.arange(4, dtype=np.float32).tobytes())
    return req


async def burst(address: str, md: tuple[tuple[str, str], ...]) -> collections.Counter[str]:
    codes: collections.Counter[str] = collections.Counter()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        req = ident_request()
        await stub.ModelInfer(req, metadata=md, timeout=30)

        async def one() -> None:
            try:
                await stub.ModelInfer(req, metadata=md, timeout=60)
                codes["OK"] += 1
            except grpc.aio.AioRpcError as exc:
                codes[exc.code().name] += 1
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                    codes[f"details: {exc.details()}"] += 1

        await asyncio.gather(*(one() for _ in range(BURST)))
    return codes


async def test_burst_at_a_worker_is_answered_not_cancelled(stack: Stack) -> None:
    md = (("authorization", f"Bearer {stack.cluster.worker_call_token}"),)
    codes = await burst(stack.workers[0].address, md)
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"} and codes["OK"] > 0, codes


async def test_burst_at_a_gateway_is_answered_not_cancelled(stack: Stack, gateways: GatewayFactory) -> None:
    gw = await gateways()
    secret = await asyncio.to_thread(stack.key)
    codes = await burst(f"127.0.0.1:{gw.port}", auth(secret))
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"} and codes["OK"] > 0, codes
