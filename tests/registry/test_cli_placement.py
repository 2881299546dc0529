"""`fovea model scale`, and where `fovea model list` / `fovea model show` say each model is placed (issue 22):
the CLI as a real subprocess against a real registry whose placement loop runs. The pool worker is a heartbeat
sender (SimWorker: the loop sees workers only through their heartbeats)."""

from __future__ import annotations

import pathlib

from tests.registry.conftest import StartRegistry
from tests.registry.helpers import Reg, poll
from tests.registry.test_cli import Cli, _rows
from tests.registry.test_placement_loop import FAST, SimWorker, beating
from tests.tinymodels import color_model


async def now(value: bool) -> bool:
    return value


async def test_scale_list_and_show_say_where_models_are(
    start_registry: StartRegistry, token: str, worker_token: str, tmp_path: pathlib.Path
) -> None:
    server = await start_registry(**FAST)
    address = f"127.0.0.1:{server.port}"
    cli = Cli(address, token)
    reg = Reg(address, token, worker_token=worker_token)
    model_file = tmp_path / "colors.onnx"
    model_file.write_bytes(color_model())
    await cli.run("model", "register", "colors", str(model_file), "--promote", "production")
    await cli.run("model", "register", "shades", str(model_file), "--promote", "production")
    pool = SimWorker(reg, "pool-a")
    async with beating(pool):
        await poll(lambda: now(sorted(pool.assigned) == ["colors", "shades"]))  # both models assigned

        out = (await cli.run("model", "scale", "shades", "--replicas", "1", "--pool", "gpu=h100")).stdout
        assert out.splitlines()[0] == "shades: 1 replica(s) wanted (min 1, max 1)", out
        assert "pool gpu=h100" in out, out
        await poll(lambda: now(pool.assigned == ["colors"]))  # shades left: the worker is outside its pool

        async def listed() -> list[list[str]]:
            return _rows((await cli.run("model", "list")).stdout)

        rows: list[list[str]] = []

        async def settled() -> bool:
            nonlocal rows
            rows = await listed()
            return rows[1][3] == "ready" and rows[2][3] == "unplaceable"

        await poll(settled)  # colors ready and shades unplaceable in `model list`
        assert rows[0] == ["MODEL", "LATEST", "READY", "STATE", "WORKERS", "ALIASES"]
        assert rows[1] == ["colors", "1", "1/1", "ready", "pool-a", "production", "->", "v1"], rows
        assert rows[2][:5] == ["shades", "1", "0/1", "unplaceable", "-"], rows

        show = (await cli.run("model", "show", "shades")).stdout
        section = show.split("\n\n")[-1]
        assert section.startswith("placement: unplaceable, 0 of 1 replica(s) ready"), show
        assert "gpu=h100" in section.split("reason: ", 1)[1], show  # the planner's words: no worker in the pool

        shown = await cli.json("model", "show", "colors")
        assert shown["placement"]["worker_ids"] == ["pool-a"] and shown["placement"]["state"] == "PLACEMENT_STATE_READY"
        listed_json = await cli.json("model", "list")
        assert [m["placement"]["scale"]["model"] for m in listed_json] == ["colors", "shades"]

        scaled = await cli.json("model", "scale", "colors", "--replicas", "0", "--max", "3", "--idle-unload", "120")
        assert scaled["scale"] == {"model": "colors", "max_replicas": 3, "idle_unload_s": 120.0}, scaled
        args = ("model", "scale", "colors", "--replicas", "1", "--memory", "300MB", "--device-memory", "2GiB")
        scaled = await cli.json(*args)
        assert scaled["scale"]["memory_bytes"] == str(300 * 10**6), scaled  # uint64: a string in proto JSON
        assert scaled["scale"]["device_memory_bytes"] == str(2 * 2**30), scaled
        assert scaled["memory_bytes"] == str(300 * 10**6), scaled  # what placement plans for
        show = (await cli.run("model", "show", "colors")).stdout
        assert "memory per replica: 300.0 MB (declared 300.0 MB per version)" in show, show
    await reg.close()


async def test_scale_refuses_bad_input_with_a_reason(start_registry: StartRegistry, token: str) -> None:
    server = await start_registry()
    cli = Cli(f"127.0.0.1:{server.port}", token)
    for args, says in (
        (["--replicas", "3", "--max", "2"], "--min 3 <= --replicas 3 <= --max 2 does not hold"),
        (["--replicas", "-1"], "0 or more"),
        (["--replicas", "1", "--pool", "gpu"], "--pool takes LABEL=VALUE, got 'gpu'"),
        (["--replicas", "1", "--memory", "lots"], "--memory takes a size such as 300MB"),
        (["--replicas", "1", "--device-memory=-5MB"], "--device-memory takes a size"),
    ):
        out = await cli.run("model", "scale", "colors", *args, ok=False)
        assert says in out.stderr, (args, out.stderr)
    out = await cli.run("model", "scale", "nothing-here", "--replicas", "1", ok=False)
    assert "NOT_FOUND" in out.stderr, out.stderr  # the registry's answer: no such model
