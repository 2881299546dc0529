"""The gateway's HTTP port: an aiohttp application on the gateway's own event loop.

Every request passes through HttpPort.call(), the one place that sets the request id, caps the requests in
flight, authenticates (from the headers, before any of the body is read), checks Content-Length, maps errors
to HTTP and records the metrics; a server span for tracing belongs there too. The handlers behind it call the
gRPC servicers' own methods, so access rules, quotas, routing and checks are the gRPC port's, not copies.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11

from fovea import log, tracing
from fovea.errors import FoveaError, InvalidArgument, RateLimited
from fovea.rpc import Authenticator, call_attributes, new_request_id, principal
from gateway.auth import check_model_access
from gateway.config import GatewayConfig
from gateway.http import images, oip_rest
from gateway.http.errors import BodyTooLarge, NoRoute, Overloaded, error_response
from gateway.metrics import Metrics
from gateway.servicer import ImageServicer, InferenceServicer
from inference import grpc_predict_v2_pb2 as pb

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class SlowClient(FoveaError):
    """The client took longer than http_client_timeout_s to send its body."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    http_status = 408


@dataclass
class Deadline:
    """Stands in for a gRPC call's context where a servicer asks for the time left (Gateway.timeout_s, which
    applies the default deadline to None and cuts anything above the maximum)."""

    seconds: float | None

    def time_remaining(self) -> float | None:
        return self.seconds


@dataclass
class HttpPort:
    runner: web.AppRunner
    port: int

    async def stop(self, grace_s: float) -> None:
        await self.runner.cleanup()  # stops listening, then waits up to the config's grace_s for calls in flight


