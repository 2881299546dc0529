"""Triton's ModelStatistics at the gateway: the sum of what every worker reports.

Statistics live on the workers (worker/stats.py). The gateway asks each worker that serves a
model and adds their figures up per model version, so tools pointed at the public door
(perf_analyzer) see the whole cluster's server-side split.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

import grpc

from fovea.oip import merge_statistics as merge  # noqa: F401 - the gateway's sum of worker reports
from inference import grpc_predict_v2_pb2 as pb

logger = logging.getLogger(__name__)


async def gather(
    endpoints: Iterable[Any], request: pb.ModelStatisticsRequest, metadata: Any, timeout_s: float
) -> list[pb.ModelStatisticsResponse]:
    """Each worker's report; a worker that cannot answer (gone, NOT_FOUND) is left out."""

    async def one(ep: Any) -> pb.ModelStatisticsResponse | None:
        try:
            return await ep.stub.ModelStatistics(request, metadata=metadata, timeout=timeout_s)  # type: ignore[no-any-return]
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                logger.info("worker %s gave no statistics: %s", ep.status.worker_id, exc.code().name)
            return None

    reports = await asyncio.gather(*(one(ep) for ep in endpoints))
    return [r for r in reports if r is not None]
