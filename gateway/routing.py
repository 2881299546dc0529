"""Which version answers, and which workers have it ready.

The gateway keeps two views fed by the registry's watch streams: aliases (with canary weights) and live workers
(with their loaded versions and queue depth). Both feed the native front's routing table; the front picks the
worker for each call and counts the failures that eject one (native/front.cc), and this module probes an
ejected worker until it answers again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fovea.config import channel_options
from fovea.errors import InvalidState
from fovea.registry_link import RegistryLink
from fovea.v1 import model_pb2, registry_pb2
from gateway.config import RECONNECT_S, reconnect_ms
from gateway.fast_port import canary_pick
from inference import grpc_predict_v2_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

WORKER_SERVICE = "inference.GRPCInferenceService"
MAX_PROBE_INTERVAL_S = 30.0


@dataclass
class Endpoint:
    """One worker as the gateway sees it: its last heartbeat, and a channel for its statistics and probes."""

    status: registry_pb2.WorkerStatus
    channel: grpc.aio.Channel
    stub: pb_grpc.GRPCInferenceServiceStub
    ejected: bool = False
    probe: asyncio.Task[None] | None = None

    def serves(self, model: str, version: int) -> bool:
        if self.status.state != registry_pb2.WORKER_STATE_READY:
            return False
        return any(m.name == model and m.version == version and m.ready for m in self.status.models)

    @property
    def address(self) -> str:
        """The worker's one port (fast_address is the same port, empty under TLS)."""
        return self.status.fast_address or self.status.address


@dataclass
class Versions:
    """Alias and version lookups, cached from the registry."""

    link: RegistryLink
    latest_cache_s: float
    aliases: dict[tuple[str, str], model_pb2.Alias] = field(default_factory=dict)
    versions: dict[tuple[str, int], model_pb2.ModelVersion] = field(default_factory=dict)
    latest: dict[str, tuple[int, float]] = field(default_factory=dict)
    on_learned: Callable[[], None] | None = None
    """Called when resolve() learns a version from the registry (the native front's table lists it then)."""

    def on_event(self, event: registry_pb2.WatchModelsResponse) -> None:
        if event.snapshot:
            self.aliases.clear()
            self.latest.clear()
        for alias in event.aliases:
            self.aliases[(alias.model, alias.name)] = alias
        for removed in event.removed_aliases:
            model, _, name = removed.partition("/")
            self.aliases.pop((model, name), None)
        for mv in event.versions:
            self.versions[(mv.name, mv.version)] = mv
            self.latest.pop(mv.name, None)

    def aliased(self, model: str, version: int) -> bool:
        """Whether an alias of the model points at the version (workers that follow the alias will load it)."""
        return any(
            name == model and any(t.version == version for t in alias.targets)
            for (name, _), alias in self.aliases.items()
        )

    async def resolve(self, model: str, version: int, alias: str) -> model_pb2.ModelVersion:
        """The version that answers: the one asked for, an alias target by weight, or the latest."""
        if not version:
            al = self.aliases.get((model, alias or "production"))
            if al is not None:
                version = canary_pick(al)
            elif not alias:
                cached = self.latest.get(model)
                if cached is not None and cached[1] > time.monotonic():
                    version = cached[0]
        if version:
            mv = self.versions.get((model, version))
            if mv is not None:
                if mv.state == model_pb2.VERSION_STATE_ARCHIVED:
                    raise InvalidState(f"model {model} v{version} is archived")
                return mv
        resp = await self.link.resolve(model, version, alias)
        mv = resp.model
        learned = (mv.name, mv.version) not in self.versions
        self.versions[(mv.name, mv.version)] = mv
        if learned and self.on_learned is not None:
            self.on_learned()
        if not version and not alias and not resp.HasField("alias"):
            self.latest[model] = (mv.version, time.monotonic() + self.latest_cache_s)
        return mv


