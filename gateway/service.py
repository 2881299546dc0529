"""Gateway logic: admit the call (model access, limits, quota), resolve the version,
pick a worker, forward with the caller's deadline, and retry once on another worker a call that never ran."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from fovea import log, oip, tracing
from fovea.errors import DeadlineExpired, InvalidArgument, NoHealthyWorker, UpstreamError
from fovea.images import image_size
from fovea.names import check_name
from fovea.rpc import REQUEST_ID_HEADER
from fovea.v1 import image_pb2, model_pb2, registry_pb2
from gateway.auth import check_model_access
from gateway.config import GatewayConfig
from gateway.metrics import Metrics
from gateway.placement import ColdStarts
from gateway.ratelimit import RateLimiter, call_images
from gateway.routing import Versions, Workers, dropped_message, never_served
from gateway.validate import check_infer, check_version
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
        self.retries = 0
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
        """Credentials for calls to workers, with the current request id."""
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

    async def forward(self, request: pb.ModelInferRequest, timeout_s: float) -> pb.ModelInferResponse:
        """Send a ModelInfer for a resolved version; retry once on another worker if the first never ran it
        (no connection, or a deliberate refusal): a call in flight when a worker's connection dropped is not
        retried, since it may be what broke the worker."""
        if tracing.recording():
            return await self._traced(request.model_name, int(request.model_version), request, timeout_s, False)  # type: ignore[no-any-return]
        return await self._forward(request.model_name, int(request.model_version), request, timeout_s, False)  # type: ignore[no-any-return]

    async def forward_bytes(
        self, model: str, version: int, request: bytes, timeout_s: float, tensors: bool = False
    ) -> bytes:
        """forward() for a serialized ModelInferRequest; returns the serialized response. tensors: the
        request carries only raw tensors, which a worker's fast port takes."""
        if tracing.recording():  # to the worker's main port, which traces the call (its fast port does not)
            return await self._traced(model, version, request, timeout_s, True)  # type: ignore[no-any-return]
        return await self._forward(model, version, request, timeout_s, True, tensors)  # type: ignore[no-any-return]

    async def _traced(self, model: str, version: int, request: Any, timeout_s: float, raw: bool) -> Any:
        """_forward() in a client span (the worker's choice, its call, a retry): the worker's span's parent."""
        with tracing.client(WORKER_INFER, {"fovea.model": model, "fovea.model_version": str(version)}):
            return await self._forward(model, version, request, timeout_s, raw)

    async def _forward(
        self, model: str, version: int, request: Any, timeout_s: float, raw: bool, tensors: bool = False
    ) -> Any:
        deadline = time.monotonic() + timeout_s
        tried: frozenset[str] = frozenset()
        md = self.internal_metadata()
        for attempt in range(2):
            try:
                wid, ep = self.workers.choose(model, version, tried)
            except NoHealthyWorker:
                if tried:  # a retry goes only where the version is ready already
                    raise
                # no worker has it ready: placement may be loading it (a cold start, or an alias just moved)
                wid, ep = await self.cold_starts.wait(model, version, deadline)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExpired("deadline passed before a worker could answer")
            ep.in_flight += 1
            fast = raw and tensors and ep.fast_infer_bytes is not None
            try:
                if raw:
                    call = ep.fast_infer_bytes if fast else ep.infer_bytes
                else:
                    call = ep.stub.ModelInfer
                response = await call(request, timeout=remaining, metadata=md)
                ep.failures = 0
                ep.served += 1
                self.metrics.upstream_call(wid, grpc.StatusCode.OK)
                return response
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or exc.code().name
                self.metrics.upstream_call(wid, code)
                if code != grpc.StatusCode.UNAVAILABLE:
                    raise UpstreamError(code, details) from None
                self.workers.record(ep, False)
                if not never_served(code, details, exc.trailing_metadata()):  # it may have run: a poison call?
                    address = ep.status.fast_address if fast else ep.status.address
                    raise UpstreamError(code, dropped_message(address, details)) from None
                if attempt == 0 and deadline - time.monotonic() > 0.001:
                    self.retries += 1
                    self.metrics.retries.inc()
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
        """Validate a Classify request's limits; returns top_k."""
        if not req.images:
            raise InvalidArgument("no images: send at least one encoded image")
        if len(req.images) > self.config.max_images_per_call:
            raise InvalidArgument(
                f"{len(req.images)} images in one call; the limit is {self.config.max_images_per_call}"
            )
        top_k = req.top_k or self.config.default_top_k
        if top_k > self.config.max_top_k:
            raise InvalidArgument(f"top_k {top_k} exceeds the limit of {self.config.max_top_k}")
        for i, img in enumerate(req.images):
            if len(img.data) > self.config.max_image_bytes:
                raise InvalidArgument(f"image {i} is {len(img.data)} bytes; the limit is {self.config.max_image_bytes}")
            w, h = image_size(img.data)  # rejects non-images and bombs before any worker sees them
            if w * h > self.config.max_image_pixels:
                raise InvalidArgument(
                    f"image {i} is {w}x{h} = {w * h} pixels; the limit is {self.config.max_image_pixels}"
                )
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
        for chunk, (version, labels) in zip(chunks, answers, strict=False):
            out.version = version
            for img, image_labels in zip(chunk, labels, strict=False):
                out.results.add(image_id=img.id, labels=image_labels)
        return out

    async def _classify_chunk(
        self, mv: model_pb2.ModelVersion, images: list[image_pb2.Image], top_k: int, timeout_s: float
    ) -> tuple[int, list[list[image_pb2.Label]]]:
        infer = pb.ModelInferRequest(model_name=mv.name, model_version=str(mv.version))
        infer.inputs.add(name=mv.inputs[0].name, datatype="BYTES", shape=[len(images)])
        infer.raw_input_contents.append(oip.encode_bytes([img.data for img in images]))
        requested = infer.outputs.add(name=mv.outputs[0].name)
        # Classify's top_k means "at most": the default 5 on a 3-class model answers 3 labels, where
        # the classification extension's k must fit the output's width.
        width = mv.outputs[0].shape[-1] if mv.outputs[0].shape else 0
        requested.parameters["classification"].int64_param = min(top_k, width) if width > 0 else top_k
        resp = await self.forward(infer, timeout_s)
        shape = resp.outputs[0].shape
        items = oip.decode_bytes(resp.raw_output_contents[0], int(shape[0] * shape[1]))
        k = int(shape[1])
        labels = []
        for i in range(len(images)):
            row = []
            for item in items[i * k : (i + 1) * k]:
                score, index, *rest = item.decode().split(":", 2)
                row.append(image_pb2.Label(label=rest[0] if rest else "", index=int(index), score=float(score)))
            labels.append(row)
        return int(resp.model_version or mv.version), labels

    async def infer(
        self, api_key: registry_pb2.ApiKey, request: pb.ModelInferRequest, timeout_s: float
    ) -> pb.ModelInferResponse:
        """The public ModelInfer: check access and quota, resolve an empty version through production, forward."""
        mv = await self._admit_infer(api_key, request)
        request.model_version = str(mv.version)
        return await self.forward(request, timeout_s)

    async def infer_bytes(self, api_key: registry_pb2.ApiKey, raw: bytes, timeout_s: float) -> bytes:
        """infer() on the serialized request, which is forwarded as it came (plus the resolved
        version when it named none): the gateway parses it once and never serializes it again."""
        try:
            request = pb.ModelInferRequest.FromString(raw)
        except DecodeError:
            raise InvalidArgument("the request is not a valid ModelInferRequest message") from None
        mv = await self._admit_infer(api_key, request)
        version = str(mv.version)
        if request.model_version != version:
            raw = raw + version_field(version)  # a later value of a field replaces an earlier one
        return await self.forward_bytes(mv.name, mv.version, raw, timeout_s, raw_tensors_only(request))

    async def _admit_infer(self, api_key: registry_pb2.ApiKey, request: pb.ModelInferRequest) -> model_pb2.ModelVersion:
        check_infer(request, self.config.max_top_k)  # malformed calls never reach a worker
        version = check_version(request.model_version)
        check_model_access(api_key, request.model_name)
        # charged as the workers compute: an encoded image per element of a BYTES tensor, else a batch row
        await self.quota(api_key, call_images(request.inputs, self.config.max_images_per_call))
        return await self.resolve(request.model_name, version, "")

    async def wait_for_workers(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self.workers.ready.wait(), timeout_s)
        except TimeoutError:
            pass


def version_field(version: str) -> bytes:
    """ModelInferRequest.model_version (field 2, length-delimited) encoded on its own."""
    data = version.encode()
    return bytes([0x12, len(data)]) + data  # versions are short decimal strings: one-byte length


def raw_tensors_only(request: pb.ModelInferRequest) -> bool:
    """Whether every input is a raw numeric tensor: what a worker's fast port serves (not images or typed contents)."""
    return len(request.raw_input_contents) == len(request.inputs) > 0 and all(
        t.datatype != "BYTES" for t in request.inputs
    )
