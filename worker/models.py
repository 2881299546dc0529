"""The model versions a worker has loaded, and how it follows registry aliases.

A new version is downloaded and verified (fovea/registry_link.py), its sessions opened and warmed up
(worker/loading.py) and given a slot on the native front (_wire) before it is marked ready; a version
that left its alias keeps serving for unload_delay_s (while gateways learn of the move), then drains and
unloads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from fovea import oip
from fovea.errors import FoveaError, InvalidArgument, ModelNotFound, ModelNotReady
from fovea.images import Preprocess
from fovea.registry_link import RegistryLink
from fovea.v1 import model_pb2, registry_pb2
from worker.config import WorkerConfig
from worker.fast_port import NativeFront
from worker.loading import Opened, open_sessions, warm_up
from worker.memory import rss_bytes
from worker.metrics import WorkerMetrics
from worker.runtime import GPU_PROVIDERS
from worker.stats import ModelStats

logger = logging.getLogger(__name__)


@dataclass
class Loaded:
    """One model version in memory."""

    mv: model_pb2.ModelVersion
    preprocess: Preprocess | None
    provider: str
    ready: bool = False
    unload_at: float | None = None
    input_dtypes: list[Any] = field(default_factory=list)
    instances: int = 1
    sizes: list[int] = field(default_factory=list)
    """Batch sizes with a session each (pad_batches); empty: every size on one session."""
    stats: ModelStats = field(default_factory=ModelStats)
    slot: int = 0
    """This version's slot on the native front, whose queue and batcher take all of its calls; 0 until ready."""
    leaving: bool = False
    """Its model is no longer assigned here: heartbeats report it not ready (gateways stop routing to it),
    but it keeps answering until unload_at."""
    memory_bytes: int = 0
    """Host memory it cost: the process's RSS growth across its load (loads are serialized), at least the
    artifact's size."""
    requests: int = 0
    """Calls handed out by ModelManager.get() that never reached the native queue, which counts the rest."""
    last_used: float = field(default_factory=time.monotonic)

    @property
    def key(self) -> tuple[str, int]:
        return self.mv.name, self.mv.version


@dataclass
class Followed:
    """A model the worker serves: through an alias, or pinned to a version."""

    name: str
    alias: str = "production"
    pinned: int = 0
    targets: list[model_pb2.AliasTarget] = field(default_factory=list)
    leaving: bool = False
    """No longer assigned (pool workers): its versions are on their way out."""


def parse_model_spec(text: str) -> Followed:
    if "@" in text:
        name, _, version = text.partition("@")
        return Followed(name=name, alias="", pinned=int(version))
    name, _, alias = text.partition(":")
    return Followed(name=name, alias=alias or "production")


