"""Fixtures for the tests of the project's own machinery: set-up, checks, generated code."""

from __future__ import annotations

import pathlib
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def clone(dest: pathlib.Path) -> pathlib.Path:
    """A fresh clone of this repository's committed state, as CI and a new user get it."""
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True, timeout=120)
    return dest


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    return clone(tmp_path_factory.mktemp("clone") / "fovea")
