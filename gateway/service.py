"""Gateway logic: resolve the version, pick a worker, forward with a deadline, retry once."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc

from fovea import oip
from fovea.errors import DeadlineExpired, InvalidArgument, UpstreamError
from fovea.images import image_size
from fovea.names import check_name
from fovea.rpc import call_metadata
from fovea.v1 import image_pb2, model_pb2
from gateway.config import GatewayConfig
from gateway.routing import Versions, Workers
from inference import grpc_predict_v2_pb2 as pb

logger = logging.getLogger(__name__)

RETRYABLE = {grpc.StatusCode.UNAVAILABLE}


class Gateway:
    def __init__(self, config: GatewayConfig, versions: Versions, workers: Workers) -> None:
        self.config = config
        self.versions = versions
        self.workers = workers
        self.retries = 0

    def timeout_s(self, context: Any) -> float:
        remaining = context.time_remaining() if context is not None else None
        limit = self.config.max_deadline_ms / 1000
        if remaining is None:
            return min(self.config.default_deadline_ms / 1000, limit)
        return min(remaining, limit)

    async def forward(self, request: pb.ModelInferRequest, timeout_s: float) -> pb.ModelInferResponse:
        """Send a ModelInfer for a resolved version; on UNAVAILABLE retry once on another worker."""
        deadline = time.monotonic() + timeout_s
        model, version = request.model_name, int(request.model_version)
        tried: frozenset[str] = frozenset()
        md = call_metadata(self.config.internal_token)
        for attempt in range(2):
            wid, ep = self.workers.choose(model, version, tried)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExpired("deadline passed before a worker could answer")
            ep.in_flight += 1
            try:
                response = await ep.stub.ModelInfer(request, timeout=remaining, metadata=md)
                self.workers.record(ep, True)
                ep.served += 1
                return response
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code in RETRYABLE:
                    self.workers.record(ep, False)
                if code in RETRYABLE and attempt == 0 and deadline - time.monotonic() > 0.001:
                    self.retries += 1
                    logger.info("worker %s answered %s; retrying on another worker", wid, code.name)
                    tried = tried | {wid}
                    continue
                raise UpstreamError(code, exc.details() or code.name) from None
            finally:
                ep.in_flight -= 1
        raise AssertionError("unreachable")

    async def resolve(self, model: str, version: int, alias: str) -> model_pb2.ModelVersion:
        check_name(model)
        if alias:
            check_name(alias, "alias")
        return await self.versions.resolve(model, version, alias)

    async def classify(self, req: image_pb2.ClassifyRequest, timeout_s: float) -> image_pb2.ClassifyResponse:
        if not req.images:
            raise InvalidArgument("no images: send at least one encoded image")
        if len(req.images) > self.config.max_images_per_call:
            raise InvalidArgument(f"{len(req.images)} images in one call; the limit is {self.config.max_images_per_call}")
        top_k = req.top_k or self.config.default_top_k
        if top_k > self.config.max_top_k:
            raise InvalidArgument(f"top_k {top_k} exceeds the limit of {self.config.max_top_k}")
        for i, img in enumerate(req.images):
            if len(img.data) > self.config.max_image_bytes:
                raise InvalidArgument(f"image {i} is {len(img.data)} bytes; the limit is {self.config.max_image_bytes}")
            w, h = image_size(img.data)  # rejects non-images and bombs before any worker sees them
            if w * h > self.config.max_image_pixels:
                raise InvalidArgument(f"image {i} is {w}x{h} = {w * h} pixels; the limit is {self.config.max_image_pixels}")
        mv = await self.resolve(req.model, req.version, req.alias)
        if not mv.HasField("preprocessing"):
            raise InvalidArgument(f"model {mv.name} v{mv.version} takes tensors, not images; use ModelInfer")
        out_name = mv.outputs[0].name
        infer = pb.ModelInferRequest(model_name=mv.name, model_version=str(mv.version))
        infer.inputs.add(name=mv.inputs[0].name, datatype="BYTES", shape=[len(req.images)])
        infer.raw_input_contents.append(oip.encode_bytes([img.data for img in req.images]))
        requested = infer.outputs.add(name=out_name)
        requested.parameters["classification"].int64_param = top_k
        resp = await self.forward(infer, timeout_s)
        items = oip.decode_bytes(resp.raw_output_contents[0], int(resp.outputs[0].shape[0] * resp.outputs[0].shape[1]))
        k = int(resp.outputs[0].shape[1])
        out = image_pb2.ClassifyResponse(model=mv.name, version=int(resp.model_version or mv.version))
        for i, img in enumerate(req.images):
            result = out.results.add(image_id=img.id)
            for item in items[i * k:(i + 1) * k]:
                score, index, *rest = item.decode().split(":", 2)
                result.labels.add(label=rest[0] if rest else "", index=int(index), score=float(score))
        return out

    async def infer(self, request: pb.ModelInferRequest, timeout_s: float) -> pb.ModelInferResponse:
        """The public ModelInfer: resolve an empty version through the production alias, then forward."""
        version = 0
        if request.model_version:
            try:
                version = int(request.model_version)
            except ValueError:
                raise InvalidArgument(f"model_version must be a number, got {request.model_version[:40]!r}") from None
        mv = await self.resolve(request.model_name, version, "")
        request.model_version = str(mv.version)
        return await self.forward(request, timeout_s)

    async def wait_for_workers(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self.workers.ready.wait(), timeout_s)
        except TimeoutError:
            pass
