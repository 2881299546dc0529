"""Container health check for Docker and compose: asks grpc.health.v1 and exits 0 only when SERVING.

Kubernetes uses its native gRPC probes instead; this is for `docker run` and compose's depends_on.
Usage: python /app/healthcheck.py PORT [SERVICE]
"""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2 or not argv[0].isdigit():
        print("usage: healthcheck.py PORT [SERVICE]", file=sys.stderr)
        return 2
    service = argv[1] if len(argv) > 1 else ""
    with grpc.insecure_channel(f"127.0.0.1:{argv[0]}") as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=3)
        except grpc.RpcError as exc:
            print(f"unhealthy: {exc.code().name}", file=sys.stderr)  # type: ignore[attr-defined]
            return 1
    serving = resp.status == health_pb2.HealthCheckResponse.SERVING
    if not serving:
        print(f"unhealthy: {health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}", file=sys.stderr)
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
