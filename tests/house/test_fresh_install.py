"""A fresh clone installed exactly as the README's first command does, used from outside the repository.

This is the path a new user takes: `./scripts/setup.sh` once (never twice: a second run hid the bug
where the generated `inference` package was not mapped by the editable install), then the `fovea`
command from some other directory.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess

import pytest

from fovea.client import RegistryClient
from fovea.cluster import Cluster
from fovea.v1 import model_pb2
from tests.tinymodels import color_model

SUBCOMMANDS = [
    [],
    ["up"],
    ["classify"],
    ["explain"],
    ["model"],
    *[["model", action] for action in ("list", "show", "register", "promote", "rollback", "archive", "reencrypt")],
    ["model", "export"],
    ["model", "import-pretrained"],
    ["keys"],
    ["keys", "create"],
    ["keys", "list"],
    ["keys", "revoke"],
    ["train"],
    ["evaluate"],
    ["publish"],
    ["loadtest"],
]


@pytest.fixture(scope="module")
def installed(fresh_clone: pathlib.Path) -> pathlib.Path:
    """The clone after the README's set-up, run once; returns its `fovea` command."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}
    env["PATH"] = ":".join(p for p in env["PATH"].split(":") if ".venv" not in p)
    subprocess.run(["./scripts/setup.sh"], cwd=fresh_clone, env=env, check=True, timeout=1200)
    return fresh_clone / ".venv" / "bin" / "fovea"


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the first test also runs the set-up (a few minutes on 2 cores)
def test_every_subcommand_has_help_from_outside_the_repository(installed: pathlib.Path, tmp_path: pathlib.Path) -> None:
    failures = []
    for args in SUBCOMMANDS:
        result = subprocess.run(
            [str(installed), *args, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        if result.returncode != 0 or "usage:" not in result.stdout:
            failures.append(f"fovea {' '.join(args)} --help: exit {result.returncode}\n{result.stderr[-1500:]}")
    assert not failures, "\n".join(failures)


@pytest.mark.slow
@pytest.mark.timeout(1500)  # the first test also runs the set-up (a few minutes on 2 cores)
def test_loadtest_runs_against_a_live_cluster_from_outside_the_repository(
    installed: pathlib.Path, cluster: Cluster, tmp_path: pathlib.Path
) -> None:
    reg = cluster.start_registry()
    rc = RegistryClient(reg.address, cluster.admin_token)
    mv = rc.register(color_model(), model_pb2.ModelVersion(name="colors"))
    rc.set_alias("colors", "production", [(mv.version, 100)])
    _, secret = rc.create_key("infer")
    cluster.start_worker(reg.address, ["colors"])
    gw = cluster.start_gateway(reg.address)
    out = tmp_path / "report"
    result = subprocess.run(
        [str(installed), "loadtest", "classify", gw.address, "--model", "colors", "--api-key", secret]
        + ["--image-size", "32x32", "--duration-s", "3", "--warmup-s", "0.5", "--concurrency", "2"]
        + ["--no-plots", "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    report = json.loads((out / "result.json").read_text())
    assert sum(run["ok"] for run in report["runs"]) > 0, report["runs"]
