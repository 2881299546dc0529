"""Aliases: canary weights, promote, rollback, delete, archive rules, and the model watch stream."""

from __future__ import annotations

import asyncio
import collections
import time

import grpc

from fovea.v1 import model_pb2, registry_pb2
from tests.registry.helpers import Reg, Watch, status_of
from tests.tinymodels import color_model

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION


def targets(alias: model_pb2.Alias) -> list[tuple[int, int]]:
    return [(t.version, t.weight) for t in alias.targets]


async def _versions(reg: Reg, n: int, name: str = "colors") -> None:
    for i in range(n):
        await reg.register(name, color_model(bias=float(i)))


async def test_canary_alias_splits_resolution_by_weight(reg: Reg) -> None:
    await _versions(reg, 4)
    resp = await reg.set_alias("colors", "production", (3, 90), (4, 10))
    assert targets(resp.alias) == [(3, 90), (4, 10)] and not resp.HasField("previous")
    counts = collections.Counter([(await reg.resolve("colors")).model.version for _ in range(400)])
    assert set(counts) == {3, 4}
    assert 15 <= counts[4] <= 80, counts  # 10% of 400 is 40; far outside this range is a broken split


async def test_bad_alias_targets_are_invalid_argument(reg: Reg) -> None:
    await _versions(reg, 3)
    bad = [
        ((), "one version, or two"),
        (((1, 50), (2, 30), (3, 20)), "one version, or two"),
        (((1, 60), (2, 30)), "sum to 100"),
        (((1, 100), (2, 0)), "both be above 0"),
        (((1, 50), (1, 50)), "distinct versions"),
        (((1, 40),), "single alias target takes all the traffic"),
        (((0, 100),), "need a version number"),
    ]
    for t, expected in bad:
        code, msg = await status_of(reg.set_alias("colors", "production", *t))
        assert code == INVALID and expected in msg, (t, msg)
    code, msg = await status_of(reg.set_alias("colors", "production", (7, 100)))
    assert code == grpc.StatusCode.NOT_FOUND and "no version 7" in msg
    code, msg = await status_of(reg.set_alias("ghost", "production", (1, 100)))
    assert code == grpc.StatusCode.NOT_FOUND and "unknown model 'ghost'" in msg
    assert (await reg.set_alias("colors", "production", (2, 0))).alias.targets[0].weight == 100


async def test_promote_then_rollback_restores_each_earlier_state(reg: Reg) -> None:
    await _versions(reg, 3)
    await reg.set_alias("colors", "production", (1, 100))
    await reg.set_alias("colors", "production", (2, 80), (3, 20))  # a canary
    promoted = await reg.set_alias("colors", "production", (3, 100))
    assert targets(promoted.previous) == [(2, 80), (3, 20)]
    history = await reg.call("GetAliasHistory", registry_pb2.GetAliasHistoryRequest(model="colors"))
    assert targets(history.alias) == [(3, 100)]
    assert [targets(h) for h in history.history] == [[(2, 80), (3, 20)], [(1, 100)]]

    back = await reg.call("RollbackAlias", registry_pb2.RollbackAliasRequest(model="colors", alias="production"))
    assert targets(back.alias) == [(2, 80), (3, 20)] and targets(back.previous) == [(3, 100)]
    back = await reg.call("RollbackAlias", registry_pb2.RollbackAliasRequest(model="colors"))  # production by default
    assert targets(back.alias) == [(1, 100)]
    assert (await reg.resolve("colors")).model.version == 1
    code, msg = await status_of(reg.call("RollbackAlias", registry_pb2.RollbackAliasRequest(model="colors")))
    assert code == PRECONDITION and "no earlier state to roll back to" in msg
    # Promoting to the same targets again is not a new state to roll back to.
    await reg.set_alias("colors", "production", (1, 100))
    code, _ = await status_of(reg.call("RollbackAlias", registry_pb2.RollbackAliasRequest(model="colors")))
    assert code == PRECONDITION


