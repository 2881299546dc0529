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

from inference import grpc_predict_v2_pb2 as pb

logger = logging.getLogger(__name__)
DURATIONS = ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")


def merge(reports: Iterable[pb.ModelStatisticsResponse]) -> pb.ModelStatisticsResponse:
    """Sum per (model, version); last_inference is the latest."""
    merged: dict[tuple[str, str], pb.ModelStatistics] = {}
    batches: dict[tuple[str, str, int], pb.InferBatchStatistics] = {}
    for report in reports:
        for st in report.model_stats:
            key = (st.name, st.version)
            out = merged.setdefault(key, pb.ModelStatistics(name=st.name, version=st.version))
            out.last_inference = max(out.last_inference, st.last_inference)
            out.inference_count += st.inference_count
            out.execution_count += st.execution_count
            for field in DURATIONS:
                total, part = getattr(out.inference_stats, field), getattr(st.inference_stats, field)
                total.count += part.count
                total.ns += part.ns
            for b in st.batch_stats:
                bkey = (*key, b.batch_size)
                if bkey not in batches:
                    batches[bkey] = out.batch_stats.add(batch_size=b.batch_size)
                for field in ("compute_input", "compute_infer", "compute_output"):
                    total, part = getattr(batches[bkey], field), getattr(b, field)
                    total.count += part.count
                    total.ns += part.ns
    return pb.ModelStatisticsResponse(model_stats=[merged[k] for k in sorted(merged)])


async def gather(endpoints: Iterable[Any], request: pb.ModelStatisticsRequest, metadata: Any,
                 timeout_s: float) -> list[pb.ModelStatisticsResponse]:
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
