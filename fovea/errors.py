"""One exception hierarchy, each class carrying its gRPC status code."""

from __future__ import annotations

import grpc


class FoveaError(Exception):
    """Base class; the message is shown to the caller, so keep it helpful and free of secrets."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidArgument(FoveaError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidImage(InvalidArgument):
    pass


class Unauthenticated(FoveaError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(FoveaError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ModelNotFound(FoveaError):
    code = grpc.StatusCode.NOT_FOUND


class VersionNotFound(ModelNotFound):
    pass


class NotFound(FoveaError):
    code = grpc.StatusCode.NOT_FOUND


class VersionExists(FoveaError):
    code = grpc.StatusCode.ALREADY_EXISTS


class InvalidState(FoveaError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class QueueFull(FoveaError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class RateLimited(FoveaError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ModelNotReady(FoveaError):
    """A worker refused the call before running any of it (draining, model not loaded or not ready): the
    answer carries `fovea-unserved: 1`, so a gateway can tell it from a call that dropped while it ran."""

    code = grpc.StatusCode.UNAVAILABLE
    unserved = True


class NoHealthyWorker(FoveaError):
    code = grpc.StatusCode.UNAVAILABLE


class Unplaceable(FoveaError):
    """No worker can hold a model (too big, or none in its pool): retrying does not help until that changes."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class RegistryUnavailable(FoveaError):
    code = grpc.StatusCode.UNAVAILABLE


class Draining(FoveaError):
    """The service is stopping: retry on another replica."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExpired(FoveaError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class IntegrityError(FoveaError):
    """An artifact's bytes do not match its recorded SHA-256 (or cannot be decrypted)."""

    code = grpc.StatusCode.DATA_LOSS


class UpstreamError(FoveaError):
    """A status from another Fovea service, passed through unchanged."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
