"""The gateway's error table in HTTP: gRPC status codes mapped as KServe's v2 REST binding maps them,
answered as {"error": "..."}."""

from __future__ import annotations

import json
import logging

import grpc
from aiohttp import web

from fovea.errors import FoveaError

logger = logging.getLogger(__name__)

HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}


class BodyTooLarge(FoveaError):
    """A body over the HTTP limit (gRPC refuses an oversize message with RESOURCE_EXHAUSTED); HTTP says 413."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    http_status = 413


class Overloaded(FoveaError):
    """More HTTP requests in flight than http_max_concurrent."""

    code = grpc.StatusCode.UNAVAILABLE


class NoRoute(FoveaError):
    """A path or method the HTTP port does not serve."""

    code = grpc.StatusCode.NOT_FOUND


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, int]:
    """(gRPC code for the metrics, HTTP status) of an error."""
    if isinstance(exc, FoveaError):
        return exc.code, getattr(exc, "http_status", None) or HTTP_STATUS.get(exc.code, 500)
    return grpc.StatusCode.INTERNAL, 500


def error_response(exc: BaseException, path: str, rid: str) -> tuple[grpc.StatusCode, web.Response]:
    """The answer for an error: its message for expected errors (FoveaError), only the request id otherwise."""
    code, status = status_of(exc)
    if isinstance(exc, FoveaError):
        message = str(exc)
        logger.info("%s -> %d %s: %s", path, status, code.name, message)
    else:
        logger.error("internal error in %s", path, exc_info=exc)
        message = f"internal error, request id {rid}"
    headers = {"x-request-id": rid} if rid else {}
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, int(retry_after + 0.999)))  # whole seconds, rounded up
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    body = json.dumps({"error": message})
    return code, web.Response(status=status, text=body, content_type="application/json", headers=headers)
