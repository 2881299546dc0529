"""Which version answers, and which worker runs it.

The gateway keeps two views fed by the registry's watch streams: aliases (with
canary weights) and live workers (with their loaded versions and queue depth).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, field

import grpc

from fovea.config import channel_options
from fovea.errors import NoHealthyWorker
from fovea.registry_link import RegistryLink
from fovea.v1 import model_pb2, registry_pb2
from inference import grpc_predict_v2_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)


@dataclass
class Endpoint:
    """One worker as the gateway sees it: its last heartbeat, a channel, local counters."""

    status: registry_pb2.WorkerStatus
    channel: grpc.aio.Channel
    stub: pb_grpc.GRPCInferenceServiceStub
    in_flight: int = 0
    failures: int = 0
    ejected_until: float = 0.0
    served: int = 0

    def serves(self, model: str, version: int) -> bool:
        if self.status.state != registry_pb2.WORKER_STATE_READY:
            return False
        return any(m.name == model and m.version == version and m.ready for m in self.status.models)

    @property
    def load(self) -> int:
        return self.in_flight + self.status.queue_depth


@dataclass
class Versions:
    """Alias and version lookups, cached from the registry."""

    link: RegistryLink
    latest_cache_s: float
    aliases: dict[tuple[str, str], model_pb2.Alias] = field(default_factory=dict)
    versions: dict[tuple[str, int], model_pb2.ModelVersion] = field(default_factory=dict)
    latest: dict[str, tuple[int, float]] = field(default_factory=dict)

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

    async def resolve(self, model: str, version: int, alias: str) -> model_pb2.ModelVersion:
        """The version that answers: the one asked for, an alias target by weight, or the latest."""
        if not version:
            al = self.aliases.get((model, alias or "production"))
            if al is not None:
                version = pick_weighted(al)
            elif not alias:
                cached = self.latest.get(model)
                if cached is not None and cached[1] > time.monotonic():
                    version = cached[0]
        if version:
            mv = self.versions.get((model, version))
            if mv is not None:
                if mv.state == model_pb2.VERSION_STATE_ARCHIVED:
                    from fovea.errors import InvalidState

                    raise InvalidState(f"model {model} v{version} is archived")
                return mv
        resp = await self.link.resolve(model, version, alias)
        mv = resp.model
        self.versions[(mv.name, mv.version)] = mv
        if not version and not alias and not resp.HasField("alias"):
            self.latest[model] = (mv.version, time.monotonic() + self.latest_cache_s)
        return mv


def pick_weighted(alias: model_pb2.Alias) -> int:
    if len(alias.targets) == 1:
        return alias.targets[0].version
    return random.choices([t.version for t in alias.targets], [t.weight for t in alias.targets])[0]


class Workers:
    """Live workers, one channel each, chosen by the power of two choices."""

    def __init__(self, max_message_bytes: int, eject_after_failures: int, eject_s: float) -> None:
        self.endpoints: dict[str, Endpoint] = {}
        self.max_message_bytes = max_message_bytes
        self.eject_after_failures = eject_after_failures
        self.eject_s = eject_s
        self.ready = asyncio.Event()

    def on_event(self, event: registry_pb2.WatchWorkersResponse) -> None:
        if event.snapshot:
            live = {w.worker_id for w in event.workers}
            for wid in list(self.endpoints):
                if wid not in live:
                    self._drop(wid)
        for status in event.workers:
            ep = self.endpoints.get(status.worker_id)
            if ep is not None and ep.status.address == status.address:
                ep.status = status
                continue
            if ep is not None:
                self._drop(status.worker_id)
            channel = grpc.aio.insecure_channel(status.address, options=channel_options(self.max_message_bytes))
            self.endpoints[status.worker_id] = Endpoint(status, channel, pb_grpc.GRPCInferenceServiceStub(channel))
            logger.info("worker %s at %s joined", status.worker_id, status.address)
        for wid in event.removed_worker_ids:
            self._drop(wid)
        self.ready.set()

    def _drop(self, wid: str) -> None:
        ep = self.endpoints.pop(wid, None)
        if ep is not None:
            logger.info("worker %s left", wid)
            asyncio.get_running_loop().create_task(ep.channel.close(grace=30))

    def choose(self, model: str, version: int, exclude: frozenset[str] = frozenset()) -> tuple[str, Endpoint]:
        """Power of two choices: two random candidates, the one with less load wins.

        Load is this gateway's own in-flight calls to the worker plus the queue
        depth of its last heartbeat. Ejected workers are skipped until their
        time-out passes; then one call probes them.
        """
        now = time.monotonic()
        candidates = [(wid, ep) for wid, ep in self.endpoints.items()
                      if wid not in exclude and ep.serves(model, version) and ep.ejected_until <= now]
        if not candidates:
            raise NoHealthyWorker(f"no healthy worker has {model} v{version} ready; retry shortly")
        if len(candidates) == 1:
            return candidates[0]
        a, b = random.sample(candidates, 2)
        return a if a[1].load <= b[1].load else b

    def record(self, ep: Endpoint, ok: bool) -> None:
        if ok:
            ep.failures = 0
            return
        ep.failures += 1
        if ep.failures >= self.eject_after_failures:
            ep.ejected_until = time.monotonic() + self.eject_s
            logger.warning("ejecting worker %s for %.1fs after %d failures", ep.status.worker_id, self.eject_s, ep.failures)
