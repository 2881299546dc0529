"""Encoded images into a model's input tensor: the worker's one image path.

The native front queues every ModelInfer whose one input is BYTES (encoded images) for a version it holds;
the decode threads here take each call (fv_next_images), decode and preprocess its images (fovea/images.py)
and hand the tensor back (fv_images_done), which then takes the path of any other call: the one validator,
queue and batcher. The worker's Python server calls image_tensor for the few image calls it sees (calls to
trace), so both read images with the same code."""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from fovea import oip
from fovea.errors import FoveaError, InvalidArgument, ModelNotReady
from fovea.images import decode, decoded_pixels, preprocess
from inference import grpc_predict_v2_pb2 as pb
from worker.config import WorkerConfig
from worker.fast_port import NativeFront
from worker.metrics import WorkerMetrics
from worker.models import Loaded, ModelManager

logger = logging.getLogger(__name__)


def image_tensor(
    lv: Loaded, tensor: Any, raw: bytes | None, config: WorkerConfig, pool: ThreadPoolExecutor, metrics: WorkerMetrics
) -> np.ndarray:
    """A BYTES input's images, decoded and preprocessed for lv, as one array in its input's dtype (dimension 0 =
    images). Limits: images per call, and the pixels they decode to, from their headers before any is decoded.
    A call's second and later images are decoded on pool, beside the first; never call this from pool."""
    if lv.preprocess is None:
        raise InvalidArgument(f"model {lv.mv.name} has no image preprocessing; send a tensor, not encoded images")
    items = oip.bytes_input(tensor, raw, config.max_images_per_request)
    if not items:
        raise InvalidArgument("no images in the request")
    pre = lv.preprocess
    margin = config.jpeg_decode_margin
    needs = pre.needs.times(margin) if margin > 0 else None
    pixels = sum(decoded_pixels(data, needs) for data in items)  # headers only: microseconds per image
    if pixels > config.max_request_pixels:
        raise InvalidArgument(
            f"the {len(items)} images of this request decode to {pixels} pixels; the limit is "
            f"{config.max_request_pixels} per request (FOVEA_WORKER_MAX_REQUEST_PIXELS): send fewer or "
            "smaller images per call"
        )

    def one(data: bytes) -> np.ndarray:
        return preprocess(decode(data, config.max_image_pixels, pre.grayscale, needs), pre)

    t0 = time.perf_counter()
    rest = [pool.submit(one, d) for d in items[1:]]
    try:
        arrays = [one(items[0])]
    finally:
        arrays_rest = [f.result() for f in rest]  # waited for even when the first failed: none left running
    batch = np.stack(arrays + arrays_rest).astype(lv.input_dtypes[0], copy=False)
    metrics.series(lv.mv.name, str(lv.mv.version))[1].observe(time.perf_counter() - t0)
    return batch


class DecodeThreads:
    """Threads that take image calls off the native front and hand back their tensors."""

    def __init__(
        self,
        native: NativeFront,
        manager: ModelManager,
        config: WorkerConfig,
        pool: ThreadPoolExecutor,
        metrics: WorkerMetrics,
    ) -> None:
        self.native, self.manager, self.config, self.pool, self.metrics = native, manager, config, pool, metrics
        self.threads = [
            threading.Thread(target=self._loop, name=f"images-{i}", daemon=True)
            for i in range(max(1, config.decode_threads))
        ]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self, timeout_s: float) -> bool:
        """After the front's shutdown (the threads end once its image queue is closed); True when all ended."""
        deadline = time.monotonic() + timeout_s
        for t in self.threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self.threads)

    def _loop(self) -> None:
        for job in self.native.image_jobs():
            try:
                lv = self.manager.by_slot(job.slot)
                if lv is None:
                    raise ModelNotReady("this model version is unloading; retry")
                tensor = pb.ModelInferRequest.InferInputTensor.FromString(job.tensor)
                array = image_tensor(lv, tensor, job.raw, self.config, self.pool, self.metrics)
            except FoveaError as exc:
                self.native.images_fail(job.id, exc.code.value[0], str(exc))
                continue
            except Exception:  # noqa: BLE001 - one call's failure is its own answer, never the thread's end
                logger.exception("decoding the images of a call failed")
                self.native.images_fail(job.id, 13, "internal error while decoding the images")
                continue
            self.native.images_done(job.id, array)
