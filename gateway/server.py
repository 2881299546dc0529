"""Builds the gateway; main() and the tests share build_server()."""

from __future__ import annotations

import asyncio
import logging
import os
import pathlib
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import grpc

from fovea import tracing
from fovea.config import server_options
from fovea.errors import Draining, InvalidArgument
from fovea.registry_link import RegistryLink
from fovea.rpc import ServiceInterceptor
from fovea.serve import add_health, set_serving
from fovea.v1 import image_pb2, image_pb2_grpc, registry_pb2
from gateway.auth import KeyCache
from gateway.config import GatewayConfig
from gateway.fast_port import NativeGateway, route_table
from gateway.fast_port import available as native_available
from gateway.fast_port import binding as load_native
from gateway.fast_port import binding_file as native_binding
from gateway.http.app import HttpPort, start_http
from gateway.metrics import AccessLog, Metrics
from gateway.ratelimit import Limits, RateLimiter
from gateway.routing import Endpoint, Versions, Workers
from gateway.service import Gateway
from gateway.servicer import ImageServicer, InferenceServicer
from inference import grpc_predict_v2_pb2 as pb
from inference import grpc_predict_v2_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)
SERVICES = [
    image_pb2.DESCRIPTOR.services_by_name["ImageService"].full_name,
    pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
]


@dataclass
class GatewayServer:
    server: grpc.aio.Server
    """The Python gRPC server: no TCP port, only a unix socket in `socket_dir`, which the front relays to."""
    port: int
    """The one public gRPC port: the native front's (gateway/native)."""
    gateway: Gateway
    keys: KeyCache
    link: RegistryLink
    health: Any
    stop_event: asyncio.Event
    metrics: Metrics
    metrics_port: int = -1
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    native: NativeGateway | None = None
    """The native front on the public port (gateway/fast_port.py); None only after stop()."""
    socket_dir: str = ""
    """The private (0700) directory of the Python server's unix socket."""
    draining: asyncio.Event = field(default_factory=asyncio.Event)
    """Set by stop(): new calls that reach the Python server get UNAVAILABLE."""
    http: HttpPort | None = None
    """The HTTP/REST port (gateway/http); None when off."""

    @property
    def http_port(self) -> int:
        return self.http.port if self.http is not None else -1

    async def stop(self, grace_s: float) -> None:
        await set_serving(self.health, SERVICES, False)
        self.stop_event.set()
        # New calls get UNAVAILABLE (which clients retry elsewhere) for a moment before the ports
        # close: gRPC cancels calls that arrive while a server shuts down.
        self.draining.set()
        if self.native is not None:
            self.native.set_accepting(False)
        if grace_s > 0:
            await asyncio.sleep(min(0.5, grace_s))
        # First, together: calls the front passed to Python need the Python server to answer them, and the
        # calls Python routes (HTTP's too) need the front's routing until they end.
        ending = []
        if self.native is not None:
            ending.append(asyncio.to_thread(self.native.shutdown, grace_s))
        if self.http is not None:
            ending.append(self.http.stop(grace_s))
        await asyncio.gather(*ending)
        await self.server.stop(grace_s)
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)  # the last native records are drained here
        if self.native is not None:
            self.native.close()
        if self.socket_dir:
            shutil.rmtree(self.socket_dir, ignore_errors=True)
        await self.gateway.workers.close()
        await self.gateway.limiter.close()
        await self.link.close()
        self.metrics.close()


def _tls_files(config: GatewayConfig) -> tuple[bytes, bytes, bytes]:
    """(certificate chain, private key, client CA) in PEM, for the public port; empty when plaintext."""
    if not config.tls_cert_file:
        return b"", b"", b""
    ca = pathlib.Path(config.tls_client_ca_file).read_bytes() if config.tls_client_ca_file else b""
    return pathlib.Path(config.tls_cert_file).read_bytes(), pathlib.Path(config.tls_key_file).read_bytes(), ca


def _worker_tls(config: GatewayConfig) -> tuple[bytes, bytes, bytes]:
    """(the workers' CA, this gateway's certificate chain and key) in PEM, for the front's calls to the workers:
    as config.channel_credentials() dials them; empty when plaintext."""
    if not config.tls_ca_file:
        return b"", b"", b""

    def read(path: str) -> bytes:
        return pathlib.Path(path).read_bytes() if path else b""

    return read(config.tls_ca_file), read(config.tls_cert_file), read(config.tls_key_file)


