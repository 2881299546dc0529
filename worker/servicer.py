"""The worker's Open Inference Protocol servicer: validate, submit to the batcher, shape the reply."""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from fovea import oip, tracing
from fovea.errors import InvalidArgument, ModelNotReady
from fovea.images import decode, preprocess
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from worker.batcher import Timing
from worker.config import WorkerConfig
from worker.metrics import WorkerMetrics
from worker.models import Loaded, ModelManager

SERVER_NAME = "fovea-worker"


class WorkerServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(
        self, manager: ModelManager, config: WorkerConfig, decode_pool: ThreadPoolExecutor, metrics: WorkerMetrics
    ) -> None:
        self.manager = manager
        self.config = config
        self.decode_pool = decode_pool
        self.metrics = metrics
        self.accepting = True
        self.in_flight = 0

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:
        ready = self.accepting and any(lv.ready for lv in self.manager.loaded.values())
        return pb.ServerReadyResponse(ready=ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        try:
            self.manager.get(request.name, request.version)
            return pb.ModelReadyResponse(ready=self.accepting)
        except Exception:  # noqa: BLE001 - not ready, whatever the reason
            return pb.ModelReadyResponse(ready=False)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Any) -> pb.ServerMetadataResponse:
        return server_metadata()

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        lv = self.manager.get(request.name, request.version)
        return oip.model_metadata(lv.mv, [str(k[1]) for k in self.manager.loaded if k[0] == request.name])

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:
        return self.manager.config_response(self.manager.get(request.name, request.version))

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: Any) -> pb.ModelStatisticsResponse:
        if request.name:
            self.manager.get(request.name, request.version)  # NOT_FOUND for a model this worker does not serve
        reports = []
        for (name, version), lv in sorted(self.manager.loaded.items()):
            if request.name in ("", name) and request.version in ("", str(version)) and lv.ready:
                reports.append(pb.ModelStatisticsResponse(model_stats=[lv.stats.to_proto(name, version)]))
                fast = self.manager.fast_statistics(lv)  # calls served on the fast port
                if fast is not None:
                    reports.append(pb.ModelStatisticsResponse(model_stats=[fast]))
        return oip.merge_statistics(reports)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        if not self.accepting:
            raise ModelNotReady("worker is draining; retry on another worker")
        t0 = time.perf_counter()
        lv = self.manager.get(request.model_name, request.model_version)
        timing = Timing() if tracing.recording() else None  # the batcher notes its times for the trace
        t_input = t_output = 0.0
        n = 0
        self.in_flight += 1
        try:
            wanted = requested_outputs(lv, request)  # before any decoding or compute
            inputs, n = await self._inputs(lv, request)
            t_input = time.perf_counter()
            lv.stats.compute_input.add(t_input - t0)
            remaining = context.time_remaining()
            timeout_s = remaining if remaining is not None else self.config.default_deadline_ms / 1000
            fut = lv.batcher.submit(inputs, n, t0 + timeout_s, timing)
            try:
                outputs = await fut
            except asyncio.CancelledError:
                fut.cancel()
                raise
            t_output = time.perf_counter()
            response = build_response(lv, request, outputs, wanted)
            done = time.perf_counter()
            lv.stats.compute_output.add(done - t_output)
            lv.stats.success.add(done - t0)
            self.metrics.series(lv.mv.name, str(lv.mv.version))[3].observe(done - t0)
            return response
        except BaseException:
            lv.stats.fail.add(time.perf_counter() - t0)
            raise
        finally:
            self.in_flight -= 1
            if timing is not None:
                self._trace(lv, request, timing, n, t0, t_input, t_output)

    def _trace(
        self,
        lv: Loaded,
        request: pb.ModelInferRequest,
        timing: Timing,
        n: int,
        t0: float,
        t_input: float,
        t_output: float,
    ) -> None:
        """The traced call's steps as children of its server span, from the times measured: preprocessing
        (decoding and resizing images, or reading tensors), the wait in the queue, the compute of the batch it
        ran in (a span of its own in each call's trace, with the batch's times and number), and the answer."""
        done = time.perf_counter()
        clock = tracing.Clock()
        images = request.inputs[0].datatype == "BYTES" if request.inputs else False
        tracing.annotate(
            model=lv.mv.name,
            model_version=str(lv.mv.version),
            worker_id=self.config.worker_id,
        )
        if timing.batch_size:
            tracing.annotate(batch_size=timing.batch_size)
        if images:
            tracing.annotate(images=n)
        if t_input:
            tracing.past("preprocess", clock, t0, t_input, {"fovea.images": n} if images else None)
        if timing.compute_end:
            tracing.past("queue wait", clock, timing.enqueued, timing.taken)
            batch = {"fovea.batch_size": timing.batch_size, "fovea.batch_calls": timing.batch_calls}
            tracing.past(
                "compute", clock, timing.compute_start, timing.compute_end, {**batch, "fovea.batch": timing.batch}
            )
        if t_output:
            tracing.past("answer", clock, t_output, done)

    async def _inputs(self, lv: Loaded, request: pb.ModelInferRequest) -> tuple[list[np.ndarray], int]:
        specs = list(lv.mv.inputs)
        if len(request.inputs) != len(specs):
            raise InvalidArgument(
                f"model {lv.mv.name} takes {len(specs)} input(s) ({', '.join(s.name for s in specs)}); "
                f"got {len(request.inputs)}"
            )
        raws = list(request.raw_input_contents)
        if raws and len(raws) != len(request.inputs):
            raise InvalidArgument("raw_input_contents must have one entry per input")
        by_name = {t.name: (t, raws[i] if raws else None) for i, t in enumerate(request.inputs)}
        if len(specs) == 1 and request.inputs[0].datatype == "BYTES":
            tensor, raw = request.inputs[0], (raws[0] if raws else None)
            images = await self._images(lv, tensor, raw)
            return [images], images.shape[0]
        out, n = [], -1
        for spec, dtype in zip(specs, lv.input_dtypes, strict=False):
            if spec.name not in by_name:
                raise InvalidArgument(f"missing input {spec.name!r} of model {lv.mv.name}")
            tensor, raw = by_name[spec.name]
            if tensor.datatype != spec.datatype:
                raise InvalidArgument(f"input {spec.name!r} must be {spec.datatype}, got {tensor.datatype}")
            shape = list(tensor.shape)
            want = list(spec.shape)
            if len(shape) != len(want) or any(w > 0 and s != w for s, w in zip(shape[1:], want[1:], strict=False)):
                got = f"{shape[:9]}{' ...' if len(shape) > 9 else ''}"  # a request's rank is unbounded
                raise InvalidArgument(f"input {spec.name!r} must have shape {want} (-1 = any), got {got}")
            if not shape or shape[0] < 1:
                raise InvalidArgument(f"input {spec.name!r} needs a batch dimension of at least 1")
            if n not in (-1, shape[0]):
                raise InvalidArgument("all inputs must have the same batch size")
            n = shape[0]
            if n > self.config.max_batch_size:
                raise InvalidArgument(f"batch of {n} exceeds max_batch_size {self.config.max_batch_size}")
            out.append(oip.array_input(tensor, raw, dtype, shape))
        return out, n

    async def _images(self, lv: Loaded, tensor: Any, raw: bytes | None) -> np.ndarray:
        if lv.preprocess is None:
            raise InvalidArgument(f"model {lv.mv.name} has no image preprocessing; send a tensor, not encoded images")
        items = oip.bytes_input(tensor, raw, self.config.max_images_per_request)
        if not items:
            raise InvalidArgument("no images in the request")
        pre = lv.preprocess
        loop = asyncio.get_running_loop()

        margin = self.config.jpeg_decode_margin
        needs = pre.needs.times(margin) if margin > 0 else None

        def one(data: bytes) -> np.ndarray:
            return preprocess(decode(data, self.config.max_image_pixels, pre.grayscale, needs), pre)

        t0 = time.perf_counter()
        if len(items) == 1:
            arrays = [await loop.run_in_executor(self.decode_pool, one, items[0])]
        else:
            arrays = await asyncio.gather(*(loop.run_in_executor(self.decode_pool, one, d) for d in items))
        batch = np.stack(arrays).astype(lv.input_dtypes[0], copy=False)
        self.metrics.series(lv.mv.name, str(lv.mv.version))[1].observe(time.perf_counter() - t0)
        return batch


