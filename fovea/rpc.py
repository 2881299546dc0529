"""gRPC plumbing shared by the services: one interceptor for request ids,
authentication and the error table, plus client-side helpers."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc

from fovea import log, tracing
from fovea.errors import FoveaError, InvalidArgument, Unauthenticated

logger = logging.getLogger(__name__)

Metadata = Sequence[tuple[str, str | bytes]]
Authenticator = Callable[[str, dict[str, Any]], Awaitable[Any]]

principal: contextvars.ContextVar[Any] = contextvars.ContextVar("principal", default=None)

REQUEST_ID_HEADER = "x-request-id"
UNSERVED_HEADER = "fovea-unserved"
"""Trailing metadata on an answer refused before any of the call ran (see ModelNotReady)."""
MAX_REQUEST_ID_LEN = 128


def bearer_token(metadata: dict[str, Any]) -> str:
    """The token from 'authorization: Bearer <token>'; raises Unauthenticated when absent or malformed."""
    value = metadata.get("authorization")
    if value is None:
        raise Unauthenticated("missing credentials: send metadata 'authorization: Bearer <api key>'")
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("malformed credentials: expected 'authorization: Bearer <api key>'")
    return token.strip()


def new_request_id(metadata: dict[str, Any]) -> str:
    rid = metadata.get(REQUEST_ID_HEADER)
    if isinstance(rid, bytes):
        rid = rid.decode("latin-1")
    if rid and len(rid) <= MAX_REQUEST_ID_LEN and rid.isprintable():
        return rid
    return os.urandom(16).hex()


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """Sets the request id, authenticates, and maps exceptions to status codes.

    Expected errors (FoveaError) keep their message; anything else becomes
    INTERNAL with only the request id, and is logged with its traceback.
    """

    def __init__(
        self,
        authenticate: Authenticator | None = None,
        on_done: Callable[[str, grpc.StatusCode, float], None] | None = None,
        translate: Callable[[BaseException], FoveaError | None] | None = None,
    ) -> None:
        self._authenticate = authenticate
        self._on_done = on_done
        self._translate = translate
        self._handlers: dict[str, Any] = {}

    async def intercept_service(self, continuation: Any, details: Any) -> Any:
        method: str = details.method
        cached = self._handlers.get(method)
        if cached is not None:
            return cached
        handler = await continuation(details)
        if handler is None:
            return None
        if method.startswith("/grpc.health.v1.") or method.startswith("/grpc.reflection."):
            wrapped = handler
        elif handler.unary_unary:
            wrapped = grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method, False),
                request_deserializer=tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        elif handler.unary_stream:
            wrapped = grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method, False),
                request_deserializer=tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        elif handler.stream_unary:
            wrapped = grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, method, True),
                request_deserializer=tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        else:
            wrapped = grpc.stream_stream_rpc_method_handler(
                self._wrap_stream(handler.stream_stream, method, True),
                request_deserializer=tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        # Handlers are fixed per method, so each is wrapped once; per-call data
        # (metadata) is read from the call's context instead.
        self._handlers[method] = wrapped
        return wrapped

    async def _enter(self, method: str, metadata: dict[str, Any], traced: bool) -> str:
        rid = new_request_id(metadata)
        log.request_id.set(rid)
        if self._authenticate is not None:
            if traced and tracing.recording():
                with tracing.span("authenticate"):
                    principal.set(await self._authenticate(method, metadata))
            else:
                principal.set(await self._authenticate(method, metadata))
        return rid

    def _answer(self, context: Any, exc: BaseException, method: str, rid: str) -> grpc.StatusCode:
        """Answer the call with `exc`'s status from the error table; returns the code.

        The mapped error stays in this frame, never in the handler's: the traceback holds the handler's
        frame, so a local there that points back at the error makes a reference cycle that keeps the
        request (say 20 MiB of refused image) alive until the next garbage collection.
        """
        mapped = self._translated(exc)
        _answer_error(context, mapped, method, rid)
        return _status_of(mapped)[0]

    def _translated(self, exc: BaseException) -> BaseException:
        if self._translate is not None and not isinstance(exc, FoveaError):
            return self._translate(exc) or exc
        return exc

    def _wrap_unary(self, behavior: Any, method: str, streamed: bool) -> Any:
        traced = tracing.tracer is not None  # set up before the servers are built; off, calls skip it all

        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            loop = asyncio.get_running_loop()
            start = loop.time()
            code = grpc.StatusCode.OK
            rid = ""
            server = None
            try:
                metadata = {m[0]: m[1] for m in context.invocation_metadata() or ()}
                if traced:
                    server = tracing.start_server(method, metadata)
                rid = await self._enter(method, metadata, traced)
                response = await behavior(checked_stream(request) if streamed else checked(request), context)
                context.set_trailing_metadata(((REQUEST_ID_HEADER, rid),))
                return response
            except Exception as exc:  # noqa: BLE001 - this is the one place errors are mapped
                code = self._answer(context, exc, method, rid)
                return None
            finally:
                if server is not None:
                    tracing.end_server(server, code, rid, call_attributes())
                if self._on_done is not None:
                    self._on_done(method, code, loop.time() - start)

        return run

    def _wrap_stream(self, behavior: Any, method: str, streamed: bool) -> Any:
        traced = tracing.tracer is not None  # set up before the servers are built; off, calls skip it all

        async def run(request: Any, context: grpc.aio.ServicerContext) -> Any:
            loop = asyncio.get_running_loop()
            start = loop.time()
            code = grpc.StatusCode.OK
            rid = ""
            server = None
            try:
                metadata = {m[0]: m[1] for m in context.invocation_metadata() or ()}
                if traced:
                    server = tracing.start_server(method, metadata)
                rid = await self._enter(method, metadata, traced)
                async for item in behavior(checked_stream(request) if streamed else checked(request), context):
                    yield item
                context.set_trailing_metadata(((REQUEST_ID_HEADER, rid),))
            except Exception as exc:  # noqa: BLE001 - this is the one place errors are mapped
                code = self._answer(context, exc, method, rid)
            finally:
                if server is not None:
                    tracing.end_server(server, code, rid, call_attributes())
                if self._on_done is not None:
                    self._on_done(method, code, loop.time() - start)

        return run


def call_attributes() -> dict[str, str]:
    """The model and version a call resolved (the gateway sets them for its logs), for its server span."""
    model = log.model_name.get()
    return {"fovea.model": model, "fovea.model_version": log.model_version.get()} if model else {}


class _Malformed:
    """What a tolerant deserializer returns for bytes that are not the method's request message."""