def require_native() -> None:
    """The front is the gateway's only public port: without it there is nothing to serve, so the gateway
    refuses to start rather than serve some other way."""
    how = (
        "run gateway/native/build.sh (scripts/setup.sh runs it; it needs the gRPC C++ and OpenSSL development "
        "packages that set-up installs)"
    )
    if not native_available():
        raise RuntimeError(
            f"the gateway's native front {native_binding()} is not built, and it serves the gateway's only public "
            f"port: {how}"
        )
    try:
        load_native()
    except (ImportError, OSError) as exc:  # built, but not loadable here (another Python, missing libraries)
        raise RuntimeError(f"the gateway's native front {native_binding()} cannot be loaded ({exc}): {how}") from exc


def private_socket() -> tuple[str, str]:
    """A unix socket path in a fresh directory only this user may enter (0700), and the directory. The Python
    server listens there and nowhere else, so that no other user on the host can skip the front's mutual TLS;
    the same user could read the key files anyway."""
    directory = tempfile.mkdtemp(prefix="fovea-gateway-")
    os.chmod(directory, 0o700)  # mkdtemp makes it so; said here because the design depends on it
    return directory, os.path.join(directory, "python.sock")


async def build_server(config: GatewayConfig) -> GatewayServer:
    require_native()  # before anything is started: without the front there is no public port
    dial = config.channel_credentials()  # TLS to the registry and the workers, when tls_ca_file is set
    link = RegistryLink(config.registry_address, config.registry_token, config.max_message_bytes, credentials=dial)
    versions = Versions(link, config.latest_cache_s)
    access_log = AccessLog(config.log_json) if config.access_log else None
    metrics = Metrics(access_log)
    workers = Workers(
        config.max_message_bytes,
        config.eject_s,
        on_eject=metrics.ejections.inc,
        credentials=dial,
        reconnect_s=config.reconnect_s,
    )
    limiter = RateLimiter(config.redis_url, config.rate_limit_timeout_s)
    gateway = Gateway(config, versions, workers, limiter, metrics)
    keys = KeyCache(link, config.key_cache_ttl_s, config.refused_key_cache_s, role_of(config.min_role))
    certs = {"server": config.tls_cert_file, "client_ca": config.tls_client_ca_file, "ca": config.tls_ca_file}
    metrics.watch_cluster(workers, keys, certs)  # ready workers per model, key and certificate expiry
    draining = asyncio.Event()
    authenticate = keys.authenticator()

    async def admit(method: str, metadata: dict[str, Any]) -> Any:
        if draining.is_set():  # an explicit UNAVAILABLE: a call arriving while gRPC shuts down is CANCELLED
            raise Draining("gateway is stopping; retry on another replica")
        return await authenticate(method, metadata)

    interceptor = ServiceInterceptor(admit, on_done=metrics.on_done)
    options = server_options(config.max_message_bytes, config.max_pending_calls) + window_options(config)
    server = grpc.aio.server(options=options)
    inference = InferenceServicer(gateway)
    image = ImageServicer(gateway, link)
    await add_wrapped(server, interceptor, image_pb2_grpc.add_ImageServiceServicer_to_server, image)
    await add_wrapped(
        server,
        interceptor,
        pb_grpc.add_GRPCInferenceServiceServicer_to_server,
        inference,
        {"ModelInfer": grpc.unary_unary_rpc_method_handler(inference.ModelInferBytes)},
    )
    health_servicer = add_health(server, SERVICES)
    await set_serving(health_servicer, SERVICES, False)
    # The Python server has no TCP port: the front relays to it over a unix socket in a private directory.
    # It starts first, so that the front never relays a call to a socket nobody answers yet.
    socket_dir, socket_path = private_socket()
    server.add_insecure_port(f"unix:{socket_path}")
    await server.start()
    try:
        native = start_native(config, f"unix:{socket_path}", keys, metrics)
    except BaseException:  # the public port is taken, say: nothing may be left behind
        await server.stop(0)
        shutil.rmtree(socket_dir, ignore_errors=True)
        await workers.close()
        await limiter.close()
        await link.close()
        metrics.close()
        raise
    gateway.front = native.forwards  # the calls Python admits, the front routes
    gateway.checks = native.check_infer  # a ModelInfer's rules: the front's, the only copy
    gateway.native = native  # and a Classify's limits
    stop = asyncio.Event()

    def sync_routes() -> None:  # the front's routing table follows the watches and the ejections
        native.set_routes(route_table(versions.aliases, versions.versions, workers.endpoints))

    def on_worker_change(ep: Endpoint) -> None:
        if not ep.ejected:
            native.readmit(ep.address)
        sync_routes()

    workers.on_change = on_worker_change
    versions.on_learned = sync_routes  # a version resolved through the registry: Classify can go native

    def on_models(event: registry_pb2.WatchModelsResponse) -> None:
        versions.on_event(event)
        sync_routes()

    def on_workers(event: registry_pb2.WatchWorkersResponse) -> None:
        workers.on_event(event)
        sync_routes()

    tasks = [
        asyncio.create_task(link.follow("models", link.watch_models, on_models, stop)),
        asyncio.create_task(link.follow("workers", link.watch_workers, on_workers, stop)),
        asyncio.create_task(link.follow("keys", link.watch_keys, keys.on_event, stop)),
    ]
    if access_log is not None:
        tasks.append(asyncio.create_task(access_log.run()))
    tasks.append(asyncio.create_task(drain_native(native, metrics, workers, stop)))
    await gateway.wait_for_workers(5.0)
    http = await start_http(config, inference, image, admit, metrics, draining) if config.http_port >= 0 else None
    metrics_port = metrics.serve(config.metrics_host, config.metrics_port) if config.metrics_port >= 0 else -1
    await set_serving(health_servicer, SERVICES, True)
    tls = "mutual TLS" if config.tls_client_ca_file and config.tls_cert_file else "TLS" if config.tls_cert_file else ""
    logger.info(
        "gateway listening on %s (%s)%s",
        f"{config.host}:{native.port}",
        tls or "plaintext",
        f", metrics on {config.metrics_host}:{metrics_port}" if metrics_port >= 0 else "",
    )
    return GatewayServer(
        server,
        native.port,
        gateway,
        keys,
        link,
        health_servicer,
        stop,
        metrics,
        metrics_port,
        tasks,
        native,
        socket_dir,
        draining,
        http,
    )


