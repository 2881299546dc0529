"""What Python adds to a version's statistics in Triton's ModelStatistics shape: the calls it refused before
handing them to the native queue (an image that does not decode, contents that do not read). The native queue
counts every call it takes (worker/native/front.cc); ModelStatistics merges the two."""

from __future__ import annotations

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
    fail: Duration = field(default_factory=Duration)
    """Calls refused in Python, before the native queue."""

    def to_proto(self, name: str, version: int) -> Any:
        from inference import grpc_predict_v2_pb2 as pb

        return pb.ModelStatistics(
            name=name,
            version=str(version),
            inference_stats=pb.InferStatistics(fail=pb.StatisticDuration(count=self.fail.count, ns=self.fail.ns)),
        )