def server_metadata() -> pb.ServerMetadataResponse:
    from fovea import __version__

    return pb.ServerMetadataResponse(
        name=SERVER_NAME, version=__version__, extensions=["classification", "model_configuration", "statistics"]
    )


def softmax(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.float32) - x.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


FLOAT_TYPES = ("FP16", "FP32", "FP64")


def row_width(shape: list[int]) -> int | None:
    """Elements per sample of an output declared with this shape; None when a dimension is dynamic."""
    if not shape or any(d < 0 for d in shape[1:]):
        return None
    return math.prod(shape[1:])


def classification_k(want: Any, spec: Any) -> int:
    """The classification k an output request asks for (0: none), checked against the declared output."""
    param = want.parameters.get("classification")
    if param is None:
        return 0
    if param.WhichOneof("parameter_choice") != "int64_param":
        raise InvalidArgument("classification parameter must be a positive integer (int64_param)")
    if spec.datatype not in FLOAT_TYPES:
        raise InvalidArgument(f"classification needs a floating-point output; {spec.name!r} is {spec.datatype}")
    k, width = param.int64_param, row_width(list(spec.shape))
    if k < 1 or (width is not None and k > width):
        most = "the width" if width is None else str(width)
        raise InvalidArgument(
            f"classification parameter must be a positive integer, at most {most} (the width of output {spec.name!r});"
            f" got {k}"
        )
    return k