async def drain_native(
    native: NativeGateway, metrics: Metrics, workers: Workers, stop: asyncio.Event, every_s: float = 0.2
) -> None:
    """Feed the native calls' records to the metrics and the access log, in batches."""
    retried = 0

    def drain() -> None:
        nonlocal retried
        ids = {ep.address: wid for wid, ep in workers.endpoints.items()}
        metrics.on_native(*native.drain_log(), ids)
        for address in native.take_ejected():  # the front set them aside: probe them as the Python path does
            if address in ids:
                workers.eject(workers.endpoints[ids[address]], "repeated failures seen by the native front")
        now = native.counts()["retries"]
        if now > retried:  # every retry is the front's (it routes what Python admits too)
            metrics.retries.inc(now - retried)
            retried = now

    try:
        while not stop.is_set():
            await asyncio.sleep(every_s)
            drain()
    finally:
        drain()


def start_native(config: GatewayConfig, python_address: str, keys: KeyCache, metrics: Metrics) -> NativeGateway:
    """The native front on the public port, fed with verified keys; what it does not answer itself goes to
    python_address (the Python server's unix socket)."""
    require_native()
    native = NativeGateway(
        f"{config.host}:{config.port}",
        config.max_message_bytes,
        python_address,
        config.worker_token,
        config.default_deadline_ms,
        config.max_deadline_ms,
        config.max_images_per_call,
        config.eject_after_failures,
        config.max_pending_calls,
        _tls_files(config),
        config.fast_threads,
        config.unread_window_bytes,
        config.max_calls_per_key,
        _worker_tls(config),
        config.reconnect_s,
    )

    def on_verified(digest: bytes, record: registry_pb2.ApiKey) -> None:
        if Limits.of(record).unlimited:
            native.put_key(digest, record, config.key_cache_ttl_s)
        else:  # limited keys stay on the Python path, which charges Redis; known, so their bodies are read
            native.put_limited_key(digest, record, config.key_cache_ttl_s)

    def on_change(event: registry_pb2.WatchApiKeysResponse) -> None:
        if event.snapshot:
            native.clear_keys()
        else:
            native.drop_keys(list(event.key_ids))

    keys.on_verified, keys.on_change = on_verified, on_change
    native.set_max_top_k(config.max_top_k)
    native.set_classify_limits(
        config.default_top_k, config.max_images_per_forward, config.max_image_bytes, config.max_image_pixels
    )
    native.set_trace_sampled(tracing.tracer is not None)
    metrics.watch_fast_port(native.counts)
    return native