class Workers:
    """Live workers, one channel each (statistics, probes).

    A worker the native front ejected (it failed eject_after_failures calls in a row with UNAVAILABLE) is
    probed here (the worker's grpc.health.v1 check) and re-admitted once it answers SERVING, trying after eject_s
    and then at doubling intervals.
    """

    def __init__(
        self,
        max_message_bytes: int,
        eject_s: float,
        on_eject: Callable[[], None] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        reconnect_s: tuple[float, float] = RECONNECT_S,
    ) -> None:
        """credentials: TLS to the workers; None dials plaintext. reconnect_s: the first and the longest wait
        before dialling a worker again (gRPC's default grows to 120 s)."""
        self.endpoints: dict[str, Endpoint] = {}
        self.credentials = credentials
        first, longest = reconnect_ms(reconnect_s)
        self.reconnect_options = [
            ("grpc.initial_reconnect_backoff_ms", first),
            ("grpc.min_reconnect_backoff_ms", first),
            ("grpc.max_reconnect_backoff_ms", longest),
        ]
        self.max_message_bytes = max_message_bytes
        self.eject_s = eject_s
        self.on_eject = on_eject
        self.on_change: Callable[[Endpoint], None] | None = None
        """Called after a worker is ejected or re-admitted (the native front's table follows)."""
        self.ready = asyncio.Event()
        self.fixed_left: dict[str, float] = {}
        """Model -> when a fixed-list worker serving it last left the view (a registry restart can empty the view
        for a heartbeat: calls for those models wait for it to come back rather than fail)."""
        self._awaited: dict[tuple[str, int], asyncio.Event] = {}
        """Versions calls are waiting for (cold starts): set when a heartbeat shows one ready."""

    def when_ready(self, model: str, version: int) -> asyncio.Event:
        """An event set once a worker's heartbeat in the watch shows the version ready."""
        event = self._awaited.get((model, version))
        if event is None:
            event = self._awaited[(model, version)] = asyncio.Event()
        return event

    def forget_ready(self, model: str, version: int) -> None:
        """No call waits for the version any more."""
        self._awaited.pop((model, version), None)

    def _wake(self, workers: Sequence[registry_pb2.WorkerStatus]) -> None:
        for status in workers:
            if status.state != registry_pb2.WORKER_STATE_READY:
                continue
            for m in status.models:
                if m.ready:
                    event = self._awaited.pop((m.name, m.version), None)
                    if event is not None:
                        event.set()

    def on_event(self, event: registry_pb2.WatchWorkersResponse) -> None:
        if event.snapshot:
            live = {w.worker_id for w in event.workers}
            for wid in list(self.endpoints):
                if wid not in live:
                    self._drop(wid)
        for status in event.workers:
            ep = self.endpoints.get(status.worker_id)
            if ep is not None and ep.status.address == status.address and ep.status.fast_address == status.fast_address:
                ep.status = status
                continue
            if ep is not None:
                self._drop(status.worker_id)
            options = channel_options(self.max_message_bytes) + self.reconnect_options
            channel = self._dial(status.address, options)
            ep = Endpoint(status, channel, pb_grpc.GRPCInferenceServiceStub(channel))
            self.endpoints[status.worker_id] = ep
            logger.info("worker %s at %s joined", status.worker_id, status.address)
        for wid in event.removed_worker_ids:
            self._drop(wid)
        self.ready.set()
        if self._awaited:
            self._wake(event.workers)

    def _dial(self, address: str, options: list[tuple[str, int]]) -> grpc.aio.Channel:
        if self.credentials is None:
            return grpc.aio.insecure_channel(address, options=options)
        return grpc.aio.secure_channel(address, self.credentials, options=options)

    def _drop(self, wid: str) -> None:
        ep = self.endpoints.pop(wid, None)
        if ep is not None:
            logger.info("worker %s left", wid)
            if not ep.status.pooled:
                for m in ep.status.models:
                    self.fixed_left[m.name] = time.monotonic()
            if ep.probe is not None:
                ep.probe.cancel()
            asyncio.get_running_loop().create_task(ep.channel.close(grace=30))

    def ready_on(self, model: str, version: int) -> list[str]:
        """The ids of the workers whose last heartbeat shows the version ready (ejected ones too: the front tries
        them when no other has it)."""
        return [wid for wid, ep in self.endpoints.items() if ep.serves(model, version)]

    def id_of(self, address: str) -> str:
        """The id of the worker at this address (its one port), or the address when none is known."""
        for wid, ep in self.endpoints.items():
            if address in (ep.address, ep.status.address):
                return wid
        return address

    def eject(self, ep: Endpoint, why: str) -> None:
        """Set a worker aside until its health probe answers SERVING."""
        if ep.ejected:
            return
        ep.ejected = True
        logger.warning("ejecting worker %s after %s; probing in %.1fs", ep.status.worker_id, why, self.eject_s)
        if self.on_eject is not None:
            self.on_eject()
        ep.probe = asyncio.get_running_loop().create_task(self._probe(ep))
        if self.on_change is not None:
            self.on_change(ep)

    async def _probe(self, ep: Endpoint) -> None:
        wait_s = self.eject_s
        while ep.ejected:
            await asyncio.sleep(wait_s)
            if await probe(ep.channel, timeout_s=min(2.0, max(0.2, self.eject_s))):
                ep.ejected = False
                logger.info("worker %s answered its probe; re-admitted", ep.status.worker_id)
                if self.on_change is not None:
                    self.on_change(ep)
                return
            wait_s = min(wait_s * 2, MAX_PROBE_INTERVAL_S)

    async def close(self) -> None:
        for ep in self.endpoints.values():
            if ep.probe is not None:
                ep.probe.cancel()
            await ep.channel.close()


async def probe(channel: grpc.aio.Channel, timeout_s: float) -> bool:
    """True when the worker's health service says its inference service is SERVING."""
    stub = health_pb2_grpc.HealthStub(channel)
    try:
        resp = await stub.Check(
            health_pb2.HealthCheckRequest(service=WORKER_SERVICE), timeout=timeout_s, wait_for_ready=True
        )
    except grpc.aio.AioRpcError:
        return False
    return bool(resp.status == health_pb2.HealthCheckResponse.SERVING)
