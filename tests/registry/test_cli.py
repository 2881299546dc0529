"""`fovea model ...` and `fovea keys ...` run as real subprocesses against a real registry."""

from __future__ import annotations

import asyncio
import json
import os
import pathlib
import subprocess
import sys
from typing import Any

from fovea.cluster import ROOT
from tests.registry.conftest import StartRegistry
from tests.tinymodels import color_model


class Cli:
    def __init__(self, registry: str, token: str) -> None:
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FOVEA_")}
        self.env.update(FOVEA_REGISTRY=registry, FOVEA_API_KEY=token)

    async def run(self, *args: str, ok: bool = True, **env: str) -> subprocess.CompletedProcess[str]:
        out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "fovea.cli", *args],
            cwd=ROOT,
            env={**self.env, **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        if ok:
            assert out.returncode == 0, (args, out.stdout, out.stderr)
        else:
            assert out.returncode == 2, (args, out.stdout, out.stderr)
        return out

    async def json(self, *args: str) -> Any:
        return json.loads((await self.run(*args, "--json")).stdout)


def _rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.strip().splitlines()]


async def test_model_commands_print_tables_and_json(
    start_registry: StartRegistry, token: str, tmp_path: pathlib.Path
) -> None:
    server = await start_registry()
    cli = Cli(f"127.0.0.1:{server.port}", token)
    v1_file, v2_file = tmp_path / "v1.onnx", tmp_path / "v2.onnx"
    v1_file.write_bytes(color_model())
    v2_file.write_bytes(color_model(bias=1.0))

    registered = await cli.json(
        "model", "register", "colors", str(v1_file), "--metric", "top1=0.91", "--tag", "team=vision"
    )
    assert registered["model"]["version"] == "1" and registered["model"]["metrics"] == {"top1": 0.91}
    out = (await cli.run("model", "register", "colors", str(v2_file), "--promote", "production")).stdout
    assert out.startswith("registered colors v2 sha256=") and "colors/production: none -> v2" in out

    out = (await cli.run("model", "promote", "colors", "1", "--canary", "2", "--canary-weight", "10")).stdout
    assert out.strip() == "colors/production: v2 -> v1 90%, v2 10%"
    rows = _rows((await cli.run("model", "list")).stdout)
    assert rows[0] == ["MODEL", "LATEST", "READY", "STATE", "WORKERS", "ALIASES"]
    # no worker here, so no replica is ready (where models are placed: test_cli_placement.py)
    assert len(rows) == 2 and rows[1][:3] == ["colors", "2", "0/1"] and rows[1][4] == "-", rows
    assert rows[1][5:] == ["production", "->", "v1", "90%,", "v2", "10%"], rows
    listed = await cli.json("model", "list")
    assert listed[0]["name"] == "colors" and len(listed[0]["aliases"][0]["targets"]) == 2

    show = (await cli.run("model", "show", "colors")).stdout
    table, aliases, _placement = show.split("\n\n")
    rows = _rows(table)
    assert rows[0][:6] == ["VERSION", "STATE", "SHA256", "BYTES", "LABELS", "METRICS"]
    assert [r[:2] for r in rows[1:]] == [["1", "ready"], ["2", "ready"]]
    assert rows[1][5] == "top1=0.91" and rows[1][6] == "admin-token"
    assert _rows(aliases)[1][:5] == ["production", "v1", "90%,", "v2", "10%"]
    shown = await cli.json("model", "show", "colors")
    assert [v["version"] for v in shown["versions"]] == ["1", "2"] and shown["aliases"][0]["name"] == "production"

    out = (await cli.run("model", "rollback", "colors")).stdout
    assert out.strip() == "colors/production rolled back: v1 90%, v2 10% -> v2"
    failed = await cli.run("model", "archive", "colors", "2", ok=False)
    assert failed.stderr.startswith("fovea: FAILED_PRECONDITION: alias 'production'")
    archived = await cli.json("model", "archive", "colors", "1")
    assert archived["state"] == "VERSION_STATE_ARCHIVED"
    failed = await cli.run("model", "rollback", "colors", ok=False)
    assert "FAILED_PRECONDITION" in failed.stderr and "no earlier state" in failed.stderr

    failed = await cli.run("model", "show", "../etc", ok=False)
    assert failed.stderr.startswith("fovea: INVALID_ARGUMENT: invalid model name '../etc'")
    failed = await cli.run("model", "promote", "colors", "2", "--canary", "1", ok=False)
    assert "--canary-weight" in failed.stderr
    failed = await cli.run("model", "list", ok=False, FOVEA_API_KEY="")
    assert "no credentials" in failed.stderr


async def test_keys_commands_show_the_secret_once(start_registry: StartRegistry, token: str) -> None:
    server = await start_registry()
    cli = Cli(f"127.0.0.1:{server.port}", token)
    created = await cli.json(
        "keys", "create", "--role", "publish", "--model", "colors*", "--ttl-s", "3600", "--description", "ci"
    )
    key_id, secret = created["key_id"], created["secret"]
    assert secret.startswith(f"fv_{key_id}_") and created["key"]["role"] == "ROLE_PUBLISH"
    out = (await cli.run("keys", "create", "--role", "infer")).stdout
    assert "secret: fv_" in out and "shown only once" in out

    listing = (await cli.run("keys", "list")).stdout
    rows = {r[0]: r for r in _rows(listing)[1:]}
    assert _rows(listing)[0] == ["KEY", "ID", "ROLE", "MODELS", "STATE", "EXPIRES", "CREATED", "DESCRIPTION"]
    assert rows[key_id][1:4] == ["publish", "colors*", "active"] and rows[key_id][-1] == "ci"
    listing_json = (await cli.run("keys", "list", "--json")).stdout
    assert secret not in listing and secret.split("_", 2)[2] not in listing_json

    # The new key works for what its role and patterns allow.
    as_key = {"FOVEA_API_KEY": secret}
    out = (await cli.run("model", "list", **as_key)).stdout
    assert out.strip() == "MODEL  LATEST  READY  STATE  WORKERS  ALIASES"
    failed = await cli.run("keys", "list", ok=False, **as_key)
    assert failed.stderr.startswith("fovea: PERMISSION_DENIED")

    assert (await cli.run("keys", "revoke", key_id)).stdout.strip() == f"revoked {key_id}"
    rows = {r[0]: r for r in _rows((await cli.run("keys", "list")).stdout)[1:]}
    assert rows[key_id][3] == "revoked"
    failed = await cli.run("model", "list", ok=False, **as_key)
    assert failed.stderr.startswith("fovea: UNAUTHENTICATED") and "revoked" in failed.stderr
    failed = await cli.run("keys", "create", "--model", "../x", ok=False)
    assert "INVALID_ARGUMENT: invalid model pattern" in failed.stderr
