"""Acceptance 7: the TypeScript example (stubs generated from protos/ with the npm protobuf
tooling, calls through @grpc/grpc-js) classifies an image through a live gateway."""

from __future__ import annotations

import asyncio
import os
import pathlib
import shutil

from fovea.cluster import ROOT
from tests.gateway.conftest import GatewayFactory, Stack
from tests.tinymodels import png

EXAMPLE = ROOT / "clients" / "typescript"


async def _run(*args: str, env: dict[str, str] | None = None, timeout_s: float = 180) -> str:
    proc = await asyncio.create_subprocess_exec(
        *args, cwd=EXAMPLE, env=env or dict(os.environ), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode == 0, f"{' '.join(args)} failed:\n{stdout.decode()[-2000:]}\n{stderr.decode()[-2000:]}"
    return stdout.decode()


async def test_typescript_example_prints_the_label(
    stack: Stack, gateways: GatewayFactory, tmp_path: pathlib.Path
) -> None:
    npm = shutil.which("npm")
    assert npm, "npm (Node 20+) is needed for the TypeScript client example"
    if not (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir():  # scripts/setup.sh normally did this
        await _run(npm, "ci", "--no-audit", "--no-fund")
    await _run(npm, "run", "build")  # regenerates the types from protos/, then tsc
    gw = await gateways()
    secret = await asyncio.to_thread(stack.key)
    image = tmp_path / "green.png"
    image.write_bytes(png((20, 240, 20)))
    out = await _run(
        "node",
        "dist/classify.js",
        "--address",
        f"127.0.0.1:{gw.port}",
        "--model",
        "colors",
        "--top-k",
        "2",
        str(image),
        env={**os.environ, "FOVEA_API_KEY": secret},
        timeout_s=60,
    )
    lines = out.strip().splitlines()
    assert lines[0] == "model: colors v1"
    assert lines[1].startswith("green.png: green (")
    assert " | " in lines[1]  # two labels