async def test_archive_is_refused_while_an_alias_points_at_the_version(reg: Reg) -> None:
    await _versions(reg, 3)
    await reg.set_alias("colors", "production", (2, 90), (3, 10))
    await reg.set_alias("colors", "staging", (1, 100))
    for version, alias in ((3, "production"), (1, "staging")):
        code, msg = await status_of(
            reg.call("ArchiveVersion", registry_pb2.ArchiveVersionRequest(model="colors", version=version))
        )
        assert code == PRECONDITION and f"alias {alias!r}" in msg
    await reg.set_alias("colors", "production", (2, 100))
    archived = (await reg.call("ArchiveVersion", registry_pb2.ArchiveVersionRequest(model="colors", version=3))).model
    assert archived.state == model_pb2.VERSION_STATE_ARCHIVED
    # An archived version cannot be served: no alias, no rollback onto it, no download.
    code, msg = await status_of(reg.set_alias("colors", "canary", (3, 100)))
    assert code == PRECONDITION and "archived" in msg
    code, msg = await status_of(reg.call("RollbackAlias", registry_pb2.RollbackAliasRequest(model="colors")))
    assert code == PRECONDITION and "archived" in msg
    code, msg = await status_of(reg.download("colors", 3))
    assert code == PRECONDITION and "archived" in msg
    # Deleting the alias frees its version; a rollback brings the alias back.
    removed = (await reg.call("DeleteAlias", registry_pb2.DeleteAliasRequest(model="colors", alias="staging"))).alias
    assert targets(removed) == [(1, 100)]
    assert (
        await reg.call("ArchiveVersion", registry_pb2.ArchiveVersionRequest(model="colors", version=1))
    ).model.state == model_pb2.VERSION_STATE_ARCHIVED
    code, msg = await status_of(
        reg.call("DeleteAlias", registry_pb2.DeleteAliasRequest(model="colors", alias="staging"))
    )
    assert code == grpc.StatusCode.NOT_FOUND and "no alias 'staging'" in msg
    code, msg = await status_of(
        reg.call("ArchiveVersion", registry_pb2.ArchiveVersionRequest(model="colors", version=8))
    )
    assert code == grpc.StatusCode.NOT_FOUND
    # Latest-version fallback skips archived versions.
    await reg.call("DeleteAlias", registry_pb2.DeleteAliasRequest(model="colors", alias="production"))
    assert (await reg.resolve("colors")).model.version == 2


async def test_concurrent_promotions_leave_a_whole_state_and_a_complete_history(reg: Reg) -> None:
    await _versions(reg, 5)
    await asyncio.gather(*(reg.set_alias("colors", "production", (v, 100)) for v in range(1, 6)))
    history = await reg.call("GetAliasHistory", registry_pb2.GetAliasHistoryRequest(model="colors"))
    seen = [targets(history.alias)[0][0]] + [targets(h)[0][0] for h in history.history]
    assert sorted(seen) == [1, 2, 3, 4, 5]  # every promotion is either current or on the history


async def test_watch_models_starts_with_a_snapshot_and_reports_changes_within_a_second(reg: Reg) -> None:
    await _versions(reg, 2)
    await reg.set_alias("colors", "production", (1, 100))
    watch = Watch(reg.stub.WatchModels(registry_pb2.WatchModelsRequest(), metadata=reg.md))
    _, first = await watch.next()
    assert first.snapshot and [(a.name, targets(a)) for a in first.aliases] == [("production", [(1, 100)])]

    t0 = time.monotonic()
    await reg.set_alias("colors", "production", (1, 90), (2, 10))
    at, event = await watch.until(lambda e: bool(e.aliases))
    assert not event.snapshot and targets(event.aliases[0]) == [(1, 90), (2, 10)]
    assert at - t0 < 1.0

    t0 = time.monotonic()
    await reg.call("RollbackAlias", registry_pb2.RollbackAliasRequest(model="colors"))
    at, event = await watch.until(lambda e: bool(e.aliases))
    assert targets(event.aliases[0]) == [(1, 100)] and at - t0 < 1.0

    mv = await reg.register("colors", color_model(bias=7.0))
    _, event = await watch.until(lambda e: bool(e.versions))
    assert event.versions[0].version == mv.version == 3

    await reg.set_alias("colors", "staging", (3, 100))
    await reg.call("DeleteAlias", registry_pb2.DeleteAliasRequest(model="colors", alias="staging"))
    _, event = await watch.until(lambda e: bool(e.removed_aliases))
    assert list(event.removed_aliases) == ["colors/staging"]
    await reg.call("ArchiveVersion", registry_pb2.ArchiveVersionRequest(model="colors", version=3))
    _, event = await watch.until(lambda e: bool(e.versions))
    assert event.versions[0].state == model_pb2.VERSION_STATE_ARCHIVED
    watch.close()

    # A new watcher (a reconnect) sees the present state in its snapshot.
    again = Watch(reg.stub.WatchModels(registry_pb2.WatchModelsRequest(), metadata=reg.md))
    _, snap = await again.next()
    assert snap.snapshot and [(a.name, targets(a)) for a in snap.aliases] == [("production", [(1, 100)])]
    again.close()