class Calls:
    """The routes and the wrapper every request passes through."""

    def __init__(
        self,
        config: GatewayConfig,
        inference: InferenceServicer,
        image: ImageServicer,
        authenticate: Authenticator,
        metrics: Metrics,
        draining: asyncio.Event,
    ) -> None:
        self.config = config
        self.inference = inference
        self.image = image
        self.authenticate = authenticate
        self.metrics = metrics
        self.draining = draining
        self.in_flight = 0
        self.per_key: dict[str, int] = {}  # key id -> its requests in flight

    def routes(self, app: web.Application) -> None:
        add = app.router.add_route
        add("GET", "/v2/models/stats", self.wrap("ModelStatistics", self.statistics))  # before {model} matches it
        for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
            add("GET", base, self.wrap("ModelMetadata", self.model_metadata))
            add("GET", f"{base}/ready", self.wrap("ModelReady", self.model_ready))
            add("GET", f"{base}/config", self.wrap("ModelConfig", self.model_config))
            add("GET", f"{base}/stats", self.wrap("ModelStatistics", self.statistics))
            add("POST", f"{base}/infer", self.wrap("ModelInfer", self.infer), expect_handler=no_expect)
        add("GET", "/v2/health/live", self.wrap("ServerLive", self.live, key=False))
        add("GET", "/v2/health/ready", self.wrap("ServerReady", self.ready, key=False))
        add("GET", "/v2", self.wrap("ServerMetadata", self.server_metadata))
        classify = self.wrap("Classify", self.classify)
        add("POST", "/v1/models/{model}:classify", classify, expect_handler=no_expect)
        add("POST", "/v1/models/{model}/versions/{version}:classify", classify, expect_handler=no_expect)

    def wrap(self, name: str, handler: Handler, key: bool = True) -> Handler:
        async def run(request: web.Request) -> web.StreamResponse:
            return await self.call(request, name, handler, key)

        return run

    async def call(self, request: web.Request, name: str, handler: Handler, key: bool) -> web.StreamResponse:
        """One HTTP call from start to end, in a server span when tracing is on (fovea/tracing.py)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        rid = new_request_id({"x-request-id": request.headers.get("x-request-id", "")})
        log.request_id.set(rid)
        code = grpc.StatusCode.OK
        if key and self.in_flight >= self.config.http_max_concurrent:  # health stays answered: probes restart pods
            code, response = error_response(
                Overloaded(f"{self.in_flight} HTTP requests in flight, the limit; retry shortly"), request.path, rid
            )
            response.headers["Retry-After"] = "1"
            return await self.refuse(request, response, name, code, start)
        self.in_flight += 1
        span, status, key_id = None, 0, None
        try:
            if tracing.tracer is not None:
                route = request.match_info.route.resource
                span = tracing.start_http(
                    request.method, route.canonical if route else name, request.path, request.headers
                )
            if key:  # authenticate is the gRPC port's admission: draining, then the key
                credentials = {"authorization": request.headers.get(hdrs.AUTHORIZATION)}
                with tracing.span("authenticate"):
                    principal.set(await self.authenticate(name, credentials))
                key_id = self.take_key_slot(principal.get().key_id)
            answer = await handler(request)
            answer.headers["x-request-id"] = rid
            status = answer.status
            await self.send(request, answer)
            return answer
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED  # the client hung up
            raise
        except Exception as exc:  # noqa: BLE001 - the one place HTTP errors are mapped
            code, response = error_response(exc, request.path, rid)
            status = response.status
            return await self.refuse(request, response, name, code, start)
        finally:
            self.in_flight -= 1
            if key_id is not None:
                self.give_key_slot(key_id)
            if span is not None:
                tracing.end_server(span, code, rid, call_attributes(), status or 499)  # 499: the client hung up
            if code in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
                self.metrics.on_done(f"http.{name}", code, loop.time() - start)

    def take_key_slot(self, key_id: str) -> str:
        """Count a request of this key in flight, or refuse it past http_max_calls_per_key."""
        limit = self.config.http_max_calls_per_key
        held = self.per_key.get(key_id, 0)
        if limit and held >= limit:
            raise RateLimited(
                f"API key {key_id} has {held} HTTP requests in flight, its limit (FOVEA_GATEWAY_HTTP_MAX_CALLS_PER_KEY)"
                "; finish some or retry shortly",
                1.0,
            )
        self.per_key[key_id] = held + 1
        return key_id

    def give_key_slot(self, key_id: str) -> None:
        held = self.per_key.pop(key_id) - 1
        if held > 0:
            self.per_key[key_id] = held

    async def refuse(
        self, request: web.Request, response: web.Response, name: str, code: grpc.StatusCode, start: float
    ) -> web.Response:
        if request.body_exists and request.can_read_body:
            response.force_close()  # the body was never read: no further request on this connection
        self.metrics.on_done(f"http.{name}", code, asyncio.get_running_loop().time() - start)
        return response

    async def send(self, request: web.Request, response: web.StreamResponse) -> None:
        """Send the answer within the client timeout: a client that does not take it loses the connection."""
        try:
            async with asyncio.timeout(self.config.http_client_timeout_s):
                await response.prepare(request)
                await response.write_eof()
        except TimeoutError:
            if request.transport is not None:
                request.transport.abort()
            logger.info(
                "%s: the client took over %.0f s to take its answer", request.path, self.config.http_client_timeout_s
            )

    async def body(self, request: web.Request, limit: int) -> bytes:
        """The body, after the checks on the headers: Content-Length against the limit, then 100 Continue; a
        body without a length (chunked) is refused as soon as it passes the limit."""
        if request.content_length is not None and request.content_length > limit:
            raise BodyTooLarge(f"the body is {request.content_length} bytes; the limit is {limit}")
        await continue_if_expected(request)
        data = bytearray()
        try:
            async with asyncio.timeout(self.config.http_client_timeout_s):
                while chunk := await request.content.readany():
                    if len(data) + len(chunk) > limit:
                        raise BodyTooLarge(f"the body is over {limit} bytes, the limit")
                    data.extend(chunk)
        except TimeoutError:
            raise SlowClient(f"the body took over {self.config.http_client_timeout_s:.0f} s to arrive") from None
        return bytes(data)

    # --- health and metadata (the servicers' methods, as the gRPC port calls them)

    async def live(self, request: web.Request) -> web.Response:
        return web.json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = not self.draining.is_set() and (await self.inference.ServerReady(pb.ServerReadyRequest(), None)).ready
        return web.json_response({"ready": ready}, status=200 if ready else 400)  # v2 REST: 4xx means false

    async def server_metadata(self, request: web.Request) -> web.Response:
        meta = await self.inference.ServerMetadata(pb.ServerMetadataRequest(), None)
        return web.json_response({"name": meta.name, "version": meta.version, "extensions": list(meta.extensions)})

    async def model_metadata(self, request: web.Request) -> web.Response:
        model, version = names(request)
        meta = await self.inference.ModelMetadata(pb.ModelMetadataRequest(name=model, version=version), None)
        return web.json_response(oip_rest.metadata_json(meta))

    async def model_ready(self, request: web.Request) -> web.Response:
        model, version = names(request)
        ready = (await self.inference.ModelReady(pb.ModelReadyRequest(name=model, version=version), None)).ready
        return web.json_response({"name": model, "ready": ready}, status=200 if ready else 400)

    async def model_config(self, request: web.Request) -> web.Response:
        model, version = names(request)
        resp = await self.inference.ModelConfig(pb.ModelConfigRequest(name=model, version=version), None)
        return web.json_response(oip_rest.message_json(resp.config))  # Triton's HTTP model configuration

    async def statistics(self, request: web.Request) -> web.Response:
        model, version = request.match_info.get("model", ""), request.match_info.get("version", "")
        stats = await self.inference.ModelStatistics(pb.ModelStatisticsRequest(name=model, version=version), None)
        return web.json_response(oip_rest.message_json(stats))

    # --- inference

    async def infer(self, request: web.Request) -> web.Response:
        model, version = names(request)
        check_model_access(principal.get(), model)  # before the body: a key that may not use it never sends it
        header_length = header_length_of(request, self.config.http_max_json_bytes)
        limit = self.config.http_max_body_bytes if header_length is not None else self.config.http_max_json_bytes
        body = await self.body(request, limit)
        infer, wanted = oip_rest.parse_request(body, header_length, model, version)
        del body
        # The gRPC port's ModelInfer: forwarded as bytes, raw numeric tensors to a worker's fast port
        answer = await self.inference.ModelInferBytes(infer.SerializeToString(), Deadline(wanted.timeout_s))
        resp = pb.ModelInferResponse.FromString(answer)
        data, json_length = oip_rest.render_response(resp, wanted)
        if json_length is None:
            return web.Response(body=data, content_type="application/json")
        return web.Response(
            body=data,
            content_type="application/octet-stream",
            headers={oip_rest.HEADER_LENGTH: str(json_length)},
        )

    async def classify(self, request: web.Request) -> web.Response:
        model, version = names(request)
        check_model_access(principal.get(), model)
        if request.content_length is not None and request.content_length > self.config.http_max_body_bytes:
            raise BodyTooLarge(
                f"the body is {request.content_length} bytes; the limit is {self.config.http_max_body_bytes}"
            )
        await continue_if_expected(request)
        try:
            async with asyncio.timeout(self.config.http_client_timeout_s):
                req = await images.read_request(
                    request,
                    model,
                    self.config.max_images_per_call,
                    self.config.max_image_bytes,
                    self.config.http_max_body_bytes,
                )
        except TimeoutError:
            raise SlowClient(f"the images took over {self.config.http_client_timeout_s:.0f} s to arrive") from None
        if version:
            req.version = int(version) if version.isdigit() and len(version) <= 18 else -1
            if req.version <= 0:
                raise InvalidArgument(f"version must be a positive number, got {version[:40]!r}")
        resp = await self.image.Classify(req, None)
        return web.json_response(images.answer(resp))


def names(request: web.Request) -> tuple[str, str]:
    """The model and version named in the path (the version as its text; the servicers check both)."""
    return request.match_info["model"], request.match_info.get("version", "")


def header_length_of(request: web.Request, max_json: int) -> int | None:
    text = request.headers.get(oip_rest.HEADER_LENGTH)
    if text is None:
        return None
    if not text.isascii() or not text.isdigit() or len(text) > 12:
        raise InvalidArgument(f"{oip_rest.HEADER_LENGTH} must be a byte count, got {text[:40]!r}")
    if int(text) > max_json:
        raise BodyTooLarge(f"the JSON header is {text} bytes; the limit is {max_json}")
    return int(text)


async def no_expect(request: web.Request) -> None:
    """Expect: 100-continue is answered after the credentials and the size are checked (continue_if_expected),
    so that a refused caller gets its refusal instead of a go-ahead to send its body."""
    expect = request.headers.get(hdrs.EXPECT, "")
    if expect and expect.lower() != "100-continue":
        raise web.HTTPExpectationFailed(text=json.dumps({"error": f"unknown Expect: {expect[:40]}"}))


async def continue_if_expected(request: web.Request) -> None:
    if request.version == HttpVersion11 and request.headers.get(hdrs.EXPECT, "").lower() == "100-continue":
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0


@web.middleware
async def json_not_found(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own answers for unknown paths and methods, in the error table's JSON."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = f"no route for {request.method} {request.path[:100]}" if exc.status in (404, 405) else exc.reason
        _, response = error_response(NoRoute(message), request.path[:100], "")
        response.set_status(exc.status)
        if request.body_exists:
            response.force_close()
        return response


def ssl_context(config: GatewayConfig) -> ssl.SSLContext | None:
    """TLS with the gRPC port's certificate (and client CA: mutual TLS), when it has one."""
    if not config.tls_cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    if config.tls_client_ca_file:
        context.load_verify_locations(config.tls_client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def start_http(
    config: GatewayConfig,
    inference: InferenceServicer,
    image: ImageServicer,
    authenticate: Authenticator,
    metrics: Metrics,
    draining: asyncio.Event,
) -> HttpPort:
    app = web.Application(client_max_size=config.http_max_body_bytes, middlewares=[json_not_found])
    Calls(config, inference, image, authenticate, metrics, draining).routes(app)
    runner = web.AppRunner(
        app,
        access_log=None,  # the gateway's access log has each call (gateway/metrics.py)
        keepalive_timeout=config.http_idle_timeout_s,
        lingering_time=config.http_lingering_s,
        handler_cancellation=True,  # a client that hangs up cancels its call
        shutdown_timeout=config.grace_s,
    )
    await runner.setup()
    context = ssl_context(config)
    site = web.TCPSite(runner, config.host, config.http_port, ssl_context=context)
    await site.start()
    port = int(runner.addresses[0][1])
    logger.info("http on %s://%s:%d", "https" if context else "http", config.host, port)
    return HttpPort(runner, port)
