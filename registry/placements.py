"""Placement: each model's desired scale, the one leader that assigns models to pool workers, and what it decided.

Redis layout (keys from fovea.names.redis_key):
  scale:NAME                  ModelScale bytes (SetModelScale); absent: the registry's defaults
  placement:leader            id of the registry replica leading placement (SET NX PX, renewed every tick)
  placement:pool              set with a TTL by every pool worker's heartbeat: replicas contend for leadership
                              only while a pool exists (or assignments remain to clear)
  placement:assign:WORKER     the models assigned to a pool worker, comma-separated ("" = none)
  placement:assigned          set of the worker ids that have an assign key
  placement:model:NAME        ModelPlacement bytes: the leader's last decision for the model
  placement:demand:NAME       unix time of a gateway's last demand for the model; expires after demand_ttl_s
  placement:memory:NAME       hash version -> the most host memory a worker measured it costs ("N:device": device)

Every write of assignments and placements is one Lua script that first checks that the leader key
still holds this replica's id, so a deposed leader (paused, partitioned, its lease expired) can
never write over its successor's decisions. Scale-with-load windows live in the leader's memory;
the target itself is in ModelPlacement.target_replicas, so a new leader carries on from it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from fovea.errors import InvalidArgument, ModelNotFound
from fovea.names import check_name, redis_key
from fovea.v1 import model_pb2, registry_pb2
from registry.catalog import DEFAULT_ALIAS, now_ts
from registry.config import RegistryConfig
from registry.events import REDIS_DOWN
from registry.placement import MAX_BYTES, Capacity, Decision, Need, by_worker, mb, plan

logger = logging.getLogger(__name__)

LEADER = redis_key("placement", "leader")
POOL = redis_key("placement", "pool")
ASSIGNED = redis_key("placement", "assigned")
MODELS = redis_key("models")
WORKERS = redis_key("workers")
MAX_POOL_LABELS = 16
MAX_IDLE_UNLOAD_S = 7 * 86400.0
# A model unassigned from a worker keeps serving there a while (the worker's unload_delay_s); its memory
# is not counted against the worker as a model held outside placement until this long has passed.
UNLOAD_GRACE_S = 120.0
LOADING_GRACE_S = 600.0
"""A model scaled to zero whose replica is still loading is not unloaded for idleness before this long
after its last use: a slow load (a big model, an engine build) must not be cut off by a short idle_unload_s
and then demanded again, over and over."""
S = registry_pb2  # short name for the enum values below
Loaded = dict[str, dict[str, list[registry_pb2.LoadedModel]]]  # worker -> model -> its loaded versions

# Take or renew the lease. KEYS: leader, pool, assigned. ARGV: id, ttl ms. Contend only while there is a pool.
ACQUIRE = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if cur then return 0 end
if redis.call('EXISTS', KEYS[2]) == 0 and redis.call('SCARD', KEYS[3]) == 0 then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# The fenced write. KEYS: leader, assigned index, n keys to set, then keys to delete.
# ARGV: id, n, n values, a count of ids to add to the index, those ids, then ids to remove from it.
FENCED_WRITE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local n = tonumber(ARGV[2])
for i = 1, n do redis.call('SET', KEYS[2 + i], ARGV[2 + i]) end
for i = n + 3, #KEYS do redis.call('DEL', KEYS[i]) end
local adds = tonumber(ARGV[n + 3])
for i = 1, adds do redis.call('SADD', KEYS[2], ARGV[n + 3 + i]) end
for i = n + 4 + adds, #ARGV do redis.call('SREM', KEYS[2], ARGV[i]) end
return 1
"""
# Keep the largest figure per field. KEYS: hashes (may repeat); ARGV: field, value pairs, one per key.
KEEP_MAX = """
for i = 1, #KEYS do
  local v = tonumber(ARGV[2 * i])
  local cur = tonumber(redis.call('HGET', KEYS[i], ARGV[2 * i - 1]) or '0')
  if v > cur then redis.call('HSET', KEYS[i], ARGV[2 * i - 1], ARGV[2 * i]) end
end
return 1
"""

