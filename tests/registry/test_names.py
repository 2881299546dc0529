"""Acceptance 7: bad model and alias names get INVALID_ARGUMENT from every RPC that takes one."""

from __future__ import annotations

import pathlib

import grpc
import pytest

from fovea.errors import InvalidArgument
from fovea.names import check_name, redis_key
from fovea.v1 import model_pb2, registry_pb2
from tests.registry.helpers import Reg, files_under, redis_state, status_of

BAD_NAMES = [
    "..",
    "a..b",
    "../etc",
    "a/b",
    "/abs",
    "a\x00b",
    "\x00",
    "x" * 64,
    "",
    "UPPER",
    "-lead",
    ".hidden",
    "a b",
    "a:b",
    "a*",
    "name\n",
    "caf\u00e9",
]


def test_name_rules() -> None:
    assert check_name("x" * 63) and check_name("efficientnet-lite0") and check_name("a.b_c-1")
    for bad in BAD_NAMES:
        with pytest.raises(InvalidArgument):
            check_name(bad)
    with pytest.raises(InvalidArgument):
        redis_key("model", "a:b")


def _rpcs(model: str, alias: str) -> list[tuple[str, str, object]]:
    """(description, method, request) for every RPC that takes a model or alias name."""
    v = model_pb2.AliasTarget(version=1, weight=100)
    return [
        ("GetModelVersion", "GetModelVersion", registry_pb2.GetModelVersionRequest(model=model, alias=alias)),
        ("ListVersions", "ListVersions", registry_pb2.ListVersionsRequest(model=model)),
        ("SetAlias", "SetAlias", registry_pb2.SetAliasRequest(model=model, alias=alias, targets=[v])),
        ("ArchiveVersion", "ArchiveVersion", registry_pb2.ArchiveVersionRequest(model=model, version=1)),
        ("RollbackAlias", "RollbackAlias", registry_pb2.RollbackAliasRequest(model=model, alias=alias)),
        ("DeleteAlias", "DeleteAlias", registry_pb2.DeleteAliasRequest(model=model, alias=alias)),
        ("GetAliasHistory", "GetAliasHistory", registry_pb2.GetAliasHistoryRequest(model=model, alias=alias)),
        ("ListWorkers", "ListWorkers", registry_pb2.ListWorkersRequest(model=model) if model else None),
        (
            "Heartbeat",
            "Heartbeat",
            registry_pb2.HeartbeatRequest(
                status=registry_pb2.WorkerStatus(
                    worker_id="w1",
                    address="127.0.0.1:9",
                    state=registry_pb2.WORKER_STATE_READY,
                    models=[registry_pb2.LoadedModel(name=model, version=1)],
                )
            ),
        ),
    ]


async def test_bad_names_are_invalid_argument_everywhere(reg: Reg, redis_url: str, tmp_path: pathlib.Path) -> None:
    await reg.register("good")
    await reg.set_alias("good", "production", (1, 100))
    before = redis_state(redis_url)
    files = files_under(tmp_path / "artifacts")
    for bad in BAD_NAMES:
        if bad:  # an empty name is a missing name: also refused, checked below
            code, msg = await status_of(reg.register(bad))
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (bad, msg)
            assert "invalid model name" in msg
        for model, alias, what in ((bad, "production", "model name"), ("good", bad, "alias")):
            for desc, method, request in _rpcs(model, alias):
                if request is None or (
                    what == "alias" and method in ("ListVersions", "ArchiveVersion", "ListWorkers", "Heartbeat")
                ):
                    continue  # the RPC has no such field
                if not bad and (what == "alias" and method in ("GetModelVersion", "RollbackAlias", "GetAliasHistory")):
                    continue  # an empty alias means production there
                code, msg = await status_of(reg.call(method, request))
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (desc, what, bad, code, msg)
        code, msg = await status_of(reg.download(bad, 1))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "invalid model name" in msg
    code, msg = await status_of(reg.register(""))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert redis_state(redis_url) == before
    assert files_under(tmp_path / "artifacts") == files
    assert not any(".." in f or f.startswith("/") for f in files)
    assert (await reg.register("x" * 63)).version == 1  # the longest name that is allowed


async def test_bad_key_patterns_and_ids_are_invalid_argument(reg: Reg) -> None:
    for pattern in ("../x", "a/b", "a\x00", "A*", "x" * 129, ""):
        code, msg = await status_of(
            reg.call(
                "CreateApiKey", registry_pb2.CreateApiKeyRequest(role=registry_pb2.ROLE_INFER, model_patterns=[pattern])
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "invalid model pattern" in msg, pattern
    for key_id in ("../x", "a" * 40, "ABCDEFGHIJKL", "abc\x00defghij", ""):
        code, msg = await status_of(reg.call("RevokeApiKey", registry_pb2.RevokeApiKeyRequest(key_id=key_id)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "invalid key id" in msg
    for worker_id in ("../w", "w/1", "", "w\x00", "w" * 129):
        code, msg = await status_of(
            reg.call(
                "Heartbeat",
                registry_pb2.HeartbeatRequest(
                    status=registry_pb2.WorkerStatus(
                        worker_id=worker_id, address="127.0.0.1:9", state=registry_pb2.WORKER_STATE_READY
                    )
                ),
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "invalid worker id" in msg
