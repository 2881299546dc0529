"""Gateway logic for the calls the native front relays to the Python server: admit the call (model access, limits,
quota) and resolve the version; the front then routes it (route) as it routes its own."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc

from fovea import log, tracing
from fovea.errors import DeadlineExpired, Draining, InvalidArgument, UpstreamError
from fovea.images import image_size
from fovea.names import check_name
from fovea.rpc import REQUEST_ID_HEADER
from fovea.v1 import image_pb2, model_pb2, registry_pb2
from gateway.auth import check_model_access
from gateway.config import GatewayConfig
from gateway.fast_port import InferCheck, NativeGateway
from gateway.forward import Forwards, ImageTensors
from gateway.metrics import STATUS_BY_VALUE, Metrics
from gateway.placement import ColdStarts
from gateway.ratelimit import RateLimiter
from gateway.routing import Versions, Workers
from inference import grpc_predict_v2_pb2 as pb

logger = logging.getLogger(__name__)
WORKER_INFER = "inference.GRPCInferenceService/ModelInfer"


class Gateway:
    def __init__(
        self, config: GatewayConfig, versions: Versions, workers: Workers, limiter: RateLimiter, metrics: Metrics
    ) -> None:
        self.config = config
        self.versions = versions
        self.workers = workers
        self.limiter = limiter
        self.metrics = metrics
        self.front: Forwards | None = None  # the native front's routed calls (set once it runs; None when stopped)
        self.checks: Callable[[bytes], InferCheck] | None = None  # the front's checks of a ModelInfer (fg_check_infer)
        self.native: NativeGateway | None = None  # the front itself: its checks of a Classify (fg_check_classify)
        self.cold_starts = ColdStarts(
            versions,
            workers,
            config.cold_start_wait_s,
            config.max_cold_waiters,
            config.demand_cache_s,
            config.demand_refresh_s,
            metrics.registry,
        )
        # built once: the hot path only appends the request id
        self._auth_md = ("authorization", f"Bearer {config.worker_token}")

    def internal_metadata(self) -> tuple[tuple[str, str], ...]:
        """Credentials for calls to workers (ModelStatistics), with the current request id."""
        rid = log.request_id.get()
        md = (self._auth_md, (REQUEST_ID_HEADER, rid)) if rid else (self._auth_md,)
        return md + tracing.headers() if tracing.tracer is not None else md  # the worker's span joins the trace

    def timeout_s(self, context: Any) -> float:
        """The caller's remaining deadline, or the default when it set none, never above the maximum."""
        remaining = context.time_remaining() if context is not None else None
        limit = self.config.max_deadline_ms / 1000
        if remaining is None:
            return min(self.config.default_deadline_ms / 1000, limit)
        return min(remaining, limit)

    async def route(
        self, model: str, version: int, request: bytes, timeout_s: float, *, tensors: bool = False, images: Any = None
    ) -> bytes:
        """Send a serialized call for a resolved version through the native front, which routes it as it routes
        its own calls (the worker's choice, the deadline, one retry of a call no worker ran, ejection: all in
        native/front.cc); returns the worker's serialized answer. When no worker has the version ready, wait for
        placement to load it (a cold start, or an alias that just moved) and send it again. images: a Classify's
        (gateway/forward.py ImageTensors), whose answer is then a ClassifyResponse."""
        if self.front is None:
            raise Draining("gateway is stopping; retry on another replica")
        deadline = time.monotonic() + timeout_s
        with tracing.client(WORKER_INFER, {"fovea.model": model, "fovea.model_version": str(version)}):
            metadata = tracing.headers()  # the worker's span joins the trace (empty when tracing is off)
            waited = False
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise DeadlineExpired("deadline passed before a worker could answer")
                routed = await self.front.send(
                    model,
                    version,
                    request,
                    remaining,
                    tensors=tensors,
                    request_id=log.request_id.get() or "",
                    metadata=metadata,
                    images=images,
                )
                if not routed.unrouted or waited:
                    break
                waited = True  # once: the front's table shows a worker as soon as the watch does
                await self.cold_starts.wait(model, version, deadline)
            code = STATUS_BY_VALUE.get(routed.code, grpc.StatusCode.UNKNOWN)
            if routed.worker:
                self.metrics.upstream_call(self.workers.id_of(routed.worker), code)
            if code == grpc.StatusCode.OK:
                return routed.data
            raise UpstreamError(code, routed.message)

    async def resolve(self, model: str, version: int, alias: str) -> model_pb2.ModelVersion:
        check_name(model)
        if alias:
            check_name(alias, "alias")
        with tracing.span("route"):  # which version the name, alias or production alias means
            mv = await self.versions.resolve(model, version, alias)
            tracing.annotate(model=mv.name, model_version=str(mv.version), alias=alias)
        # only resolved names reach the metrics labels, so callers cannot blow up their cardinality
        log.model_name.set(mv.name)
        log.model_version.set(str(mv.version))
        return mv

    async def quota(self, api_key: registry_pb2.ApiKey, images: int) -> None:
        """Charge the call to the key's rate limits; RESOURCE_EXHAUSTED when over."""
        try:
            await self.limiter.admit(api_key, images)
        except Exception:
            self.metrics.rate_limited.inc()
            raise

    def check_images(self, req: image_pb2.ClassifyRequest) -> int:
        """Check a Classify request against its limits, the front's rule (count, top_k, bytes, then each image's
        pixels from its header); returns top_k."""
        native = self.native
        if native is None or not native.handle:
            raise Draining("gateway is stopping; retry on another replica")
        top_k, refusal = native.check_classify([len(img.data) for img in req.images], req.top_k)
        if refusal:
            raise InvalidArgument(refusal)
        for i, img in enumerate(req.images):
            w, h = image_size(img.data)  # rejects non-images and bombs before any worker sees them
            refusal = native.check_pixels(i, w, h)
            if refusal:
                raise InvalidArgument(refusal)
        return top_k

    async def classify(
        self, api_key: registry_pb2.ApiKey, req: image_pb2.ClassifyRequest, timeout_s: float
    ) -> image_pb2.ClassifyResponse:
        check_model_access(api_key, req.model)
        top_k = self.check_images(req)
        await self.quota(api_key, len(req.images))
        mv = await self.resolve(req.model, req.version, req.alias)
        if not mv.HasField("preprocessing"):
            raise InvalidArgument(f"model {mv.name} v{mv.version} takes tensors, not images; use ModelInfer")
        out = image_pb2.ClassifyResponse(model=mv.name, version=mv.version)
        step = self.config.max_images_per_forward
        chunks = [list(req.images[i : i + step]) for i in range(0, len(req.images), step)]
        # Large calls go to the workers in chunks no bigger than a worker batch, in parallel.
        answers = await asyncio.gather(*(self._classify_chunk(mv, chunk, top_k, timeout_s) for chunk in chunks))
        for answer in answers:
            out.results.extend(answer.results)
        return out

    async def _classify_chunk(
        self, mv: model_pb2.ModelVersion, images: list[image_pb2.Image], top_k: int, timeout_s: float
    ) -> image_pb2.ClassifyResponse:
        """One worker batch of a Classify: the front builds the worker's call and reads its answer (the same code
        as for the Classify calls it answers itself)."""
        width = mv.outputs[0].shape[-1] if mv.outputs[0].shape else 0
        tensors = ImageTensors(mv.inputs[0].name, mv.outputs[0].name, max(0, width), top_k)
        request = image_pb2.ClassifyRequest(images=images).SerializeToString()
        answer = await self.route(mv.name, mv.version, request, timeout_s, images=tensors)
        return image_pb2.ClassifyResponse.FromString(answer)

    async def infer(
        self, api_key: registry_pb2.ApiKey, request: pb.ModelInferRequest, timeout_s: float
    ) -> pb.ModelInferResponse:
        """The public ModelInfer on a parsed request (streams): serialized once, then as infer_bytes."""
        answer = await self.infer_bytes(api_key, request.SerializeToString(), timeout_s)
        return pb.ModelInferResponse.FromString(answer)

    async def infer_bytes(self, api_key: registry_pb2.ApiKey, raw: bytes, timeout_s: float) -> bytes:
        """The public ModelInfer: check it, access and quota, resolve an empty version through production, and
        forward the request as it came plus the resolved version: the front reads it, the gateway's Python never
        parses it."""
        check = await self._admit_infer(api_key, raw)
        mv = await self.resolve(check.model, check.version, "")
        # always: a version asked as "007" reaches the worker as "7" (a later value of a field replaces one)
        raw = raw + version_field(str(mv.version))
        return await self.route(mv.name, mv.version, raw, timeout_s, tensors=check.tensors)

    async def _admit_infer(self, api_key: registry_pb2.ApiKey, raw: bytes) -> InferCheck:
        """The refusals in their order: the request's rules (the front's checks, the only copy), the key's model
        access, the per-call image limit, the key's quota."""
        if self.checks is None:
            raise Draining("gateway is stopping; retry on another replica")
        check = self.checks(raw)
        if check.refusal:  # malformed calls never reach a worker
            raise InvalidArgument(check.refusal)
        check_model_access(api_key, check.model)
        if check.over_limit:
            raise InvalidArgument(check.over_limit)
        # charged as the workers compute: an encoded image per element of a BYTES tensor, else a batch row
        await self.quota(api_key, check.images)
        return check

    async def wait_for_workers(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self.workers.ready.wait(), timeout_s)
        except TimeoutError:
            pass


def version_field(version: str) -> bytes:
    """ModelInferRequest.model_version (field 2, length-delimited) encoded on its own."""
    data = version.encode()
    return bytes([0x12, len(data)]) + data  # versions are short decimal strings: one-byte length