# One field of each of n hashes, then the whole of n more. KEYS: the 2n hashes; ARGV: the field.
READ_HASHES = """
local n = #KEYS / 2
local out = {}
for i = 1, n do
  out[i] = redis.call('HGET', KEYS[i], ARGV[1])
  out[n + i] = redis.call('HGETALL', KEYS[n + i])
end
return out
"""


def assign_key(worker_id: str) -> str:
    return redis_key("placement", "assign", worker_id)


def _names(raw: bytes | None) -> list[str]:
    return [n for n in raw.decode().split(",") if n] if raw else []


def check_scale(scale: registry_pb2.ModelScale, max_replicas_limit: int) -> registry_pb2.ModelScale:
    """A copy of the scale, validated; max_replicas 0 (never valid) means its default, max(replicas, 1)."""
    check_name(scale.model)
    s = registry_pb2.ModelScale()
    s.CopyFrom(scale)
    if s.max_replicas == 0:
        s.max_replicas = max(s.replicas, 1)
    if not s.min_replicas <= s.replicas <= s.max_replicas:
        raise InvalidArgument(
            f"scale of {s.model!r}: need min_replicas <= replicas <= max_replicas, got "
            f"{s.min_replicas} <= {s.replicas} <= {s.max_replicas}"
        )
    if s.max_replicas > max_replicas_limit:
        raise InvalidArgument(
            f"scale of {s.model!r}: max_replicas {s.max_replicas} is over the registry's limit of "
            f"{max_replicas_limit} (max_replicas_limit)"
        )
    if len(s.pool) > MAX_POOL_LABELS:
        raise InvalidArgument(f"a model's pool has at most {MAX_POOL_LABELS} labels, not {len(s.pool)}")
    for k, v in s.pool.items():
        check_name(k, "pool label key")
        check_name(v, "pool label value")
    if not 0 <= s.idle_unload_s <= MAX_IDLE_UNLOAD_S:  # also refuses NaN
        raise InvalidArgument(
            f"idle_unload_s must be between 0 (the registry's default) and {MAX_IDLE_UNLOAD_S:.0f} (7 days)"
        )
    for what, value in (("memory_bytes", s.memory_bytes), ("device_memory_bytes", s.device_memory_bytes)):
        if value > MAX_BYTES:
            raise InvalidArgument(f"{what} {value} is over {MAX_BYTES} (1 PiB): a unit mix-up?")
    return s


@dataclass
class Load:
    """What the heartbeats of a model's ready replicas say about its calls."""

    ready: list[str] = field(default_factory=list)
    queue: int = 0
    min_idle_s: float = math.inf


@dataclass
class Window:
    """The leader's memory of one model's load over time (lost with leadership; it only delays a step)."""

    high_since: float | None = None
    last_step: float = 0.0
    nonzero_since: float = 0.0


@dataclass
class ModelView:
    """One model as a tick reads it."""

    name: str
    scale: registry_pb2.ModelScale
    previous: registry_pb2.ModelPlacement | None
    versions: list[model_pb2.ModelVersion]
    memory: dict[bytes, bytes]
    demand_at: float


