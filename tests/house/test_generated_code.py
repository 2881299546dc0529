"""Generated code is made by set-up and builds only: importing Fovea never writes into the tree."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys


def snapshot(tree: pathlib.Path) -> set[str]:
    return {str(p.relative_to(tree)) for p in tree.rglob("*") if ".git" not in p.relative_to(tree).parts}


def test_import_without_generated_code_leaves_the_tree_unchanged_and_says_what_to_run(
    fresh_clone: pathlib.Path,
) -> None:
    assert not (fresh_clone / "inference").exists() and not (fresh_clone / "fovea" / "v1").exists()
    before = snapshot(fresh_clone)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": str(fresh_clone)}
    for module in ("fovea.client", "loadtest.targets"):
        result = subprocess.run(
            [sys.executable, "-c", f"import {module}"],
            cwd=fresh_clone,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode != 0, module
        assert "run `python -m fovea.codegen`" in result.stderr, result.stderr[-2000:]
    assert snapshot(fresh_clone) == before
    assert (
        subprocess.run(["git", "status", "--porcelain", "--ignored"], cwd=fresh_clone, capture_output=True).stdout
        == b""
    )

    # What the message says to run makes the import work.
    subprocess.run([sys.executable, "-m", "fovea.codegen"], cwd=fresh_clone, env=env, check=True, timeout=120)
    done = subprocess.run(
        [sys.executable, "-c", "import fovea.client, loadtest.targets"], cwd=fresh_clone, env=env, timeout=60
    )
    assert done.returncode == 0
