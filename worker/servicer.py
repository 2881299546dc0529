"""The worker's Open Inference Protocol servicer: the calls its native front relays to Python. Inference calls
(typed contents, and calls to trace) are read into raw tensors and handed back to the native front's queue
(one queue, batcher and validator); images are decoded by worker/decoding.py, as on the front's decode threads."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from fovea import oip, tracing
from fovea.errors import ModelNotReady
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc
from worker.config import WorkerConfig
from worker.decoding import image_tensor
from worker.fast_port import Timing
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
        # Threads that wait for the native queue's answers (the GIL released): one per call in flight, so that
        # submitted calls can fill a batch; past this many, calls wait for a thread here.
        self.submit_pool = ThreadPoolExecutor(max(64, config.max_batch_size * 4), thread_name_prefix="submit")
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
        """A call the native front relayed here (typed contents, a version it did not hold, a call to
        trace; encoded images only in the last two): read into raw tensors here, then queued, checked
        (check.cc, the one validator), batched, run and answered by the native front's queue, with the calls
        it takes itself."""
        if not self.accepting:
            raise ModelNotReady("worker is draining; retry on another worker")
        t0 = time.perf_counter()
        lv = self.manager.get(request.model_name, request.model_version, count=False)
        timing = Timing() if tracing.recording() else None
        t_input = t_output = 0.0
        n = 0
        self.in_flight += 1
        try:
            try:
                raw, n = await self._raw_request(lv, request)
            except BaseException:
                lv.stats.fail.add(time.perf_counter() - t0)  # never reached the native queue, which counts the rest
                lv.requests += 1
                raise
            t_input = time.perf_counter()
            remaining = context.time_remaining()
            timeout_s = remaining if remaining is not None else self.config.default_deadline_ms / 1000
            body = await asyncio.get_running_loop().run_in_executor(
                self.submit_pool, self.manager.submit, lv, raw.SerializeToString(), int(timeout_s * 1000), timing
            )
            t_output = time.perf_counter()
            response = pb.ModelInferResponse.FromString(body)
            self.metrics.series(lv.mv.name, str(lv.mv.version))[3].observe(time.perf_counter() - t0)
            return response
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

    async def _raw_request(self, lv: Loaded, request: pb.ModelInferRequest) -> tuple[pb.ModelInferRequest, int]:
        """The call for the version get() chose, its encoded images decoded and preprocessed. Typed contents never
        come here: the native front reads them into raw tensors first (check.cc read_contents)."""
        raw = pb.ModelInferRequest()
        raw.CopyFrom(request)
        raw.model_version = str(lv.mv.version)
        specs = list(lv.mv.inputs)
        if len(specs) == 1 and len(request.inputs) == 1 and request.inputs[0].datatype == "BYTES":
            first = request.raw_input_contents[0] if request.raw_input_contents else None
            images = await self._images(lv, request.inputs[0], first)
            del raw.inputs[:]
            del raw.raw_input_contents[:]
            raw.inputs.add(name=specs[0].name, datatype=specs[0].datatype, shape=list(images.shape))
            raw.raw_input_contents.append(images.tobytes())
            return raw, images.shape[0]
        return raw, request.inputs[0].shape[0] if request.inputs and request.inputs[0].shape else 0

    async def _images(self, lv: Loaded, tensor: Any, raw: bytes | None) -> np.ndarray:
        """A traced call's images (the native front's decode threads take all others): the same code, on a
        thread of submit_pool, which may wait for the decode pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self.submit_pool, image_tensor, lv, tensor, raw, self.config, self.decode_pool, self.metrics
        )


def server_metadata() -> pb.ServerMetadataResponse:
    from fovea import __version__

    return pb.ServerMetadataResponse(
        name=SERVER_NAME, version=__version__, extensions=["classification", "model_configuration", "statistics"]
    )
