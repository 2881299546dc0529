"""Rendered overlays, once per test session (kubectl kustomize takes a fraction of a second each)."""

from __future__ import annotations

import pathlib

import pytest

from tests.deploy.manifests import OVERLAYS, Obj, render


@pytest.fixture(scope="session")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Obj]]:
    """Every overlay, plus gpu-prod with the external-redis component."""
    work: pathlib.Path = tmp_path_factory.mktemp("kustomize")
    out = {name: render(work, name) for name in OVERLAYS}
    out["gpu-prod+external-redis"] = render(work, "gpu-prod", ("external-redis",))
    return out
