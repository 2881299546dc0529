"""Per-version inference statistics in Triton's ModelStatistics shape, for the tools that read them
(perf_analyzer prints the server-side split of a request: queue, input, infer, output)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, seconds: float, count: int = 1) -> None:
        self.count += count
        self.ns += int(seconds * 1e9)


@dataclass
class ModelStats:
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    """Decoding and preprocessing images, or reading tensors, per request."""
    compute_infer: Duration = field(default_factory=Duration)
    """ONNX Runtime, per batch."""
    compute_output: Duration = field(default_factory=Duration)
    """Building the answer, per request."""
    inference_count: int = 0
    """Samples computed."""
    execution_count: int = 0
    """Batches run."""
    last_inference_ms: int = 0
    batches: dict[int, Duration] = field(default_factory=dict)
    """ONNX Runtime time by batch size."""

    def on_batch(self, samples: int, waits_s: list[float], compute_s: float) -> None:
        self.inference_count += samples
        self.execution_count += 1
        self.last_inference_ms = int(time.time() * 1000)
        self.compute_infer.add(compute_s)
        self.batches.setdefault(samples, Duration()).add(compute_s)
        for wait in waits_s:
            self.queue.add(wait)

    def to_proto(self, name: str, version: int) -> Any:
        from inference import grpc_predict_v2_pb2 as pb

        def d(x: Duration, count: int | None = None) -> Any:
            return pb.StatisticDuration(count=x.count if count is None else count, ns=x.ns)

        # Triton counts compute input/infer/output once per batch (perf_analyzer insists on equal
        # counts); Fovea prepares inputs and answers per request, so their times are summed over
        # requests and counted per batch.
        batches = self.compute_infer.count
        out = pb.ModelStatistics(
            name=name,
            version=str(version),
            last_inference=self.last_inference_ms,
            inference_count=self.inference_count,
            execution_count=self.execution_count,
            inference_stats=pb.InferStatistics(
                success=d(self.success),
                fail=d(self.fail),
                queue=d(self.queue),
                compute_input=d(self.compute_input, batches),
                compute_infer=d(self.compute_infer),
                compute_output=d(self.compute_output, batches),
            ),
        )
        for size in sorted(self.batches):
            out.batch_stats.add(batch_size=size, compute_infer=d(self.batches[size]))
        return out
