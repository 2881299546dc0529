"""The placement planner: which pool worker serves which model. Pure: no Redis, no I/O, no clock.

`plan(needs, workers, current)` takes each model's target this tick (`Need`), the live pool workers'
budgets (`Capacity`) and the current assignments (model -> worker ids), and returns new assignments
with a reason for every model that got fewer replicas than its target. The same input always gives
the same output: every tie is broken by worker id or model name.

The rules, in the order they are applied:

1. **Keep.** A model keeps the current workers that still exist and carry its pool's labels. With
   more of them than its target it keeps those on the workers with the most free memory (counted
   over the whole current assignment; ties by worker id), so a scale-down takes replicas off the
   fullest workers. Where a worker's kept models no longer fit its budget (the budget shrank, or a
   model's measured size grew), its models are kept in priority order while they fit: models that
   are not evictable first, then the most recently used, then by name; the rest are placed anew.
2. **Place.** Missing replicas are placed in rounds (every model's first replica, then every
   model's second, ...) so that one model's many replicas cannot crowd out another's only one.
   Within a round: models that are not evictable first, then the largest, then by name. A replica
   goes to the matching worker that does not serve the model yet, fits it, and has the most free
   host memory (ties by worker id): that spreads load, and largest-first packs well.
3. **Evict.** When a replica fits no matching worker, evictable models (scaled to zero) on one
   matching worker may be unassigned to make room, least recently used first, and only if that frees
   enough on that worker. A model that is not evictable may evict any evictable one; an evictable
   one only those used strictly less recently than itself. Among workers where eviction works, the
   one whose most recently used victim is oldest wins (then fewer victims, then worker id).
4. **Repeat** while a pass evicted (which frees memory a failed model might use, and leaves the
   victim to be placed again). Each change puts a replica of a higher-priority model
   in place of lower-priority ones only, so this ends; and it makes the planner idempotent:
   `plan(needs, workers, plan(needs, workers, current).assignments)` returns the same assignments.

Budgets: a worker's models' `memory_bytes` plus its `reserved_bytes` never exceed its `memory_bytes`;
device memory is checked the same way on workers with a device budget (`device_memory_bytes > 0`).

`Decision.evicted` lists only replicas that were in `current` and lost their worker to a model of
higher priority; `Decision.unplaceable` holds every model that got no replica while wanting some,
whatever the reason (too big, no worker carries its labels, every worker full), and its reason says
which. Sizes in reasons are in MB (10^6 bytes), as `mb()` writes them.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

# Bounds on the input: anything beyond them is a caller's bug (a unit mix-up, a negative count),
# so plan() raises ValueError instead of planning with it.
MAX_MODELS = 100_000
MAX_WORKERS = 10_000
MAX_REPLICAS = 10_000
MAX_BYTES = 1 << 50  # 1 PiB: larger than any machine's memory
MAX_LABELS = 64


@dataclass(frozen=True)
class Need:
    model: str
    replicas: int  # target replicas this tick (>= 0)
    memory_bytes: int  # host memory one replica costs
    device_memory_bytes: int = 0  # device memory one replica costs (checked only on workers with a device budget)
    pool: Mapping[str, str] = field(default_factory=dict)  # labels a worker must carry, all of them
    evictable: bool = False  # scaled to zero (min_replicas == 0): may be unloaded to make room
    last_used: float = 0.0  # unix time of its last call or demand; the least recent evictable model goes first


@dataclass(frozen=True)
class Capacity:
    worker_id: str
    labels: Mapping[str, str]
    memory_bytes: int  # budget for models
    device_memory_bytes: int = 0  # 0: no device budget (a CPU worker)
    reserved_bytes: int = 0  # host memory of models it serves outside placement (a fixed list)


@dataclass
class Decision:
    assignments: dict[str, list[str]]  # every model in needs -> its worker ids, sorted
    reasons: dict[str, str]  # model -> why fewer than its target are assigned; absent when all are
    # models that got no replica while wanting some: too big, no worker in the pool, or every one full
    unplaceable: set[str]
    evicted: list[tuple[str, str]]  # (model, worker_id) unassigned to make room for another model


def mb(n: int) -> str:
    """Bytes as an operator reads them: '310 MB', '0.5 MB'."""
    value = n / 1e6
    if value >= 10 or value == 0:
        return f"{round(value)} MB"
    return f"{value:.1f} MB"


def pool_text(pool: Mapping[str, str]) -> str:
    return ",".join(f"{k}={pool[k]}" for k in sorted(pool))


def plan(needs: Sequence[Need], workers: Sequence[Capacity], current: Mapping[str, Sequence[str]]) -> Decision:
    _check(needs, workers, current)
    return _Planner(needs, workers).run(current)


def by_worker(decision: Decision, workers: Sequence[Capacity]) -> dict[str, list[str]]:
    """worker_id -> its model names, sorted; every worker given appears, possibly with [].

    Assignments to a worker not given are left out: plan() never makes them."""
    out: dict[str, list[str]] = {w.worker_id: [] for w in workers}
    for model, ids in decision.assignments.items():
        for wid in ids:
            if wid in out:
                out[wid].append(model)
    for models in out.values():
        models.sort()
    return out


# --- input checks -----------------------------------------------------------------------------


def _bad_int(value: object, high: int) -> bool:
    return not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= high


def _int_error(owner: str, fields: dict[str, tuple[object, int]]) -> ValueError:
    for name, (value, high) in fields.items():
        if _bad_int(value, high):
            return ValueError(f"{owner}: {name} must be an int in [0, {high}], got {value!r}")
    raise AssertionError("no bad field")


def _check_labels(what: str, labels: object) -> None:
    if not isinstance(labels, Mapping) or len(labels) > MAX_LABELS:
        raise ValueError(f"{what} must be a mapping of at most {MAX_LABELS} labels, got {labels!r}")
    for k, v in labels.items():
        if not isinstance(k, str) or not isinstance(v, str) or not k:
            raise ValueError(f"{what} must map non-empty str keys to str values, got {k!r}={v!r}")


def _check(needs: Sequence[Need], workers: Sequence[Capacity], current: Mapping[str, Sequence[str]]) -> None:
    # messages are built only on failure: this runs for every model on every tick
    if len(needs) > MAX_MODELS:
        raise ValueError(f"{len(needs)} models; at most {MAX_MODELS}")
    if len(workers) > MAX_WORKERS:
        raise ValueError(f"{len(workers)} workers; at most {MAX_WORKERS}")
    names: set[str] = set()
    for n in needs:
        if not isinstance(n.model, str) or not n.model:
            raise ValueError(f"a model name must be a non-empty str, got {n.model!r}")
        if n.model in names:
            raise ValueError(f"model {n.model} is listed twice")
        names.add(n.model)
        if (
            _bad_int(n.replicas, MAX_REPLICAS)
            or _bad_int(n.memory_bytes, MAX_BYTES)
            or _bad_int(n.device_memory_bytes, MAX_BYTES)
        ):
            raise _int_error(
                n.model,
                {
                    "replicas": (n.replicas, MAX_REPLICAS),
                    "memory_bytes": (n.memory_bytes, MAX_BYTES),
                    "device_memory_bytes": (n.device_memory_bytes, MAX_BYTES),
                },
            )
        if n.pool or not isinstance(n.pool, Mapping):
            _check_labels(f"{n.model}: pool", n.pool)
        if not isinstance(n.last_used, int | float) or not 0 <= n.last_used < math.inf:  # also refuses NaN
            raise ValueError(f"{n.model}: last_used must be a finite unix time >= 0, got {n.last_used!r}")
    ids: set[str] = set()
    for w in workers:
        if not isinstance(w.worker_id, str) or not w.worker_id:
            raise ValueError(f"a worker id must be a non-empty str, got {w.worker_id!r}")
        if w.worker_id in ids:
            raise ValueError(f"worker {w.worker_id} is listed twice")
        ids.add(w.worker_id)
        if (
            _bad_int(w.memory_bytes, MAX_BYTES)
            or _bad_int(w.device_memory_bytes, MAX_BYTES)
            or _bad_int(w.reserved_bytes, MAX_BYTES)
        ):
            raise _int_error(
                w.worker_id,
                {
                    "memory_bytes": (w.memory_bytes, MAX_BYTES),
                    "device_memory_bytes": (w.device_memory_bytes, MAX_BYTES),
                    "reserved_bytes": (w.reserved_bytes, MAX_BYTES),
                },
            )
        _check_labels(f"{w.worker_id}: labels", w.labels)
    for model, assigned in current.items():
        # a bare string would be read as a list of one-letter worker ids
        if isinstance(assigned, str | bytes):
            raise ValueError(f"current[{model!r}] must be a sequence of worker ids, not {type(assigned).__name__}")


# --- the planner --------------------------------------------------------------------------------


def _priority(n: Need) -> tuple[bool, float, str]:
    """Lower sorts first and is kept first: not evictable, then the most recently used, then by name."""
    return (n.evictable, -n.last_used, n.model)


def _may_evict(n: Need, victim: Need) -> bool:
    if not victim.evictable:
        return False
    return not n.evictable or victim.last_used < n.last_used


Pool = tuple[tuple[str, str], ...]


class _Planner:
    def __init__(self, needs: Sequence[Need], workers: Sequence[Capacity]) -> None:
        self.needs = {n.model: n for n in needs}
        self.caps = {w.worker_id: w for w in workers}
        self.ids = sorted(self.caps)
        # free host and device memory per worker; a worker without a device budget never runs short
        self.free = {w.worker_id: w.memory_bytes - w.reserved_bytes for w in workers}
        self.free_dev = {w.worker_id: w.device_memory_bytes if w.device_memory_bytes else math.inf for w in workers}
        # the evictable models each worker serves, and what they hold: a worker whose free memory plus
        # all of that cannot fit a replica is skipped without looking at its models
        self.evictable: dict[str, set[str]] = {wid: set() for wid in self.ids}
        self.evictable_bytes = dict.fromkeys(self.ids, 0)
        self.evictable_dev = dict.fromkeys(self.ids, 0)
        self.placed: dict[str, set[str]] = {m: set() for m in self.needs}
        self.evicted: list[tuple[str, str]] = []
        # the matching workers of each distinct pool (there are few), sorted by id
        self.pool: dict[str, Pool] = {m: tuple(sorted(n.pool.items())) for m, n in self.needs.items()}
        self.members: dict[Pool, list[str]] = {}
        self.worker_pools: dict[str, list[Pool]] = {wid: [] for wid in self.ids}
        for key in sorted(set(self.pool.values())):
            self.members[key] = [wid for wid in self.ids if all(self.caps[wid].labels.get(k) == v for k, v in key)]
            for wid in self.members[key]:
                self.worker_pools[wid].append(key)
        self.member_sets = {key: frozenset(ids) for key, ids in self.members.items()}
        # per pool, a max-heap of (free host memory, worker id), built after the keep phase; an entry
        # is current while its stamp is the worker's, stale ones are dropped as they surface
        self.heaps: dict[Pool, list[tuple[int, str, int]]] = {}
        # and one of free plus evictable memory, to give up on eviction at once where no worker has enough
        self.reclaim: dict[Pool, list[tuple[int, str, int]]] = {}
        self.stamp = dict.fromkeys(self.ids, 0)
        self._room: dict[Pool, int] = {}
        self._freest: dict[Pool, list[str]] = {}

    def matching(self, n: Need) -> list[str]:
        """Worker ids carrying all of the model's pool labels, sorted."""
        return self.members[self.pool[n.model]]

    def build_heaps(self) -> None:
        for key, ids in self.members.items():
            heap = [(-self.free[wid], wid, self.stamp[wid]) for wid in ids]
            heapq.heapify(heap)
            self.heaps[key] = heap
            heap = [(-self.free[wid] - self.evictable_bytes[wid], wid, self.stamp[wid]) for wid in ids]
            heapq.heapify(heap)
            self.reclaim[key] = heap

    def changed(self, wid: str) -> None:
        self.stamp[wid] += 1
        if self.heaps:
            stamp = self.stamp[wid]
            entry = (-self.free[wid], wid, stamp)
            reclaim = (-self.free[wid] - self.evictable_bytes[wid], wid, stamp)
            for key in self.worker_pools[wid]:
                heapq.heappush(self.heaps[key], entry)
                heapq.heappush(self.reclaim[key], reclaim)

    def most_reclaimable(self, key: Pool) -> int:
        """The most host memory one worker of the pool would have if all its evictable models left."""
        heap = self.reclaim[key]
        while heap and heap[0][2] != self.stamp[heap[0][1]]:
            heapq.heappop(heap)
        return -heap[0][0] if heap else -1

    def add(self, n: Need, wid: str) -> None:
        self.placed[n.model].add(wid)
        if n.evictable:
            self.evictable[wid].add(n.model)
            self.evictable_bytes[wid] += n.memory_bytes
            self.evictable_dev[wid] += n.device_memory_bytes
        self.free[wid] -= n.memory_bytes
        self.free_dev[wid] -= n.device_memory_bytes
        self.changed(wid)

    def remove(self, n: Need, wid: str) -> None:
        self.placed[n.model].discard(wid)
        if n.evictable:
            self.evictable[wid].discard(n.model)
            self.evictable_bytes[wid] -= n.memory_bytes
            self.evictable_dev[wid] -= n.device_memory_bytes
        self.free[wid] += n.memory_bytes
        self.free_dev[wid] += n.device_memory_bytes
        self.changed(wid)

    def fits(self, n: Need, wid: str) -> bool:
        return self.free[wid] >= n.memory_bytes and self.free_dev[wid] >= n.device_memory_bytes

    # rule 1: keep
    def keep(self, current: Mapping[str, Sequence[str]]) -> None:
        valid: dict[str, list[str]] = {}
        load = dict(self.free)
        for model, n in self.needs.items():
            match = self.member_sets[self.pool[model]]
            ids = sorted({wid for wid in current.get(model, ()) if wid in match})
            valid[model] = ids
            for wid in ids:
                load[wid] -= n.memory_bytes
        per_worker: dict[str, list[Need]] = {wid: [] for wid in self.ids}
        for model, ids in valid.items():
            n = self.needs[model]
            if len(ids) > n.replicas:
                # scale-down: keep the replicas on the workers with the most free memory
                ids.sort(key=lambda wid: (-load[wid], wid))
                del ids[n.replicas :]
            for wid in ids:
                per_worker[wid].append(n)
        for wid, models in per_worker.items():
            host = sum(n.memory_bytes for n in models)
            dev = sum(n.device_memory_bytes for n in models)
            if host > self.free[wid] or dev > self.free_dev[wid]:
                models.sort(key=_priority)  # over budget: keep in priority order while they fit
            for n in models:
                if self.fits(n, wid):
                    self.add(n, wid)

    # rules 2 and 3: place, evicting when nothing fits
    def best_fit(self, n: Need) -> str | None:
        """The matching worker with the most free host memory (then the lowest id) that fits one more
        replica and does not serve the model yet; None when there is none."""
        heap = self.heaps[self.pool[n.model]]
        placed = self.placed[n.model]
        aside: list[tuple[int, str, int]] = []
        best: str | None = None
        while heap:
            negfree, wid, stamp = heap[0]
            if stamp != self.stamp[wid]:
                heapq.heappop(heap)
            elif -negfree < n.memory_bytes:
                break  # the freest worker is too full: all are
            elif wid in placed or self.free_dev[wid] < n.device_memory_bytes:
                aside.append(heapq.heappop(heap))
            else:
                best = wid
                break
        for entry in aside:
            heapq.heappush(heap, entry)
        return best

    def best_eviction(self, n: Need) -> tuple[str, list[Need]] | None:
        if self.most_reclaimable(self.pool[n.model]) < n.memory_bytes:
            return None
        best: tuple[tuple[float, int, str], str, list[Need]] | None = None
        placed = self.placed[n.model]
        for wid in self.matching(n):
            if wid in placed:
                continue
            if (
                self.free[wid] + self.evictable_bytes[wid] < n.memory_bytes
                or self.free_dev[wid] + self.evictable_dev[wid] < n.device_memory_bytes
            ):
                continue
            candidates = sorted(
                (v for v in (self.needs[m] for m in self.evictable[wid]) if _may_evict(n, v)),
                key=lambda v: (v.last_used, v.model),
            )
            free, free_dev = self.free[wid], self.free_dev[wid]
            victims: list[Need] = []
            for v in candidates:
                if free >= n.memory_bytes and free_dev >= n.device_memory_bytes:
                    break
                victims.append(v)
                free += v.memory_bytes
                free_dev += v.device_memory_bytes
            if not victims or free < n.memory_bytes or free_dev < n.device_memory_bytes:
                continue
            rank = (victims[-1].last_used, len(victims), wid)
            if best is None or rank < best[0]:
                best = (rank, wid, victims)
        return None if best is None else (best[1], best[2])

    def place_one(self, n: Need) -> str:
        """'placed', 'evicted' (placed by evicting), or 'failed'."""
        wid = self.best_fit(n)
        if wid is not None:
            self.add(n, wid)
            return "placed"
        found = self.best_eviction(n)
        if found is None:
            return "failed"
        wid, victims = found
        for v in victims:
            self.remove(v, wid)
            self.evicted.append((v.model, wid))
        self.add(n, wid)
        return "evicted"

    def place_pass(self) -> bool:
        """One pass over the models short of their target; True when another pass could place more."""
        order = sorted(
            (n for n in self.needs.values() if len(self.placed[n.model]) < n.replicas),
            key=lambda n: (n.evictable, -n.memory_bytes, -n.device_memory_bytes, n.model),
        )
        again = False
        blocked: set[str] = set()
        rounds = min(max((n.replicas for n in order), default=0), len(self.ids))
        for k in range(1, rounds + 1):
            for n in order:
                if n.model in blocked or len(self.placed[n.model]) >= min(k, n.replicas):
                    continue
                outcome = self.place_one(n)
                if outcome == "failed":
                    blocked.add(n.model)
                elif outcome == "evicted":
                    # an eviction frees memory and leaves its victim short: a model that failed this
                    # pass may fit in the next. Nothing else can help one: placements only shrink a
                    # worker's free memory, and an evictable model placed after a failure takes at
                    # least as much as it would give back if the failed model evicted it.
                    again = True
        return again

    def run(self, current: Mapping[str, Sequence[str]]) -> Decision:
        self.keep(current)
        self.build_heaps()
        original = {(m, wid) for m, ids in self.placed.items() for wid in ids}
        # each change raises the placed replicas' priority (see the module's docstring), so this ends;
        # the bound only guards against a bug turning into a hang
        for _ in range(2 + sum(min(n.replicas, len(self.ids)) for n in self.needs.values())):
            if not self.place_pass():
                break
        else:
            raise AssertionError("placement did not settle")
        # report an eviction only of a replica that was assigned before, and is not assigned again
        evicted = sorted({(m, w) for m, w in self.evicted if (m, w) in original and w not in self.placed[m]})
        reasons: dict[str, str] = {}
        unplaceable: set[str] = set()
        for model, n in self.needs.items():
            if len(self.placed[model]) < n.replicas:
                reasons[model] = self.reason(n)
                if not self.placed[model]:
                    unplaceable.add(model)
        return Decision(
            assignments={m: sorted(ids) for m, ids in self.placed.items()},
            reasons=reasons,
            unplaceable=unplaceable,
            evicted=evicted,
        )

    # rule 7: reasons an operator can act on
    def largest_room(self, key: Pool) -> int:
        """The most host memory any worker of the pool offers models when empty (cached: it never changes)."""
        found = self._room.get(key)
        if found is None:
            found = self._room[key] = max(
                self.caps[w].memory_bytes - self.caps[w].reserved_bytes for w in self.members[key]
            )
        return found

    def freest(self, key: Pool) -> list[str]:
        """The pool's workers by free host memory, most first (cached: reasons are written after the last change)."""
        found = self._freest.get(key)
        if found is None:
            found = self._freest[key] = sorted(self.members[key], key=lambda w: (-self.free[w], w))
        return found

    def reason(self, n: Need) -> str:
        key = self.pool[n.model]
        match = self.members[key]
        where = f"in pool {pool_text(n.pool)}" if n.pool else "in the pool"
        if not match:
            if n.pool:
                return f"no live worker carries the labels {pool_text(n.pool)}"
            return "no pool worker is alive (workers started without FOVEA_WORKER_MODELS join the pool)"
        # too big for every matching worker even when it is empty
        largest = self.largest_room(key)
        if largest < n.memory_bytes:
            if largest <= 0:
                return f"no worker {where} has room for models: what they serve outside placement fills their budgets"
            return f"needs {mb(n.memory_bytes)} per replica; the largest worker {where} has {mb(largest)}"
        if n.device_memory_bytes:
            sized = [w for w in match if self.caps[w].memory_bytes - self.caps[w].reserved_bytes >= n.memory_bytes]
            if all(0 < self.caps[w].device_memory_bytes < n.device_memory_bytes for w in sized):
                largest = max(self.caps[w].device_memory_bytes for w in sized)
                return (
                    f"needs {mb(n.device_memory_bytes)} of device memory per replica; "
                    f"the largest device budget {where} is {mb(largest)}"
                )
        placed = self.placed[n.model]
        head = f"{len(placed)} of {n.replicas} replicas placed"
        one = len(match) == 1
        workers = f"{len(match)} live worker{'' if one else 's'}"
        if n.pool:
            few = f"only {workers} carr{'ies' if one else 'y'} the labels {pool_text(n.pool)}"
        else:
            few = f"only {workers} {'is' if one else 'are'} in the pool"
        if len(placed) >= len(match):
            return f"{head}: {few}, and replicas need different workers"
        most = next(self.free[w] for w in self.freest(key) if w not in placed)
        needs = mb(n.memory_bytes)
        free = f"the largest free is {mb(max(0, most))}"
        if n.device_memory_bytes:
            devs = [self.free_dev[w] for w in match if w not in placed and self.free_dev[w] != math.inf]
            if devs:
                needs += f" and {mb(n.device_memory_bytes)} of device memory"
                free += f" and {mb(int(max(devs)))} of device memory"
        full = f"{head}: every worker {where} is full (needs {needs}; {free})"
        return f"{full}; {few}" if n.replicas > len(match) else full
