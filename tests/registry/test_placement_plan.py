"""The pure placement planner (registry/placement.py): a table of cases per rule, then invariants over
random clusters (hypothesis). No Redis: plan() is a function of its input."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from registry.placement import MAX_BYTES, Capacity, Decision, Need, by_worker, mb, plan

MB = 10**6


def cpu(wid: str, mem_mb: int, reserved_mb: int = 0, **labels: str) -> Capacity:
    return Capacity(wid, {"device": "cpu", **labels}, mem_mb * MB, reserved_bytes=reserved_mb * MB)


def gpu(wid: str, mem_mb: int, dev_mb: int, **labels: str) -> Capacity:
    return Capacity(wid, {"device": "gpu", **labels}, mem_mb * MB, device_memory_bytes=dev_mb * MB)


def need(model: str, replicas: int, mem_mb: float, **kw: object) -> Need:
    return Need(model, replicas, int(mem_mb * MB), **kw)  # type: ignore[arg-type]


# --- rule 1: only live, matching workers ---------------------------------------------------------


def test_assignments_to_workers_that_left_are_dropped_and_placed_again() -> None:
    d = plan([need("a", 1, 100)], [cpu("w1", 1000), cpu("w2", 1000)], {"a": ["gone"]})
    assert d.assignments == {"a": ["w1"]} and not d.reasons and not d.evicted


def test_assignment_on_a_worker_whose_labels_no_longer_match_is_dropped() -> None:
    workers = [cpu("w1", 1000, zone="b"), cpu("w2", 1000, zone="a")]
    d = plan([need("a", 1, 100, pool={"zone": "a"})], workers, {"a": ["w1"]})
    assert d.assignments == {"a": ["w2"]}


def test_models_not_in_needs_are_left_out() -> None:
    d = plan([need("a", 1, 100)], [cpu("w1", 1000)], {"deleted": ["w1"], "a": ["w1"]})
    assert d.assignments == {"a": ["w1"]}
    assert by_worker(d, [cpu("w1", 1000)]) == {"w1": ["a"]}


# --- rule 2: stability -----------------------------------------------------------------------------


def test_a_model_keeps_its_workers_even_where_another_has_more_free() -> None:
    workers = [cpu("w1", 1000), cpu("w2", 1000), cpu("w3", 4000)]
    current = {"a": ["w1"], "b": ["w1"]}
    d = plan([need("a", 1, 400), need("b", 1, 400)], workers, current)
    assert d.assignments == {"a": ["w1"], "b": ["w1"]}


def test_scaling_up_adds_replicas_and_keeps_the_old_ones() -> None:
    workers = [cpu("w1", 1000), cpu("w2", 2000), cpu("w3", 3000)]
    d = plan([need("a", 2, 100)], workers, {"a": ["w1"]})
    assert d.assignments == {"a": ["w1", "w3"]}


def test_scaling_down_keeps_replicas_on_the_workers_with_the_most_free_memory() -> None:
    workers = [cpu("w1", 1000), cpu("w2", 1000), cpu("w3", 1000)]
    current = {"a": ["w1", "w2", "w3"], "b": ["w1"], "c": ["w2"]}
    needs = [need("a", 1, 100), need("b", 1, 500), need("c", 1, 200)]
    assert plan(needs, workers, current).assignments == {"a": ["w3"], "b": ["w1"], "c": ["w2"]}
    # ties by worker id
    assert plan([need("a", 2, 100)], workers, {"a": ["w3", "w2", "w1"]}).assignments == {"a": ["w1", "w2"]}


def test_over_budget_worker_keeps_models_in_priority_order_and_replaces_the_rest() -> None:
    # w1's budget shrank to 500 MB: it keeps the model that is not evictable, then the most recent
    workers = [cpu("w1", 500), cpu("w2", 1000)]
    needs = [
        need("old", 1, 200, evictable=True, last_used=10.0),
        need("fixed", 1, 200),
        need("new", 1, 200, evictable=True, last_used=20.0),
    ]
    d = plan(needs, workers, {"old": ["w1"], "fixed": ["w1"], "new": ["w1"]})
    assert d.assignments == {"fixed": ["w1"], "new": ["w1"], "old": ["w2"]}
    assert not d.evicted


def test_target_zero_unassigns_without_a_reason() -> None:
    d = plan([need("a", 0, 100, evictable=True)], [cpu("w1", 1000)], {"a": ["w1"]})
    assert d.assignments == {"a": []} and not d.reasons and not d.unplaceable


# --- rule 3: replicas on different workers --------------------------------------------------------


def test_replicas_of_one_model_go_to_different_workers() -> None:
    d = plan([need("a", 3, 100)], [cpu("w1", 10_000), cpu("w2", 1000), cpu("w3", 1000)], {})
    assert d.assignments == {"a": ["w1", "w2", "w3"]}


def test_never_more_replicas_than_matching_workers() -> None:
    workers = [cpu("w1", 1000, zone="a"), cpu("w2", 1000, zone="a"), cpu("w3", 1000, zone="b")]
    d = plan([need("a", 3, 100, pool={"zone": "a"})], workers, {"a": ["w1", "w1"]})
    assert d.assignments == {"a": ["w1", "w2"]}
    assert d.reasons == {
        "a": "2 of 3 replicas placed: only 2 live workers carry the labels zone=a, and replicas need different workers"
    }
    assert not d.unplaceable
    d = plan([need("a", 2, 100)], [cpu("w1", 1000)], {})
    assert d.reasons == {
        "a": "1 of 2 replicas placed: only 1 live worker is in the pool, and replicas need different workers"
    }


# --- rule 4: budgets -------------------------------------------------------------------------------


def test_host_budget_counts_reserved_memory() -> None:
    # w1 has 1000 MB but serves 700 MB of fixed models outside placement
    d = plan([need("a", 1, 400)], [cpu("w1", 1000, reserved_mb=700), cpu("w2", 500)], {})
    assert d.assignments == {"a": ["w2"]}
    d = plan([need("a", 1, 400)], [cpu("w1", 1000, reserved_mb=700)], {"a": ["w1"]})
    assert d.assignments == {"a": []} and d.unplaceable == {"a"}


def test_device_budget_is_checked_only_on_workers_that_have_one() -> None:
    big = Need("a", 2, 100 * MB, device_memory_bytes=3000 * MB)
    d = plan([big], [gpu("g1", 8000, 2000), cpu("c1", 1000)], {})
    assert d.assignments == {"a": ["c1"]}
    assert d.reasons["a"].startswith("1 of 2 replicas placed: every worker in the pool is full")
    d = plan([big, Need("b", 1, 100 * MB, device_memory_bytes=2000 * MB)], [gpu("g1", 8000, 4000)], {})
    assert d.assignments == {"a": ["g1"], "b": []}
    assert d.reasons["b"] == (
        "0 of 1 replicas placed: every worker in the pool is full "
        "(needs 100 MB and 2000 MB of device memory; the largest free is 7900 MB and 1000 MB of device memory)"
    )


def test_a_worker_fills_exactly_to_its_budget() -> None:
    d = plan([need("a", 1, 600), need("b", 1, 400), need("c", 1, 1)], [cpu("w1", 1000)], {})
    assert d.assignments == {"a": ["w1"], "b": ["w1"], "c": []}


# --- rule 5: where new replicas go ----------------------------------------------------------------


def test_new_replica_goes_to_the_matching_worker_with_the_most_free_memory() -> None:
    workers = [cpu("w1", 1000), cpu("w2", 3000), cpu("w3", 2000)]
    assert plan([need("a", 1, 100)], workers, {}).assignments == {"a": ["w2"]}
    # ties by worker id
    assert plan([need("a", 1, 100)], [cpu("w2", 1000), cpu("w1", 1000)], {}).assignments == {"a": ["w1"]}


def test_largest_model_is_placed_first() -> None:
    # b first would take w1 and leave a on w2; largest first puts a on the emptiest worker
    d = plan([need("b", 1, 40), need("a", 1, 60)], [cpu("w1", 100), cpu("w2", 70)], {})
    assert d.assignments == {"a": ["w1"], "b": ["w2"]}


def test_every_model_gets_its_first_replica_before_any_gets_a_second() -> None:
    d = plan([need("big", 2, 500), need("small", 1, 400)], [cpu("w1", 1000), cpu("w2", 800)], {})
    assert d.assignments == {"big": ["w1"], "small": ["w2"]}
    assert d.reasons["big"] == (
        "1 of 2 replicas placed: every worker in the pool is full (needs 500 MB; the largest free is 400 MB)"
    )


def test_the_same_input_in_any_order_gives_the_same_decision() -> None:
    rng = random.Random(7)
    needs = [need(f"m{i}", rng.randint(0, 3), rng.randint(1, 400), evictable=i % 3 == 0) for i in range(40)]
    workers = [cpu(f"w{i}", rng.randint(200, 2000), zone="abc"[i % 3]) for i in range(12)]
    first = plan(needs, workers, {})
    for _ in range(5):
        rng.shuffle(needs)
        rng.shuffle(workers)
        again = plan(needs, workers, {})
        assert again.assignments == first.assignments and again.reasons == first.reasons


# --- rule 6: eviction -----------------------------------------------------------------------------


def test_a_model_evicts_the_least_recently_used_evictable_model() -> None:
    needs = [
        need("fresh", 1, 300, evictable=True, last_used=20.0),
        need("stale", 1, 300, evictable=True, last_used=10.0),
        need("core", 1, 300),
    ]
    d = plan(needs, [cpu("w1", 700)], {"fresh": ["w1"], "stale": ["w1"]})
    assert d.assignments == {"core": ["w1"], "fresh": ["w1"], "stale": []}
    assert d.evicted == [("stale", "w1")]
    assert d.reasons == {
        "stale": "0 of 1 replicas placed: every worker in the pool is full (needs 300 MB; the largest free is 100 MB)"
    }


def test_eviction_only_when_it_frees_enough_on_one_worker() -> None:
    # 150 MB free across the workers, but no single worker can make 400 MB
    needs = [need("e1", 1, 200, evictable=True, last_used=1.0), need("e2", 1, 200, evictable=True), need("a", 1, 400)]
    workers = [cpu("w1", 300), cpu("w2", 300)]
    d = plan(needs, workers, {"e1": ["w1"], "e2": ["w2"]})
    assert d.assignments == {"a": [], "e1": ["w1"], "e2": ["w2"]} and not d.evicted
    assert d.unplaceable == {"a"}


def test_several_victims_on_one_worker_least_recent_first() -> None:
    needs = [
        need("e1", 1, 200, evictable=True, last_used=1.0),
        need("e2", 1, 200, evictable=True, last_used=2.0),
        need("e3", 1, 200, evictable=True, last_used=3.0),
        need("a", 1, 450),
    ]
    d = plan(needs, [cpu("w1", 650)], {"e1": ["w1"], "e2": ["w1"], "e3": ["w1"]})
    assert d.assignments == {"a": ["w1"], "e1": [], "e2": [], "e3": ["w1"]}
    assert d.evicted == [("e1", "w1"), ("e2", "w1")]


def test_eviction_picks_the_worker_whose_victims_are_least_recently_used() -> None:
    needs = [
        need("e1", 1, 300, evictable=True, last_used=5.0),
        need("e2", 1, 300, evictable=True, last_used=3.0),
        need("a", 1, 300),
    ]
    d = plan(needs, [cpu("w1", 300), cpu("w2", 300)], {"e1": ["w1"], "e2": ["w2"]})
    assert d.assignments == {"a": ["w2"], "e1": ["w1"], "e2": []}
    assert d.evicted == [("e2", "w2")]


def test_an_evictable_model_never_evicts_one_used_more_recently() -> None:
    current = {"recent": ["w1"]}
    older = need("older", 1, 300, evictable=True, last_used=5.0)
    recent = need("recent", 1, 300, evictable=True, last_used=9.0)
    d = plan([older, recent], [cpu("w1", 400)], current)
    assert d.assignments == {"older": [], "recent": ["w1"]} and not d.evicted
    # the other way round it may
    newer = need("newer", 1, 300, evictable=True, last_used=12.0)
    d = plan([newer, recent], [cpu("w1", 400)], current)
    assert d.assignments == {"newer": ["w1"], "recent": []} and d.evicted == [("recent", "w1")]


def test_models_that_are_not_evictable_are_never_evicted() -> None:
    needs = [need("fixed", 1, 300), need("other", 1, 300)]
    d = plan(needs, [cpu("w1", 400)], {"fixed": ["w1"]})
    assert d.assignments == {"fixed": ["w1"], "other": []} and not d.evicted
    assert d.reasons["other"] == (
        "0 of 1 replicas placed: every worker in the pool is full (needs 300 MB; the largest free is 100 MB)"
    )


def test_eviction_respects_the_pool_and_device_budget() -> None:
    needs = [
        Need("e", 1, 100 * MB, device_memory_bytes=3000 * MB, evictable=True),
        Need("a", 1, 100 * MB, device_memory_bytes=3000 * MB, pool={"device": "gpu"}),
    ]
    workers = [gpu("g1", 8000, 4000), cpu("c1", 8000)]
    d = plan(needs, workers, {"e": ["g1"]})
    assert d.assignments == {"a": ["g1"], "e": ["c1"]} and d.evicted == [("e", "g1")]


# --- rule 7: reasons ---------------------------------------------------------------------------------


def test_reason_too_big_for_any_matching_worker() -> None:
    workers = [gpu("g1", 120, 1000, gpu="h100"), cpu("c1", 9000)]
    d = plan([need("digits-cnn", 1, 310, pool={"gpu": "h100"})], workers, {})
    assert d.reasons == {"digits-cnn": "needs 310 MB per replica; the largest worker in pool gpu=h100 has 120 MB"}
    assert d.unplaceable == {"digits-cnn"}
    d = plan([need("a", 1, 310)], [cpu("c1", 120, reserved_mb=20)], {})
    assert d.reasons == {"a": "needs 310 MB per replica; the largest worker in the pool has 100 MB"}
    d = plan([need("a", 1, 0)], [cpu("c1", 120, reserved_mb=150)], {})
    assert d.reasons == {
        "a": "no worker in the pool has room for models: what they serve outside placement fills their budgets"
    }


def test_reason_too_big_for_any_device_budget() -> None:
    d = plan([Need("a", 1, MB, device_memory_bytes=5000 * MB)], [gpu("g1", 100, 4000)], {})
    assert d.reasons == {
        "a": "needs 5000 MB of device memory per replica; the largest device budget in the pool is 4000 MB"
    }
    assert d.unplaceable == {"a"}


def test_reason_no_worker_carries_the_labels() -> None:
    d = plan([need("a", 2, 10, pool={"gpu": "h100", "zone": "a"})], [gpu("g1", 1000, 1000, gpu="h100")], {})
    assert d.reasons == {"a": "no live worker carries the labels gpu=h100,zone=a"} and d.unplaceable == {"a"}
    d = plan([need("a", 1, 10)], [], {"a": ["w1"]})
    assert d.reasons == {"a": "no pool worker is alive (workers started without FOVEA_WORKER_MODELS join the pool)"}
    assert d.assignments == {"a": []}


def test_reason_every_worker_full() -> None:
    workers = [cpu("w1", 400, zone="a"), cpu("w2", 400, zone="a"), cpu("w3", 400, zone="a")]
    needs = [need("a", 3, 310, pool={"zone": "a"}), need("b", 1, 200, pool={"zone": "a"})]
    d = plan(needs, workers, {"b": ["w3"]})
    assert d.assignments == {"a": ["w1", "w2"], "b": ["w3"]}
    assert d.reasons == {
        "a": "2 of 3 replicas placed: every worker in pool zone=a is full (needs 310 MB; the largest free is 200 MB)"
    }
    assert not d.unplaceable


def test_reason_full_and_too_few_workers() -> None:
    d = plan([need("a", 4, 300), need("b", 1, 200)], [cpu("w1", 400), cpu("w2", 400), cpu("w3", 300)], {"b": ["w3"]})
    assert d.assignments == {"a": ["w1", "w2"], "b": ["w3"]}
    assert d.reasons == {
        "a": "2 of 4 replicas placed: every worker in the pool is full (needs 300 MB; the largest free is 100 MB); "
        "only 3 live workers are in the pool"
    }


def test_mb() -> None:
    assert [mb(0), mb(500_000), mb(9_940_000), mb(310 * MB), mb(1234567890)] == [
        "0 MB",
        "0.5 MB",
        "9.9 MB",
        "310 MB",
        "1235 MB",
    ]


# --- rule 8: input bounds -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "needs, workers, current",
    [
        ([Need("a", -1, 0)], [], {}),
        ([Need("a", 10_001, 0)], [], {}),
        ([Need("a", 1, -5)], [], {}),
        ([Need("a", 1, MAX_BYTES + 1)], [], {}),
        ([Need("a", 1, 0, device_memory_bytes=-1)], [], {}),
        ([Need("a", 1.5, 0)], [], {}),  # type: ignore[arg-type]
        ([Need("a", True, 0)], [], {}),
        ([Need("a", 1, 0, last_used=-1.0)], [], {}),
        ([Need("a", 1, 0, last_used=math.nan)], [], {}),
        ([Need("a", 1, 0, last_used=math.inf)], [], {}),
        ([Need("", 1, 0)], [], {}),
        ([Need("a", 1, 0), Need("a", 2, 0)], [], {}),
        ([Need("a", 1, 0, pool={"gpu": 1})], [], {}),  # type: ignore[dict-item]
        ([], [Capacity("w", {}, -1)], {}),
        ([], [Capacity("w", {}, 10, reserved_bytes=-1)], {}),
        ([], [Capacity("w", {}, 10, device_memory_bytes=MAX_BYTES * 2)], {}),
        ([], [Capacity("w", {}, 10), Capacity("w", {}, 20)], {}),
        ([], [Capacity("", {}, 10)], {}),
        ([Need("a", 1, 0)], [Capacity("w1", {}, 10)], {"a": "w1"}),
    ],
)
def test_absurd_input_is_refused(
    needs: Sequence[Need], workers: Sequence[Capacity], current: Mapping[str, Sequence[str]]
) -> None:
    with pytest.raises(ValueError):
        plan(needs, workers, current)


def test_refusals_name_the_field() -> None:
    with pytest.raises(ValueError, match=r"digits: device_memory_bytes must be an int in \[0, \d+\], got -1"):
        plan([Need("digits", 1, 5, device_memory_bytes=-1)], [], {})
    with pytest.raises(ValueError, match="w1: reserved_bytes"):
        plan([], [Capacity("w1", {}, 10, reserved_bytes=MAX_BYTES + 1)], {})
    with pytest.raises(ValueError, match="w1: labels must map non-empty str keys to str values"):
        plan([], [Capacity("w1", {"": "x"}, 10)], {})


def test_by_worker_lists_every_worker() -> None:
    workers = [cpu("w1", 1000), cpu("w2", 1000), cpu("w3", 10)]
    d = plan([need("b", 2, 100), need("a", 1, 100)], workers, {})
    assert by_worker(d, workers) == {"w1": ["a", "b"], "w2": ["b"], "w3": []}


# --- invariants over random clusters ------------------------------------------------------------------

POOLS = [{}, {"zone": "a"}, {"device": "gpu"}, {"zone": "b", "device": "cpu"}]


@st.composite
def clusters(draw: st.DrawFn) -> tuple[list[Need], list[Capacity], dict[str, list[str]]]:
    # a crowded cluster (one pool, few workers, most models already placed) makes evictions common
    crowded = draw(st.booleans())
    n_workers = draw(st.integers(1, 3) if crowded else st.integers(0, 8))
    workers = []
    for i in range(n_workers):
        is_gpu = draw(st.booleans())
        labels = {"device": "gpu" if is_gpu else "cpu", "zone": draw(st.sampled_from("ab"))}
        workers.append(
            Capacity(
                f"w{i}",
                labels,
                draw(st.integers(0, 2000)) * MB,
                device_memory_bytes=draw(st.integers(1, 2000)) * MB if is_gpu else 0,
                reserved_bytes=draw(st.integers(0, 300)) * MB,
            )
        )
    needs = []
    for i in range(draw(st.integers(0, 12))):
        needs.append(
            Need(
                f"m{i}",
                draw(st.integers(0, 4)),
                draw(st.integers(0, 900)) * MB,
                device_memory_bytes=draw(st.integers(0, 900)) * MB,
                pool={} if crowded else draw(st.sampled_from(POOLS)),
                evictable=draw(st.booleans()),
                last_used=float(draw(st.integers(0, 5))),
            )
        )
    ids = [w.worker_id for w in workers] + ["gone"]
    current = {
        n.model: draw(st.lists(st.sampled_from(ids), min_size=1, max_size=4))
        for n in needs
        if crowded or draw(st.booleans())
    }
    return needs, workers, current


def check_invariants(needs: list[Need], workers: list[Capacity], current: dict[str, list[str]], d: Decision) -> None:
    caps = {w.worker_id: w for w in workers}
    by_model = {n.model: n for n in needs}
    assert set(d.assignments) == set(by_model)
    for model, ids in d.assignments.items():
        n = by_model[model]
        assert ids == sorted(set(ids)), "replicas on distinct workers, sorted"
        assert len(ids) <= n.replicas
        for wid in ids:
            assert all(caps[wid].labels.get(k) == v for k, v in n.pool.items()), "labels respected"
        assert (model in d.reasons) == (len(ids) < n.replicas)
        assert (model in d.unplaceable) == (not ids and n.replicas > 0)
    for wid, models in by_worker(d, workers).items():
        w = caps[wid]
        assert w.reserved_bytes + sum(by_model[m].memory_bytes for m in models) <= w.memory_bytes or not models
        if w.device_memory_bytes:
            assert sum(by_model[m].device_memory_bytes for m in models) <= w.device_memory_bytes
    for model, wid in d.evicted:
        assert by_model[model].evictable, "only evictable models are evicted"
        assert wid in current.get(model, ()) and wid not in d.assignments[model]
    # nothing is left short that could have been placed, with or without eviction
    hosted = by_worker(d, workers)
    free = {
        w.worker_id: w.memory_bytes - w.reserved_bytes - sum(by_model[m].memory_bytes for m in hosted[w.worker_id])
        for w in workers
    }
    free_dev = {
        w.worker_id: w.device_memory_bytes - sum(by_model[m].device_memory_bytes for m in hosted[w.worker_id])
        if w.device_memory_bytes
        else math.inf
        for w in workers
    }
    for model in d.reasons:
        n = by_model[model]
        for w in workers:
            wid = w.worker_id
            if wid in d.assignments[model] or any(w.labels.get(k) != v for k, v in n.pool.items()):
                continue
            victims = [
                by_model[m]
                for m in hosted[wid]
                if by_model[m].evictable and (not n.evictable or by_model[m].last_used < n.last_used)
            ]
            room = free[wid] + sum(v.memory_bytes for v in victims)
            room_dev = free_dev[wid] + sum(v.device_memory_bytes for v in victims)
            assert room < n.memory_bytes or room_dev < n.device_memory_bytes, f"{model} fits on {wid}"


@settings(max_examples=400, deadline=None)
@given(clusters())
def test_invariants_over_random_clusters(cluster: tuple[list[Need], list[Capacity], dict[str, list[str]]]) -> None:
    needs, workers, current = cluster
    d = plan(needs, workers, current)
    check_invariants(needs, workers, current, d)
    again = plan(needs, workers, d.assignments)
    assert again.assignments == d.assignments, "idempotent"
    assert again.reasons == d.reasons and again.unplaceable == d.unplaceable and not again.evicted
    # the same input in another order gives the same decision
    shuffled = plan(list(reversed(needs)), list(reversed(workers)), current)
    assert shuffled.assignments == d.assignments and shuffled.reasons == d.reasons
    # a worker leaves: only its replicas move (and whatever is evicted to make room for them)
    if workers:
        gone = workers[0].worker_id
        after = plan(needs, workers[1:], d.assignments)
        check_invariants(needs, workers[1:], d.assignments, after)
        evicted = set(after.evicted)
        for model, ids in d.assignments.items():
            stays = {wid for wid in ids if wid != gone and (model, wid) not in evicted}
            assert stays <= set(after.assignments[model]), f"{model} moved off a worker that stayed"