class ModelManager:
    def __init__(
        self,
        config: WorkerConfig,
        link: RegistryLink,
        keys: list[bytes],
        metrics: WorkerMetrics | None = None,
        native: NativeFront | None = None,
    ) -> None:
        self.config = config
        self.native = native
        self.link = link
        self.keys = keys
        self.metrics = metrics or WorkerMetrics()
        self.loaded: dict[tuple[str, int], Loaded] = {}
        self.followed = {f.name: f for f in map(parse_model_spec, config.models)}
        self.fixed = set(self.followed)
        """The models of config.models: placement never adds to them nor takes them away."""
        self.changed = asyncio.Event()
        """Set when a version becomes ready, starts leaving or unloads: the next heartbeat goes at once."""
        self.errors: dict[tuple[str, int], str] = {}
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._syncs: set[asyncio.Task[None]] = set()

    # ---- life cycle -----------------------------------------------------

    async def start(self) -> None:
        for f in self.followed.values():
            try:
                await self._sync_followed(f, initial=True)
            except FoveaError as exc:
                logger.error("cannot load %s yet: %s", f.name, exc)
        self._tasks.append(
            asyncio.create_task(self.link.follow("models", self.link.watch_models, self._on_event, self._stop))
        )
        self._tasks.append(asyncio.create_task(self._janitor()))

    async def stop(self, timeout_s: float) -> None:
        """Stop following aliases, then let every native queue answer what it holds."""
        self._stop.set()
        for t in [*self._tasks, *self._syncs]:
            t.cancel()
        await asyncio.gather(*self._tasks, *self._syncs, return_exceptions=True)
        if self.native is not None:
            await asyncio.gather(*(self.native.remove(lv.slot) for lv in self.loaded.values() if lv.slot))
            for lv in self.loaded.values():
                lv.slot = 0

    # ---- lookups --------------------------------------------------------

    def by_slot(self, slot: int) -> Loaded | None:
        """The ready version on the native front's slot (an image call's, for its decode thread)."""
        for lv in list(self.loaded.values()):
            if lv.slot == slot and lv.ready:
                lv.last_used = time.monotonic()
                return lv
        return None

    def get(self, name: str, version: str, count: bool = True) -> Loaded:
        """The loaded version a request asks for; an empty version follows the alias's weights. count: add it to
        the version's requests (ModelInfer counts its own: the native queue counts those that reach it)."""
        if version:
            try:
                v = int(version)
            except ValueError:
                raise InvalidArgument(f"model version must be a number, got {version[:40]!r}") from None
            lv = self.loaded.get((name, v))
            if lv is None:
                if (name, v) in self.errors:
                    raise ModelNotReady(f"model {name} v{v} failed to load: {self.errors[(name, v)]}")
                if name in self.followed or any(k[0] == name for k in self.loaded):
                    raise ModelNotFound(f"model {name} v{v} is not loaded on this worker")
                raise ModelNotFound(f"model {name!r} is not served by this worker")
        else:
            # the canary pick is the front's (it routes calls without a version the same way)
            picked = self.native.pick_version(name) if self.native is not None else 0
            found = self.loaded.get((name, picked)) if picked else None
            if found is None or not found.ready:
                if name not in self.followed and not any(k[0] == name for k in self.loaded):
                    raise ModelNotFound(f"model {name!r} is not served by this worker")
                raise ModelNotReady(f"model {name!r} has no ready version on this worker")
            lv = found
        if not lv.ready:
            raise ModelNotReady(f"model {name} v{lv.mv.version} is still loading")
        if count:
            lv.requests += 1
        lv.last_used = time.monotonic()
        return lv

    def submit(self, lv: Loaded, request: bytes, timeout_ms: int, timing: Any = None) -> bytes:
        """Hands a raw-tensor ModelInferRequest to the version's native queue; blocks until answered."""
        assert self.native is not None
        if not lv.slot:
            raise ModelNotReady(f"model {lv.mv.name} v{lv.mv.version} is unloading; retry")
        return self.native.submit(lv.slot, request, timeout_ms, timing)

    def statuses(self) -> list[registry_pb2.LoadedModel]:
        """What heartbeats say of each version: a leaving one is not ready, so gateways stop routing to it."""
        now_mono, now = time.monotonic(), time.time()
        out = []
        for lv in self.loaded.values():
            queued, busy = self.native.depth(lv.slot) if self.native is not None and lv.slot else (0, 0)
            fast_calls, fast_last = self._fast_usage(lv)
            idle = now_mono - lv.last_used
            if fast_last:
                idle = min(idle, max(0.0, now - fast_last))
            out.append(
                registry_pb2.LoadedModel(
                    name=lv.mv.name,
                    version=lv.mv.version,
                    ready=lv.ready and not lv.leaving,
                    provider=lv.provider,
                    memory_bytes=lv.memory_bytes,
                    queue_depth=queued + busy,
                    idle_s=round(idle, 3),
                    requests=lv.requests + fast_calls,
                )
            )
        return out

    def _fast_usage(self, lv: Loaded) -> tuple[int, float]:
        """(calls answered, unix time of the last batch) of a version on the fast port; (0, 0) off it."""
        stats = self.fast_statistics(lv)
        if stats is None:
            return 0, 0.0
        s = stats.inference_stats
        return s.success.count + s.fail.count, stats.last_inference / 1000.0

    @property
    def queue_depth(self) -> int:
        return self.fast_pending()[0]

    def fast_pending(self) -> tuple[int, int]:
        """(calls queued, batches in compute) on the fast port, over every version."""
        if self.native is None:
            return 0, 0
        pairs = [self.native.depth(lv.slot) for lv in self.loaded.values() if lv.slot]
        return sum(p[0] for p in pairs), sum(p[1] for p in pairs)

    def config_response(self, lv: Loaded) -> Any:
        from inference import grpc_predict_v2_pb2 as pb

        gpu = self.config.device_id if lv.provider in GPU_PROVIDERS else None
        return pb.ModelConfigResponse(
            config=oip.model_config(
                lv.mv,
                self.config.max_batch_size,
                preferred_batch_sizes=list(self.config.preferred_batch_sizes),
                max_queue_delay_us=self.config.max_queue_delay_us,
                instances=lv.instances,
                gpu_id=gpu,
            )
        )

    def fast_statistics(self, lv: Loaded) -> Any:
        """ModelStatistics of the calls this version answered on the fast port, or None."""
        if self.native is None or not lv.slot:
            return None
        from inference import grpc_predict_v2_pb2 as pb

        return pb.ModelStatistics.FromString(self.native.statistics(lv.slot))

    def _route_fast(self, f: Followed) -> None:
        if self.native is None:
            return
        targets = [
            (lv.slot, t.weight)
            for t in f.targets
            if (lv := self.loaded.get((f.name, t.version))) is not None and lv.slot
        ]
        self.native.route(f.name, targets)

    # ---- loading --------------------------------------------------------

    async def _on_event(self, event: registry_pb2.WatchModelsResponse) -> None:
        names = {a.model for a in event.aliases} | {r.split("/")[0] for r in event.removed_aliases}
        for f in self.followed.values():
            if f.pinned or f.leaving:
                continue
            if event.snapshot or f.name in names:
                alias = next((a for a in event.aliases if a.model == f.name and a.name == f.alias), None)
                if alias is not None or event.snapshot:
                    self._spawn(self._sync_followed(f, alias=alias), f.name)

    def _spawn(self, coro: Any, name: str) -> None:
        """Run a sync in the background, keep a reference, and log its failure instead of losing it."""
        task = asyncio.create_task(coro)
        self._syncs.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._syncs.discard(t)
            if not t.cancelled() and t.exception() is not None:
                logger.error("cannot follow %s: %s", name, t.exception())

        task.add_done_callback(done)

    # ---- placement: models assigned and unassigned (pool workers) ---------------------------------

    async def follow(self, name: str) -> None:
        """Serve a model placement assigned: its production alias, else its latest version, as a
        FOVEA_WORKER_MODELS entry NAME does. A model assigned again while leaving is kept."""
        f = self.followed.get(name)
        if f is None:
            f = self.followed[name] = Followed(name=name)
        elif f.leaving:
            f.leaving = False
            for t in f.targets:
                lv = self.loaded.get((name, t.version))
                if lv is not None and lv.leaving:
                    lv.leaving, lv.unload_at = False, None
            self.changed.set()
            logger.info("%s is assigned here again; keeping it", name)
        await self._sync_followed(f)

    def leave(self, name: str) -> None:
        """Stop serving a model placement took away: heartbeats report its versions not ready at once,
        they keep answering for unload_delay_s (while gateways learn), then drain and unload."""
        f = self.followed.get(name)
        if f is None or f.leaving or name in self.fixed:
            return
        f.leaving = True
        if not any(n == name for n, _ in self.loaded):
            del self.followed[name]
            return
        # A version still warming up is left to its load, which marks it when it ends (_sync_followed).
        self._mark_leaving(f)
        logger.info("%s is no longer assigned here; unloading in %.1fs", name, self.config.unload_delay_s)

    def serving(self, name: str) -> bool:
        """Whether a model is followed, not leaving, and every version of its alias is loaded."""
        f = self.followed.get(name)
        return (
            f is not None
            and not f.leaving
            and bool(f.targets)
            and all((name, t.version) in self.loaded for t in f.targets)
        )

    def _mark_leaving(self, f: Followed) -> None:
        """Its ready versions report not ready from now on and unload after unload_delay_s."""
        unload_at = time.monotonic() + self.config.unload_delay_s
        for (n, _), lv in self.loaded.items():
            if n == f.name and lv.ready and not lv.leaving:
                lv.leaving = True
                lv.unload_at = unload_at if lv.unload_at is None else min(lv.unload_at, unload_at)
        self.changed.set()

    async def _sync_followed(self, f: Followed, initial: bool = False, alias: model_pb2.Alias | None = None) -> None:
        async with self._lock:
            if f.leaving:
                return
            if f.pinned:
                targets = [model_pb2.AliasTarget(version=f.pinned, weight=100)]
            elif alias is not None:
                targets = list(alias.targets)
            else:
                resp = await self.link.resolve(f.name, alias=f.alias if f.alias != "production" else "")
                targets = (
                    list(resp.alias.targets)
                    if resp.HasField("alias")
                    else [model_pb2.AliasTarget(version=resp.model.version, weight=100)]
                )
            wanted = {t.version for t in targets}
            for v in wanted:
                if (f.name, v) not in self.loaded:
                    resp = await self.link.resolve(f.name, version=v)
                    await self._load(resp.model)
                else:
                    self.loaded[(f.name, v)].unload_at = None
                    self.loaded[(f.name, v)].leaving = False
            # Switch traffic only once every wanted version is ready.
            if all((f.name, v) in self.loaded for v in wanted):
                f.targets = targets
                self._route_fast(f)
            if f.leaving:  # unassigned while it loaded
                self._mark_leaving(f)
                return
            now = time.monotonic()
            for (name, v), lv in self.loaded.items():
                if name == f.name and v not in wanted and lv.unload_at is None:
                    lv.unload_at = now + (0 if initial else self.config.unload_delay_s)
                    logger.info(
                        "%s v%d left alias %s; unloading in %.1fs", name, v, f.alias, self.config.unload_delay_s
                    )

    async def _trim_heap(self) -> None:
        """A load's transient copies (chunks, parses, Python's session) go back to the system between its steps,
        so the worker's peak is one step's, not their sum."""
        if self.native is not None:
            await asyncio.to_thread(self.native.trim_heap)

    async def _load(self, mv: model_pb2.ModelVersion) -> None:
        """Download and verify (RegistryLink.download), open the sessions and warm them up (worker/loading.py),
        then give the version a slot on the native front; it is listed at once but ready only after warm-up."""
        key = (mv.name, mv.version)
        t0 = time.perf_counter()
        rss0 = rss_bytes()  # loads are serialized (self._lock), so the growth is this version's
        config = self.config.for_model(mv.name)
        count = max(1, config.instances)
        try:
            data = await self.link.download(mv, self.keys)
            size = len(data)
            t_download = time.perf_counter()
            await self._trim_heap()  # the download's chunks, joined into data
            alone_threads = self.config.alone_threads(mv.name)
            assert self.native is not None, "the native front is the worker's only queue and batcher"
            opened = await open_sessions(data, config, mv, self.native, alone_threads, self._trim_heap)
            del data  # the sessions hold their own copies; the artifact's bytes must not count as the model's
            await self._trim_heap()
        except Exception as exc:  # noqa: BLE001 - a bad artifact must not take the worker down
            self.errors[key] = str(exc)[:300]
            logger.error("refusing %s v%d: %s", mv.name, mv.version, exc)
            if isinstance(exc, FoveaError):
                raise
            raise ModelNotReady(f"model {mv.name} v{mv.version} failed to load: {str(exc)[:200]}") from None
        info = opened.info
        lv = Loaded(
            mv=mv,
            preprocess=Preprocess.from_proto(mv.preprocessing, mv.inputs[0]) if mv.HasField("preprocessing") else None,
            provider=info.provider,
            input_dtypes=info.input_dtypes,
            instances=count,
            sizes=list(info.sizes),
        )
        self.loaded[key] = lv  # listed (heartbeats, ModelReady) but not ready until warmed up
        t_sessions = time.perf_counter()
        try:
            await warm_up(self.config, mv, opened)
        except Exception as exc:  # noqa: BLE001
            opened.close()
            del self.loaded[key]
            self.errors[key] = f"warm-up failed: {str(exc)[:300]}"
            logger.error("warm-up of %s v%d failed: %s", mv.name, mv.version, exc)
            raise ModelNotReady(f"model {mv.name} v{mv.version} failed its warm-up: {str(exc)[:200]}") from None
        try:
            lv.slot = self._wire(mv, lv, opened)
        except ValueError as exc:  # more inputs or outputs, or a higher rank, than the native front takes
            opened.close()
            del self.loaded[key]
            self.errors[key] = str(exc)[:300]
            logger.error("refusing %s v%d: %s", mv.name, mv.version, exc)
            raise ModelNotReady(f"model {mv.name} v{mv.version} cannot be served: {str(exc)[:200]}") from None
        self.metrics.provider.labels(mv.name, str(mv.version), lv.provider).set(1)
        lv.memory_bytes = max(rss_bytes() - rss0, mv.size_bytes, size)
        lv.last_used = time.monotonic()
        lv.ready = True
        self.changed.set()
        self.errors.pop(key, None)
        sizes = f", a session per batch size {info.sizes}" if info.sizes else ""
        t_end = time.perf_counter()
        logger.info(
            "cold start: loaded %s v%d in %.2f s (download %.2f s, sessions %.2f s, warm-up %.2f s) on %s "
            "(%d instance(s)%s), %.1f MB",
            mv.name,
            mv.version,
            t_end - t0,
            t_download - t0,
            t_sessions - t_download,
            t_end - t_sessions,
            lv.provider,
            count,
            sizes,
            lv.memory_bytes / 1e6,
        )

    def _wire(self, mv: model_pb2.ModelVersion, lv: Loaded, opened: Opened) -> int:
        """The version's slot on the native front: its queue and batcher, and its C++ batch loops on its sessions.
        ValueError when the front cannot take its tensors."""
        assert self.native is not None, "the native front is the worker's only queue and batcher"
        version = str(mv.version)
        return self.native.add(
            mv.name,
            mv.version,
            list(mv.inputs),
            list(mv.outputs),
            list(mv.labels),
            mv.preprocessing.outputs_probabilities,
            self.config,
            opened.sessions,
            self.metrics.batch_hook(mv.name, version),
            self.metrics.drop_hook(mv.name, version),
            alone_session=opened.alone,
        )

    async def _janitor(self) -> None:
        while not self._stop.is_set():
            await asyncio.sleep(0.25)
            now = time.monotonic()
            for key, lv in list(self.loaded.items()):
                if lv.unload_at is not None and lv.unload_at <= now:
                    lv.ready = False
                    del self.loaded[key]
                    self.changed.set()
                    f = self.followed.get(key[0])
                    if f is not None and f.leaving and not any(n == key[0] for n, _ in self.loaded):
                        # Gone from the followed models with its last version, not after the native queue
                        # drains below: a model listed nowhere but still followed would be half unloaded.
                        del self.followed[key[0]]
                    if self.native is not None and lv.slot:
                        await self.native.remove(lv.slot)
                    logger.info("unloaded %s v%d", *key)
            for name, f in list(self.followed.items()):
                if f.leaving and not any(n == name for n, _ in self.loaded):
                    del self.followed[name]
