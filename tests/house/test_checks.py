"""Each house check (scripts/check.sh, run by CI as its own step) fails on a deliberately broken file.

The checks run in a fresh clone with one planted fault at a time; the clone is put back after each.
The passing case is CI itself, which runs every step on the real tree.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess

import pytest

from tests.house.conftest import ROOT

BUF = ROOT / "protos" / "node_modules" / ".bin" / "buf"


def check(tree: pathlib.Path, step: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{ROOT / '.venv' / 'bin'}:{os.environ['PATH']}", "FOVEA_BUF": str(BUF)}
    cache = ROOT / ".mypy_cache"
    if step == "types" and cache.is_dir():
        # A copy of the tree's own cache (CI's types step leaves one): mypy then checks only what differs,
        # seconds instead of a minute or two from cold.
        copy = tree.parent / "mypy_cache"
        if not copy.exists():
            shutil.copytree(cache, copy)
        env["MYPY_CACHE_DIR"] = str(copy)
    return subprocess.run(
        ["bash", "scripts/check.sh", step], cwd=tree, env=env, capture_output=True, text=True, timeout=600
    )


def commit_all(tree: pathlib.Path, message: str) -> None:
    ident = ["-c", "user.name=test", "-c", "user.email=test@localhost"]
    subprocess.run(["git", "add", "-A"], cwd=tree, check=True)
    subprocess.run(["git", *ident, "commit", "-qm", message], cwd=tree, check=True)


PLANTS = {
    "lint": ("fovea/planted.py", '"""Planted."""\n\nimport os\n'),
    "format": ("fovea/planted.py", '"""Planted."""\n\nx = ( 1,2 )\n'),
    "types": ("fovea/planted.py", '"""Planted."""\n\nx: int = "not an int"\n'),
    "protos": ("protos/fovea/v1/planted.proto", 'syntax = "proto3";\npackage fovea.v1;\nmessage planted {}\n'),
}


@pytest.mark.skipif(not BUF.exists(), reason="buf comes with set-up (npm); scripts/setup.sh installs it")
@pytest.mark.parametrize("step", list(PLANTS))
def test_check_fails_on_a_planted_fault(fresh_clone: pathlib.Path, step: str) -> None:
    path, text = PLANTS[step]
    planted = fresh_clone / path
    planted.write_text(text)
    try:
        result = check(fresh_clone, step)
    finally:
        planted.unlink()
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"== {step} FAILED" in result.stderr
    assert "planted" in result.stdout + result.stderr


@pytest.mark.skipif(not BUF.exists(), reason="buf comes with set-up (npm); scripts/setup.sh installs it")
def test_protos_check_fails_on_a_breaking_change_since_the_previous_commit(
    tmp_path: pathlib.Path, fresh_clone: pathlib.Path
) -> None:
    tree = tmp_path / "tree"
    shutil.copytree(fresh_clone, tree)
    model = tree / "protos" / "fovea" / "v1" / "model.proto"
    text = model.read_text()
    assert "repeated ModelSummary models = 1;" in text
    model.write_text(text.replace("repeated ModelSummary models = 1;", "repeated ModelSummary models = 2;"))
    commit_all(tree, "renumber a field")
    result = check(tree, "protos")
    assert result.returncode == 1
    assert "ListModelsResponse" in result.stdout + result.stderr, result.stdout[-3000:] + result.stderr[-3000:]