def requested_outputs(lv: Loaded, request: pb.ModelInferRequest) -> list[tuple[int, int]]:
    """(output index, classification k or 0) for each output to answer, checked before any compute."""
    specs = list(lv.mv.outputs)
    names = [s.name for s in specs]
    if not request.outputs:
        return [(i, 0) for i in range(len(specs))]
    if len(request.outputs) > len(specs):
        raise InvalidArgument(f"model {lv.mv.name} has {len(specs)} output(s); {len(request.outputs)} requested")
    out: list[tuple[int, int]] = []
    for want in request.outputs:
        if want.name not in names:
            raise InvalidArgument(f"model {lv.mv.name} has no output {want.name[:64]!r}; outputs: {', '.join(names)}")
        i = names.index(want.name)
        if any(j == i for j, _ in out):
            raise InvalidArgument(f"output {want.name!r} is requested twice")
        out.append((i, classification_k(want, specs[i])))
    return out


def classification(scores: np.ndarray, k: int, labels: list[str], probabilities: bool) -> list[bytes]:
    """Triton's classification extension: per sample, the top k as 'score:index:label'."""
    flat = scores.reshape(scores.shape[0], -1)
    if not 1 <= k <= flat.shape[1]:
        # The declared output had a dynamic dimension; the computed one is narrower than k.
        raise InvalidArgument(f"classification parameter must be at most {flat.shape[1]} (the output's width); got {k}")
    probs = flat if probabilities else softmax(flat)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    out = []
    for row, idx in zip(probs, top, strict=False):
        for i in idx:
            label = labels[i] if i < len(labels) else ""
            out.append(f"{row[i]:.6f}:{i}:{label}".encode() if label else f"{row[i]:.6f}:{i}".encode())
    return out


def build_response(
    lv: Loaded, request: pb.ModelInferRequest, outputs: list[np.ndarray], wanted: list[tuple[int, int]]
) -> pb.ModelInferResponse:
    """The answer, for the outputs requested_outputs() checked."""
    resp = pb.ModelInferResponse(model_name=lv.mv.name, model_version=str(lv.mv.version), id=request.id)
    for i, k in wanted:
        name, array = lv.mv.outputs[i].name, outputs[i]
        if k:
            items = classification(array, k, list(lv.mv.labels), lv.mv.preprocessing.outputs_probabilities)
            resp.outputs.add(name=name, datatype="BYTES", shape=[array.shape[0], k])
            resp.raw_output_contents.append(oip.encode_bytes(items))
        else:
            resp.outputs.add(name=name, datatype=oip.oip_dtype(array), shape=list(array.shape))
            resp.raw_output_contents.append(np.ascontiguousarray(array).tobytes())
    return resp