class Placements:
    """The placement loop of one registry replica, and the reads and writes around it."""

    def __init__(self, redis: aioredis.Redis, config: RegistryConfig) -> None:
        # Any: redis-py types replies as bytes | str; with decode_responses off they are bytes.
        self.redis: Any = redis
        self.config = config
        self.id = f"registry-{secrets.token_hex(6)}"
        self.leading = False
        self._acquire = self.redis.register_script(ACQUIRE)
        self._release = self.redis.register_script(RELEASE)
        self._fenced = self.redis.register_script(FENCED_WRITE)
        self._keep_max = self.redis.register_script(KEEP_MAX)
        self._read_hashes = self.redis.register_script(READ_HASHES)
        self._windows: dict[str, Window] = {}
        self._unassigned_at: dict[tuple[str, str], float] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._keys: tuple[list[str], dict[str, list[str]]] | None = None
        self._decided: dict[str, registry_pb2.ModelPlacement] | None = None  # as last written, while leading
        self._kick = asyncio.Event()
        self._started = 0
        self._finished = 0
        self._done = asyncio.Condition()
        self.last_tick_s = 0.0

    # ---- desired state --------------------------------------------------

    def effective(self, name: str, stored: bytes | None) -> registry_pb2.ModelScale:
        """The model's scale with every default filled in."""
        if stored is None:
            r = self.config.default_replicas
            s = registry_pb2.ModelScale(model=name, replicas=r, min_replicas=r, max_replicas=max(r, 1))
        else:
            s = registry_pb2.ModelScale.FromString(stored)
        if not s.idle_unload_s:
            s.idle_unload_s = self.config.default_idle_unload_s
        return s

    async def set_scale(self, scale: registry_pb2.ModelScale) -> registry_pb2.ModelPlacement:
        s = check_scale(scale, self.config.max_replicas_limit)
        if not await self.redis.sismember(MODELS, s.model):
            raise ModelNotFound(f"unknown model {s.model!r}")
        await self.redis.set(redis_key("scale", s.model), s.SerializeToString())
        logger.info(
            "scale of %s: %d replicas (min %d, max %d)%s",
            s.model,
            s.replicas,
            s.min_replicas,
            s.max_replicas,
            f", pool {dict(sorted(s.pool.items()))}" if s.pool else "",
        )
        await self.tick_soon()
        return (await self.list_placements(s.model))[0][0]

    async def demand(self, model: str) -> registry_pb2.ModelPlacement:
        check_name(model)
        if not await self.redis.sismember(MODELS, model):
            raise ModelNotFound(f"unknown model {model!r}")
        ttl_ms = int(self.config.demand_ttl_s * 1000)
        await self.redis.set(redis_key("placement", "demand", model), repr(time.time()), px=ttl_ms)
        await self.tick_soon()
        return (await self.list_placements(model))[0][0]

    async def list_placements(self, model: str = "") -> tuple[list[registry_pb2.ModelPlacement], str]:
        """Each model's placement as last decided (or as it will start, before a leader decided), and the leader."""
        if model:
            check_name(model)
            if not await self.redis.sismember(MODELS, model):
                raise ModelNotFound(f"unknown model {model!r}")
            names = [model]
        else:
            names = sorted(n.decode() for n in await self.redis.smembers(MODELS))
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(LEADER)
            pipe.exists(POOL)
            pipe.mget([redis_key("placement", "model", n) for n in names] or [LEADER])
            pipe.mget([redis_key("scale", n) for n in names] or [LEADER])
            leader_raw, pool_alive, placed, scales = await pipe.execute()
        leader = leader_raw.decode() if leader_raw else ""
        out = []
        for name, raw, stored in zip(names, placed[: len(names)], scales[: len(names)], strict=True):
            scale = self.effective(name, stored)
            if raw is not None:
                p = registry_pb2.ModelPlacement.FromString(raw)
            else:
                p = self._unplaced(scale, leader, bool(pool_alive))
            p.scale.CopyFrom(scale)  # a scale set since the last decision shows at once
            out.append(p)
        return out, leader

    @staticmethod
    def _unplaced(scale: registry_pb2.ModelScale, leader: str, pool_alive: bool) -> registry_pb2.ModelPlacement:
        p = registry_pb2.ModelPlacement(target_replicas=scale.replicas, updated_at=now_ts())
        if not pool_alive:
            p.state = S.PLACEMENT_STATE_UNPLACEABLE
            p.reason = "no pool worker is alive (workers started without FOVEA_WORKER_MODELS join the pool)"
        elif scale.replicas == 0:
            p.state = S.PLACEMENT_STATE_IDLE
        else:
            p.state = S.PLACEMENT_STATE_LOADING
            p.reason = "waiting for the placement leader's next decision" if leader else "no placement leader yet"
        return p

    # ---- heartbeats -----------------------------------------------------

    async def on_heartbeat(self, status: registry_pb2.WorkerStatus, ttl_s: float) -> tuple[list[str], bool]:
        """Remember the memory the worker measured; a pool worker gets its assigned models (and whether they
        are known: False until a leader wrote its key)."""
        keys, args = [], []
        for m in status.models:
            for fld, value in ((str(m.version), m.memory_bytes), (f"{m.version}:device", m.device_memory_bytes)):
                if value:
                    keys.append(redis_key("placement", "memory", m.name))
                    args += [fld, str(value)]
        async with self.redis.pipeline(transaction=False) as pipe:
            if keys:
                await self._keep_max(keys=keys, args=args, client=pipe)
            if status.pooled:
                pipe.set(POOL, status.worker_id, px=int(ttl_s * 1000))
                pipe.get(assign_key(status.worker_id))
            replies = await pipe.execute()
        if not status.pooled:
            return [], False
        raw = replies[-1]
        return _names(raw), raw is not None

    # ---- the loop -------------------------------------------------------

    def start(self) -> None:
        if self.config.placement and self._task is None:
            self._task = asyncio.create_task(self._run(), name="placement")

    async def stop(self) -> None:
        """Stop the loop and give up leadership, so that another replica takes over at once."""
        task, self._task = self._task, None
        if task is not None:
            # The flag ends the loop even if a cancel is lost (Python 3.11's wait_for can swallow one).
            self._stopping = True
            self._kick.set()
            while not task.done():
                task.cancel()
                await asyncio.wait({task}, timeout=1.0)
        if self.leading:
            self._lose()
            try:
                await self._release(keys=[LEADER], args=[self.id])
                logger.info("placement: %s gave up leadership", self.id)
            except REDIS_DOWN:
                pass  # the lease runs out by itself

    def _lose(self) -> None:
        """Forget what only a leader may assume: that its own last writes are what Redis holds."""
        self.leading = False
        self._decided = None

    async def tick_soon(self, timeout_s: float = 5.0) -> None:
        """If this replica leads, run a tick now (one that starts after this call) and wait for it."""
        if self._task is None or not self.leading:
            return
        want = self._started + 1
        self._kick.set()
        async with self._done:
            try:
                await asyncio.wait_for(self._done.wait_for(lambda: self._finished >= want), timeout_s)
            except TimeoutError:
                pass

    async def _run(self) -> None:
        while not self._stopping:
            try:
                await asyncio.wait_for(self._kick.wait(), self.config.placement_interval_s)
            except TimeoutError:
                pass
            self._kick.clear()
            self._started += 1
            try:
                await self.step()
            except REDIS_DOWN as exc:
                logger.warning("placement: Redis unavailable (%s); retrying", exc)
                self._lose()
            except Exception:
                logger.exception("placement tick failed")
                self._decided = None
            finally:
                async with self._done:
                    self._finished = self._started
                    self._done.notify_all()

    async def step(self) -> bool:
        """Take or renew the lease, and if this replica leads, place. Returns whether it leads."""
        ttl_ms = int(self.config.leader_ttl_s * 1000)
        leads = bool(await self._acquire(keys=[LEADER, POOL, ASSIGNED], args=[self.id, ttl_ms]))
        if leads != self.leading:
            logger.info("placement: %s %s", self.id, "leads" if leads else "no longer leads")
            self.leading = leads
            self._windows.clear()
            self._decided = None
        if leads:
            t0 = time.perf_counter()
            await self.tick()
            self.last_tick_s = time.perf_counter() - t0
        return leads

    # ---- one tick -------------------------------------------------------

    async def _read(self) -> tuple[list[ModelView], dict[str, registry_pb2.WorkerStatus], dict[str, list[str]]]:
        """Models, live workers and current assignments, in a few pipelined round trips."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.smembers(MODELS)
            pipe.zrange(WORKERS, 0, -1)
            pipe.smembers(ASSIGNED)
            names_raw, worker_ids_raw, assigned_raw = await pipe.execute()
        names = sorted(n.decode() for n in names_raw)
        worker_ids = [w.decode() for w in worker_ids_raw]
        assigned_ids = sorted(w.decode() for w in assigned_raw)
        # Whole columns at once (MGET, and one script for the hashes): a command per model and key
        # costs far more in the client than the bytes do. The leader's own last decisions come from
        # memory while it leads (no one else writes them).
        decided = self._decided
        k = self._keys_of(names)
        async with self.redis.pipeline(transaction=False) as pipe:
            for col in (k["seq"], k["scale"], k["placement"] if decided is None else [], k["demand"]):
                pipe.mget(col or [LEADER])
            await self._read_hashes(keys=k["aliases"] + k["memory"], args=[DEFAULT_ALIAS], client=pipe)
            pipe.mget([redis_key("worker", w) for w in worker_ids] or [LEADER])
            pipe.mget([assign_key(w) for w in assigned_ids] or [LEADER])
            seqs, scales, prevs, demands, hash_replies, worker_raws, assign_raws = await pipe.execute()
        workers: dict[str, registry_pb2.WorkerStatus] = {}
        for raw in worker_raws if worker_ids else []:
            if raw is not None:
                st = registry_pb2.WorkerStatus.FromString(raw)
                workers[st.worker_id] = st
        current = {
            w: _names(raw)
            for w, raw in zip(assigned_ids, assign_raws if assigned_ids else [], strict=True)
            if raw is not None
        }
        # The versions each model serves: its production alias's, else its latest version that is not archived.
        wanted: list[tuple[str, int]] = []
        rows = []
        n = len(names)
        for i, name in enumerate(names):
            alias_raw, flat = hash_replies[i], hash_replies[n + i]
            if alias_raw is not None:
                versions = [t.version for t in model_pb2.Alias.FromString(alias_raw).targets]
            else:
                versions = [int(seqs[i])] if seqs[i] else []
            wanted += [(name, v) for v in versions]
            memory = dict(zip(flat[::2], flat[1::2], strict=True))
            prev = (decided or {}).get(name) if decided is not None else _placement_of(prevs[i])
            rows.append((name, versions, scales[i], prev, demands[i], memory))
        records = await self._versions(wanted)
        views = []
        for name, versions, scale_raw, prev, demand_raw, memory in rows:
            mvs = [records[(name, v)] for v in versions if (name, v) in records]
            if mvs and len(mvs) == 1 and mvs[0].state == model_pb2.VERSION_STATE_ARCHIVED:
                mvs = await self._latest_servable(name, mvs[0].version)
            views.append(
                ModelView(
                    name=name,
                    scale=self.effective(name, scale_raw),
                    previous=prev,
                    versions=[mv for mv in mvs if mv.state != model_pb2.VERSION_STATE_ARCHIVED],
                    memory=memory,
                    demand_at=float(demand_raw) if demand_raw else 0.0,
                )
            )
        return views, workers, current

    def _keys_of(self, names: list[str]) -> dict[str, list[str]]:
        """Each model's keys by column, built again only when the set of models changes."""
        if self._keys is None or self._keys[0] != names:
            columns = {
                "seq": [redis_key("model", n, "seq") for n in names],
                "scale": [redis_key("scale", n) for n in names],
                "placement": [redis_key("placement", "model", n) for n in names],
                "demand": [redis_key("placement", "demand", n) for n in names],
                "aliases": [redis_key("model", n, "aliases") for n in names],
                "memory": [redis_key("placement", "memory", n) for n in names],
            }
            self._keys = (names, columns)
        return self._keys[1]

    async def _versions(self, wanted: Sequence[tuple[str, int]]) -> dict[tuple[str, int], model_pb2.ModelVersion]:
        if not wanted:
            return {}
        raws = await self.redis.mget([redis_key("model", n, "v", v) for n, v in wanted])
        return {w: model_pb2.ModelVersion.FromString(r) for w, r in zip(wanted, raws, strict=True) if r is not None}

    async def _latest_servable(self, name: str, below: int) -> list[model_pb2.ModelVersion]:
        """The newest version under `below` that is not archived (rare: the latest was archived, no alias)."""
        found = await self._versions([(name, v) for v in range(below - 1, 0, -1)])
        for v in range(below - 1, 0, -1):
            mv = found.get((name, v))
            if mv is not None and mv.state != model_pb2.VERSION_STATE_ARCHIVED:
                return [mv]
        return []

    def memory_of(self, view: ModelView) -> tuple[int, int]:
        """Host and device memory of one replica, summed over the versions it loads. Per version: the larger of
        the scale's declared figure and what workers measured; with neither, an estimate from the artifact."""
        host = device = 0
        declared, declared_dev = view.scale.memory_bytes, view.scale.device_memory_bytes
        for mv in view.versions:
            estimate = int(mv.size_bytes * self.config.memory_estimate_factor)
            estimate += self.config.memory_estimate_overhead_bytes
            measured = int(view.memory.get(str(mv.version).encode(), 0))
            measured_dev = int(view.memory.get(f"{mv.version}:device".encode(), 0))
            host += max(declared, measured) or estimate
            device += max(declared_dev, measured_dev) or estimate
        return min(host, MAX_BYTES), min(device, MAX_BYTES)

    @staticmethod
    def loaded_index(live: Mapping[str, registry_pb2.WorkerStatus]) -> Loaded:
        """worker -> model -> its loaded versions, for the workers that are ready."""
        index: Loaded = {}
        for wid, st in live.items():
            if st.state == S.WORKER_STATE_READY:
                models = index.setdefault(wid, {})
                for m in st.models:
                    models.setdefault(m.name, []).append(m)
        return index

    @staticmethod
    def load_of(view: ModelView, workers: Sequence[str], loaded: Loaded) -> Load:
        """The model's ready replicas among `workers`, and their queues and idle time."""
        load = Load()
        wanted = {mv.version for mv in view.versions}
        for wid in workers:
            mine = loaded.get(wid, {}).get(view.name, [])
            if not wanted or not wanted <= {m.version for m in mine if m.ready}:
                continue
            load.ready.append(wid)
            load.queue += sum(m.queue_depth for m in mine)
            load.min_idle_s = min(load.min_idle_s, *(m.idle_s for m in mine if m.version in wanted))
        return load

    def target_of(self, view: ModelView, load: Load, now: float) -> tuple[int, float]:
        """This tick's target replicas and the model's last use (unix time)."""
        c, s = self.config, view.scale
        p = view.previous
        same_scale = p is not None and p.scale.SerializeToString(deterministic=True) == s.SerializeToString(
            deterministic=True
        )
        target = p.target_replicas if p is not None and same_scale else s.replicas
        target = min(max(target, s.min_replicas), s.max_replicas)
        w = self._windows.setdefault(view.name, Window(nonzero_since=now))
        last_used = max(view.demand_at, now - load.min_idle_s if load.ready else 0.0, w.nonzero_since)
        # Scale with load: add a replica when every wanted one is ready and their queues stay long.
        if load.ready and load.queue / len(load.ready) >= c.scale_up_queue_per_replica:
            w.high_since = now if w.high_since is None else w.high_since
            if now - w.high_since >= c.scale_up_after_s and len(load.ready) >= target and target < s.max_replicas:
                target += 1
                w.high_since, w.last_step = now, now
        else:
            w.high_since = None
        quiet = bool(load.ready) and load.queue == 0 and load.min_idle_s >= c.scale_down_after_s
        if quiet and target > max(s.min_replicas, 1) and now - w.last_step >= c.scale_down_after_s:
            target -= 1
            w.last_step = now
        # Scale to zero: unload after idle_unload_s without calls; a recent demand brings one replica back.
        if s.min_replicas == 0:
            idle_limit = s.idle_unload_s if load.ready else max(s.idle_unload_s, LOADING_GRACE_S)
            if target > 0 and load.queue == 0 and now - last_used >= idle_limit:
                target = 0
            elif target == 0 and view.demand_at and now - view.demand_at < s.idle_unload_s:
                target = 1
        if target > 0 and p is not None and p.target_replicas == 0:
            w.nonzero_since = now  # loaded on demand: idle time counts from here
        return target, last_used

    async def tick(self) -> bool:
        """One decision: read, compute targets, plan, and write what changed (fenced). False if deposed."""
        now = time.time()
        views, live, current = await self._read()
        pool = {w: st for w, st in live.items() if st.pooled and st.state == S.WORKER_STATE_READY}
        loaded = self.loaded_index(live)
        for key in [k for k, at in self._unassigned_at.items() if now - at > UNLOAD_GRACE_S]:
            del self._unassigned_at[key]
        needs, targets, loads = [], {}, {}
        current_by_model: dict[str, list[str]] = {}
        for wid, models in current.items():
            for m in models:
                current_by_model.setdefault(m, []).append(wid)
        for view in views:
            if not view.versions:
                continue  # nothing servable: it is placed nowhere
            load = self.load_of(view, current_by_model.get(view.name, []), loaded)
            target, last_used = self.target_of(view, load, now)
            host, device = self.memory_of(view)
            targets[view.name], loads[view.name] = target, (host, device)
            needs.append(
                Need(
                    model=view.name,
                    replicas=target,
                    memory_bytes=host,
                    device_memory_bytes=device,
                    pool=dict(view.scale.pool),
                    evictable=view.scale.min_replicas == 0,
                    last_used=last_used,
                )
            )
        capacities = [self._capacity(st, current.get(wid, [])) for wid, st in sorted(pool.items())]
        decision = plan(needs, capacities, current_by_model)
        assignments = by_worker(decision, capacities)
        placements = {}
        for view in views:
            placements[view.name] = self._placement(view, decision, targets, loads, loaded)
        return await self._write(assignments, current, placements, {v.name: v.previous for v in views}, decision, now)

    def _capacity(self, st: registry_pb2.WorkerStatus, assigned: Sequence[str]) -> Capacity:
        """A pool worker as the planner sees it; models it serves outside placement count against it."""
        reserved = sum(
            m.memory_bytes
            for m in st.models
            if m.name not in assigned and (m.name, st.worker_id) not in self._unassigned_at
        )
        return Capacity(
            worker_id=st.worker_id,
            labels=dict(st.labels),
            memory_bytes=st.memory_budget_bytes,
            device_memory_bytes=st.device_memory_budget_bytes,
            reserved_bytes=min(reserved, MAX_BYTES),
        )

    def _placement(
        self,
        view: ModelView,
        decision: Decision,
        targets: Mapping[str, int],
        loads: Mapping[str, tuple[int, int]],
        loaded: Loaded,
    ) -> registry_pb2.ModelPlacement:
        p = registry_pb2.ModelPlacement(scale=view.scale)
        if view.name not in targets:
            p.state = S.PLACEMENT_STATE_UNPLACEABLE
            p.reason = f"{view.name} has no version to serve (every version is archived)"
            return p
        target = targets[view.name]
        workers = decision.assignments.get(view.name, [])
        ready = self.load_of(view, workers, loaded).ready
        p.target_replicas = target
        p.worker_ids.extend(workers)
        p.ready_worker_ids.extend(sorted(ready))
        p.memory_bytes = loads[view.name][0]
        reason = decision.reasons.get(view.name, "")
        versions = "+".join(f"v{mv.version}" for mv in view.versions)
        if target == 0:
            p.state = S.PLACEMENT_STATE_IDLE
            p.reason = "scaled to zero and idle: it loads on its next call"
        elif view.name in decision.unplaceable:
            p.state = S.PLACEMENT_STATE_UNPLACEABLE
            p.reason = reason or f"no worker can hold {view.name} (needs {mb(p.memory_bytes)})"
        elif len(ready) >= target:
            p.state = S.PLACEMENT_STATE_READY
        elif len(workers) < target:
            p.state = S.PLACEMENT_STATE_PARTIAL
            p.reason = reason or f"{len(workers)} of {target} replicas placed"
        else:
            p.state = S.PLACEMENT_STATE_LOADING
            loading = [w for w in workers if w not in ready]
            p.reason = f"{view.name} {versions} is loading on {', '.join(loading)}"
        return p

    async def _write(
        self,
        assignments: Mapping[str, list[str]],
        current: Mapping[str, list[str]],
        placements: Mapping[str, registry_pb2.ModelPlacement],
        previous: Mapping[str, registry_pb2.ModelPlacement | None],
        decision: Decision,
        now: float,
    ) -> bool:
        """Write the assignments and placements that changed, fenced by the lease; False if it was lost."""
        sets: dict[str, bytes] = {}
        deletes: list[str] = []
        for wid, models in sorted(assignments.items()):
            if current.get(wid) != models or wid not in current:
                sets[assign_key(wid)] = ",".join(models).encode()
        gone = sorted(set(current) - set(assignments))
        deletes += [assign_key(w) for w in gone]
        decided: dict[str, registry_pb2.ModelPlacement] = {}
        for name, p in placements.items():
            prev = previous.get(name)
            if prev is None or _without_time(prev) != _without_time(p):
                p.updated_at.CopyFrom(now_ts())
                sets[redis_key("placement", "model", name)] = p.SerializeToString()
                decided[name] = p
            else:
                decided[name] = prev
        if not sets and not deletes:
            self._decided = decided
            return True
        adds = [w for w in assignments if w not in current]
        keys = [LEADER, ASSIGNED, *sets, *deletes]
        args: list[Any] = [self.id, len(sets), *sets.values(), len(adds), *adds, *gone]
        if not await self._fenced(keys=keys, args=args):
            logger.warning("placement: %s lost the lease before writing; its decision is dropped", self.id)
            self._lose()
            return False
        self._decided = decided
        self._log_changes(assignments, current, placements, decision, now)
        return True

    def _log_changes(
        self,
        assignments: Mapping[str, list[str]],
        current: Mapping[str, list[str]],
        placements: Mapping[str, registry_pb2.ModelPlacement],
        decision: Decision,
        now: float,
    ) -> None:
        evicted = set(decision.evicted)
        for wid in sorted(set(assignments) | set(current)):
            before, after = set(current.get(wid, [])), set(assignments.get(wid, []))
            for m in sorted(after - before):
                p = placements[m]
                n = list(p.worker_ids).index(wid) + 1 if wid in p.worker_ids else 0
                logger.info("placed %s on %s (replica %d of %d)", m, wid, n, p.target_replicas)
            for m in sorted(before - after):
                self._unassigned_at[(m, wid)] = now
                why = (
                    "worker left"
                    if wid not in assignments
                    else "evicted to make room"
                    if (m, wid) in evicted
                    else "scaled down"
                )
                logger.info("unassigned %s from %s (%s)", m, wid, why)


def _placement_of(raw: bytes | None) -> registry_pb2.ModelPlacement | None:
    return registry_pb2.ModelPlacement.FromString(raw) if raw else None


def _without_time(p: registry_pb2.ModelPlacement) -> bytes:
    c = registry_pb2.ModelPlacement()
    c.CopyFrom(p)
    c.ClearField("updated_at")
    return c.SerializeToString(deterministic=True)