MALFORMED = _Malformed()


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """The deserializer, returning MALFORMED where it would raise: grpc.aio answers a deserializer's exception
    itself, before any interceptor code runs, with UNKNOWN and the exception's type in the message."""
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 - any bytes that do not parse are the caller's error
            return MALFORMED

    return parse


def checked(request: Any) -> Any:
    """The request, or INVALID_ARGUMENT (after authentication) when its bytes did not parse."""
    if request is MALFORMED:
        raise InvalidArgument("the request is not a valid protobuf message for this method")
    return request


async def checked_stream(requests: Any) -> Any:
    async for request in requests:
        yield checked(request)


def _status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, grpc.aio.AbortError):
        return grpc.StatusCode.UNKNOWN, ""
    if isinstance(exc, FoveaError):
        return exc.code, str(exc)
    return grpc.StatusCode.INTERNAL, ""


def _answer_error(context: Any, exc: BaseException, method: str, rid: str) -> None:
    """Set the call's status from the error table; the handler then returns.

    Not context.abort(): the AbortError it raises would chain to `exc`, whose traceback holds the
    handler's frames and so the request.
    """
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    if isinstance(exc, asyncio.CancelledError):
        raise exc
    code, message = _status_of(exc)
    trailing: list[tuple[str, str]] = [(REQUEST_ID_HEADER, rid)] if rid else []
    retry_after = getattr(exc, "retry_after_s", None)
    if retry_after is not None:
        trailing.append(("retry-after-ms", str(int(retry_after * 1000) + 1)))
    if getattr(exc, "unserved", False):
        trailing.append((UNSERVED_HEADER, "1"))
    if code == grpc.StatusCode.INTERNAL and not isinstance(exc, FoveaError):
        logger.error("internal error in %s", method, exc_info=exc)
        message = f"internal error, request id {rid}"
    else:
        logger.info("%s -> %s: %s", method, code.name, message)
    context.set_trailing_metadata(tuple(trailing))
    context.set_code(code)
    context.set_details(message)


def call_metadata(token: str, rid: str | None = None) -> tuple[tuple[str, str], ...]:
    """Outgoing metadata: credentials plus the current request id."""
    rid = rid or log.request_id.get()
    md: list[tuple[str, str]] = [("authorization", f"Bearer {token}")]
    if rid:
        md.append((REQUEST_ID_HEADER, rid))
    if tracing.tracer is not None:
        md.extend(tracing.headers())  # the callee's span joins the current trace
    return tuple(md)