class _Collect:
    """Stands in for a server so that a generated add_*_to_server() hands over its method handlers."""

    def __init__(self) -> None:
        self.services: dict[str, dict[str, grpc.RpcMethodHandler]] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.services[service] = dict(handlers)


class _Details(grpc.HandlerCallDetails):
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


async def add_wrapped(
    server: grpc.aio.Server,
    interceptor: ServiceInterceptor,
    add: Any,
    servicer: Any,
    replace: dict[str, grpc.RpcMethodHandler] | None = None,
) -> None:
    """Register a servicer's handlers with the interceptor's work built in, once.

    The interceptor wraps a method's handler the same way for every call, so the
    gateway asks it once per method here instead of installing it as a server
    interceptor, whose per-call machinery costs about 0.1 ms of CPU in grpc.aio.
    `replace` swaps in handlers of its own (ModelInfer passes bytes through).
    """
    collect = _Collect()
    add(servicer, collect)
    for service, handlers in collect.services.items():
        handlers.update(replace or {})
        wrapped = {}
        for name, unary in handlers.items():
            handler = read_after_admission(unary)

            async def continuation(details: Any, handler: grpc.RpcMethodHandler = handler) -> grpc.RpcMethodHandler:
                return handler

            wrapped[name] = await interceptor.intercept_service(continuation, _Details(f"/{service}/{name}"))
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, wrapped),))
        server.add_registered_method_handlers(service, wrapped)


def window_options(config: GatewayConfig) -> list[tuple[str, int]]:
    """What a caller may send on a call before the gateway asks for its body: the HTTP/2 stream window,
    fixed (no bandwidth probing, which grows every stream's window to megabytes on a fast link). A call's
    body is asked for only once its credentials are checked, so this bounds an unauthenticated call's cost."""
    return [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", config.unread_window_bytes)]


def read_after_admission(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """The same method with a request stream of one message, so that its body is read after the interceptor
    has checked the caller's credentials. grpc.aio reads a unary request's whole message before any handler
    or interceptor code runs: an unauthenticated 48 MiB call would cost 48 MiB before its UNAUTHENTICATED.
    A stream-request handler reads only when asked. Clients see no difference on the wire."""
    if handler.unary_unary is not None:
        behavior = handler.unary_unary

        async def unary(requests: Any, context: Any) -> Any:
            return await behavior(await one_message(requests), context)

        return grpc.stream_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
    if handler.unary_stream is not None:
        stream_behavior = handler.unary_stream

        async def stream(requests: Any, context: Any) -> Any:
            async for answer in stream_behavior(await one_message(requests), context):
                yield answer

        return grpc.stream_stream_rpc_method_handler(stream, handler.request_deserializer, handler.response_serializer)
    return handler


async def one_message(requests: Any) -> Any:
    """The call's one request message. The stream is read to its end (a unary client half-closes right after
    its message) and closed: a receiver left waiting keeps its last message, the whole body, alive."""
    found: list[Any] = []
    try:
        async for request in requests:
            if found:
                raise InvalidArgument("more than one request message in a unary call")
            found.append(request)
    finally:
        aclose = getattr(requests, "aclose", None)
        if aclose is not None:
            await aclose()
    if not found:
        raise InvalidArgument("no request message")
    return found[0]


def role_of(name: str) -> int:
    roles = {"infer": registry_pb2.ROLE_INFER, "publish": registry_pb2.ROLE_PUBLISH, "admin": registry_pb2.ROLE_ADMIN}
    if name not in roles:
        raise ValueError(f"min_role must be one of {', '.join(roles)}, got {name!r}")
    return roles[name]
