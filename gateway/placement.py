"""Cold starts: a call whose model version has no ready worker asks the registry to place it (DemandModel) and
waits, within its deadline, for a worker to load it, instead of failing at once.

Demands are coalesced per model (one in flight, its answer reused for demand_cache_s), and the waiters of a
version sleep on one event that the worker watch sets (Workers.when_ready), so a thousand waiting calls cost
one DemandModel a second and no polling.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

from fovea.errors import FoveaError, InvalidState, NoHealthyWorker, QueueFull, Unplaceable
from fovea.registry_link import RegistryLink
from fovea.v1 import model_pb2, registry_pb2
from gateway.routing import Versions, Workers

logger = logging.getLogger(__name__)

LOADING_STATES = (registry_pb2.WORKER_STATE_STARTING, registry_pb2.WORKER_STATE_READY)
# A wait ends this much before the call's deadline (at most this share of it), so that the answer, with its
# reason, reaches the caller before the caller's own clock says DEADLINE_EXCEEDED.
ANSWER_MARGIN_S = 0.25
ANSWER_MARGIN_SHARE = 0.2
FIXED_LEFT_MEMORY_S = 30.0
WAIT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)


class ColdStarts:
    def __init__(
        self,
        versions: Versions,
        workers: Workers,
        wait_s: float,
        max_waiters: int,
        demand_cache_s: float,
        demand_refresh_s: float,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.versions = versions
        self.link: RegistryLink = versions.link
        self.workers = workers
        self.wait_s = wait_s
        self.max_waiters = max_waiters
        self.demand_cache_s = demand_cache_s
        self.demand_refresh_s = demand_refresh_s
        self.waiting = 0
        self.demands_sent = 0
        self._per_version: dict[tuple[str, int], int] = {}
        self._in_flight: dict[str, asyncio.Task[registry_pb2.ModelPlacement | None]] = {}
        self._answers: dict[str, tuple[float, registry_pb2.ModelPlacement | None]] = {}
        self.waits = Histogram(
            "fovea_gateway_cold_start_wait_seconds",
            "How long calls waited for a model version with no ready worker to get one, by outcome "
            "(ready; deadline: the call's deadline or cold_start_wait_s ran out; unplaceable)",
            ["model", "outcome"],
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.demands = Counter(
            "fovea_gateway_model_demands", "DemandModel calls sent to the registry", ["model"], registry=registry
        )

    async def demand(self, model: str) -> registry_pb2.ModelPlacement | None:
        """The model's placement after asking for it to be placed; None when the registry cannot say (no
        placement there, or unreachable). One call in flight per model; an answer serves for demand_cache_s."""
        cached = self._answers.get(model)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        task = self._in_flight.get(model)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._demand(model))
            self._in_flight[model] = task
        # shielded: a caller whose deadline ends must not cancel the answer the others wait for
        return await asyncio.shield(task)

    async def _demand(self, model: str) -> registry_pb2.ModelPlacement | None:
        self.demands_sent += 1
        self.demands.labels(model).inc()
        try:
            placement: registry_pb2.ModelPlacement | None = await self.link.demand(model)
        except (FoveaError, grpc.aio.AioRpcError) as exc:
            logger.warning("DemandModel for %s failed (%s); waiting on the worker view alone", model, exc)
            placement = None
        finally:
            self._in_flight.pop(model, None)
        self._answers[model] = (time.monotonic() + self.demand_cache_s, placement)
        if len(self._answers) > 4096:  # forget stale answers; resolved model names bound the rest
            now = time.monotonic()
            self._answers = {m: a for m, a in self._answers.items() if a[0] > now}
        return placement

    async def wait(self, model: str, version: int, deadline: float) -> str:
        """Returns once a worker has the version ready (its id); raises the true reason when none will in time.

        deadline: the call's, on the monotonic clock. The answer is given a little before it, so that the
        caller reads the reason rather than its own DEADLINE_EXCEEDED.
        """
        start = time.monotonic()
        budget = deadline - start
        margin = min(ANSWER_MARGIN_S, max(0.0, budget) * ANSWER_MARGIN_SHARE)
        capped = self.wait_s < budget - margin
        until = start + min(self.wait_s, budget - margin)
        placement = await self._demand_within(model, until)
        if not self._should_wait(model, version, placement):
            refusal = self._refusal(model, version, placement)
            if isinstance(refusal, Unplaceable):
                self.waits.labels(model, "unplaceable").observe(time.monotonic() - start)
                logger.info("cold start: %s v%s refused: %s", model, version, refusal)
            raise refusal
        if self.waiting >= self.max_waiters:
            raise QueueFull(
                f"{self.waiting} calls are already waiting for models to load (the gateway's limit, "
                f"max_cold_waiters); retry later"
            )
        key = (model, version)
        self.waiting += 1
        self._per_version[key] = self._per_version.get(key, 0) + 1
        outcome = "deadline"
        try:
            while True:
                ready_on = self.workers.ready_on(model, version)
                if ready_on:
                    outcome = "ready"
                    waited = time.monotonic() - start
                    logger.info("cold start: %s v%s ready on %s after %.2f s", model, version, ready_on[0], waited)
                    return ready_on[0]
                left = until - time.monotonic()
                if left <= 0:
                    raise NoHealthyWorker(self._timeout_message(model, version, placement, capped))
                ready = self.workers.when_ready(model, version)
                try:
                    await asyncio.wait_for(ready.wait(), min(left, self.demand_refresh_s))
                except TimeoutError:
                    # a slow load: renew the demand and learn whether the model became unplaceable meanwhile
                    placement = await self._demand_within(model, until) or placement
                    if _unplaceable(placement) and not self._should_wait(model, version, placement):
                        outcome = "unplaceable"
                        raise self._refusal(model, version, placement) from None
        finally:
            self.waiting -= 1
            left_waiting = self._per_version[key] - 1
            if left_waiting:
                self._per_version[key] = left_waiting
            else:
                del self._per_version[key]
                self.workers.forget_ready(model, version)
            waited = time.monotonic() - start
            self.waits.labels(model, outcome).observe(waited)
            if outcome != "ready":
                logger.info("cold start: %s v%s not ready after %.2f s (%s)", model, version, waited, outcome)

    async def _demand_within(self, model: str, until: float) -> registry_pb2.ModelPlacement | None:
        try:
            return await asyncio.wait_for(self.demand(model), max(0.0, until - time.monotonic()))
        except TimeoutError:
            return None

    def _should_wait(self, model: str, version: int, placement: registry_pb2.ModelPlacement | None) -> bool:
        """Wait when a worker is loading the version, or placement will put it somewhere, or an alias just moved
        to it on a model fixed-list workers serve (they follow the alias). Otherwise, as ever, fail at once: a
        version nobody will load must not hold the call until its deadline."""
        if self._loading_on(model, version, placement):
            return True
        if self._fixed_list_serves(model) and self.versions.aliased(model, version):
            return True
        if placement is None or _unplaceable(placement):
            return False
        return self._pool_serves(model, version)

    def _pool_serves(self, model: str, version: int) -> bool:
        """Whether pool workers load the version: they serve a model's production alias, else its latest."""
        production = self.versions.aliases.get((model, "production"))
        if production is not None:
            return any(t.version == version for t in production.targets)
        known = [
            v
            for (name, v), mv in self.versions.versions.items()
            if name == model and mv.state != model_pb2.VERSION_STATE_ARCHIVED
        ]
        return not known or version >= max(known)

    def _loading_on(self, model: str, version: int, placement: registry_pb2.ModelPlacement | None) -> list[str]:
        """Workers that list the version as not ready yet and are meant to serve it: a fixed-list worker, or
        one placement assigned it (a pool worker also lists as not ready a model it is leaving)."""
        assigned = set(placement.worker_ids) if placement is not None else set()
        return sorted(
            wid
            for wid, ep in self.workers.endpoints.items()
            if ep.status.state in LOADING_STATES
            and (not ep.status.pooled or placement is None or wid in assigned)
            and any(m.name == model and m.version == version and not m.ready for m in ep.status.models)
        )

    def _fixed_list_serves(self, model: str) -> bool:
        left = self.workers.fixed_left.get(model)
        if left is not None and time.monotonic() - left < FIXED_LEFT_MEMORY_S:
            return True  # a fixed-list worker served it moments ago: it may be back with its next heartbeat
        return any(
            not ep.status.pooled and any(m.name == model for m in ep.status.models)
            for ep in self.workers.endpoints.values()
        )

    def _refusal(self, model: str, version: int, placement: registry_pb2.ModelPlacement | None) -> FoveaError:
        if placement is not None and _unplaceable(placement) and not self._fixed_list_serves(model):
            reason = placement.reason or "no pool worker can hold it"
            return Unplaceable(f"{model} has no replicas and none can be placed: {reason}")
        if placement is not None and not _unplaceable(placement) and not self._pool_serves(model, version):
            production = self.versions.aliases.get((model, "production"))
            serves = (
                f"its production alias ({', '.join(f'v{t.version}' for t in production.targets)})"
                if production is not None
                else "its latest version"
            )
            return InvalidState(
                f"{model} v{version} is not served: pool workers load {serves}; promote v{version} to serve it"
            )
        return NoHealthyWorker(f"no healthy worker has {model} v{version} ready; retry shortly")

    def _timeout_message(
        self, model: str, version: int, placement: registry_pb2.ModelPlacement | None, capped: bool
    ) -> str:
        ran_out = (
            f"still not ready after {self.wait_s:g} s (the gateway's cold_start_wait_s)"
            if capped
            else "the call's deadline ran out first"
        )
        loading = self._loading_on(model, version, placement)
        if loading:
            return f"{model} v{version} is loading on {_names(loading)} (cold start); {ran_out}"
        if _unplaceable(placement) and self._fixed_list_serves(model):
            placement = None  # fixed-list workers serve it: what placement says of its pool is beside the point
        if placement is not None and placement.worker_ids:
            return (
                f"{model} v{version} is assigned to {_names(placement.worker_ids)}, which had not started "
                f"loading it (cold start); {ran_out}"
            )
        if placement is not None:
            why = f": {placement.reason}" if placement.reason else ""
            return f"{model} v{version} is waiting to be placed{why}; {ran_out}"
        return f"no worker has started loading {model} v{version} yet; {ran_out}"


def _unplaceable(placement: registry_pb2.ModelPlacement | None) -> bool:
    return placement is not None and placement.state == registry_pb2.PLACEMENT_STATE_UNPLACEABLE


def _names(ids: Sequence[str]) -> str:
    ids = list(ids)
    return ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
