"""A regular `pip install .` builds the native parts and carries them inside the installed packages, where
the services load them from; an editable one (what set-up makes) builds them into the source tree.

The install goes into a throwaway virtual environment, with `--no-deps`: the dependencies come from this
interpreter's site-packages, added to the throwaway one's path by a `.pth` line (a plain path line, so the
editable install of this tree that lives there is not activated). Everything is imported from outside the
clone, so nothing can come from the source tree.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import sysconfig
from typing import Any

import pytest

from tests.house.conftest import ROOT

PACKAGES = ["fovea", "gateway", "worker", "registry", "training", "loadtest", "inference"]
# part: (binding, symbol): the cffi module each part's Python reaches its native code through (fovea.native)
BINDINGS = {"gateway": ("_fovea_gateway", "fg_start"), "worker": ("_fovea_worker", "fv_start")}

PROBE = """
import importlib, importlib.metadata, json, pathlib, sys, sysconfig
import fovea.native
site = pathlib.Path(sysconfig.get_paths()["purelib"]).resolve()
out = {"outside": [], "libraries": {}, "available": {}}
for name in %(packages)r:
    module = importlib.import_module(name)
    if not pathlib.Path(module.__file__).resolve().is_relative_to(site):
        out["outside"].append(f"{name}: {module.__file__}")
for part, (module, symbol) in %(bindings)r.items():
    folder = pathlib.Path(importlib.import_module(part).__file__).parent
    path = fovea.native.binding_path(folder, module)
    getattr(fovea.native.load_binding(folder, module)[1], symbol)
    out["libraries"][part] = str(path)
    out["available"][part] = importlib.import_module(part + ".fast_port").available()
import fovea.v1.model_pb2, inference.grpc_predict_v2_pb2
out["files"] = sorted(str(f) for f in importlib.metadata.files("fovea"))
print(json.dumps(out))
"""


def expected_modules(tree: pathlib.Path) -> set[str]:
    """The .py files of the regular packages (folders with __init__.py down from each top-level package)."""
    found = set()
    for top in PACKAGES:
        for init in (tree / top).rglob("__init__.py"):
            folder = init.parent
            chain = [folder, *folder.relative_to(tree).parents][:-1]
            if all((tree / p / "__init__.py").exists() for p in chain):
                found |= {str(f.relative_to(tree)) for f in folder.glob("*.py")}
    return found


def throwaway_venv(where: pathlib.Path) -> tuple[pathlib.Path, pathlib.Path]:
    """A venv whose path ends with this interpreter's site-packages; returns its python and site-packages."""
    subprocess.run([sys.executable, "-m", "venv", str(where)], check=True, timeout=300)
    python = where / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (pathlib.Path(site) / "shared-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python, pathlib.Path(site)


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHONPATH"))}


@pytest.mark.slow
@pytest.mark.timeout(900)  # the build itself is ccache hits; the venv and pip take most of it
def run_probe(python: pathlib.Path, packages: list[str], cwd: pathlib.Path, env: dict[str, str]) -> dict[str, Any]:
    """PROBE run by the installed interpreter from outside the clone: what it found, as JSON."""
    probe = subprocess.run(
        [str(python), "-c", PROBE % {"packages": packages, "bindings": BINDINGS}],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert probe.returncode == 0, probe.stderr[-5000:]
    found: dict[str, Any] = json.loads(probe.stdout.strip().splitlines()[-1])
    return found


def test_a_regular_install_carries_native_libraries_that_load(
    fresh_clone: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    env = clean_env()
    # The stubs come first, as in set-up and the images: they are packed from the tree.
    subprocess.run([sys.executable, "-m", "fovea.codegen"], cwd=fresh_clone, env=env, check=True, timeout=120)
    venv = tmp_path / "venv"
    python, site = throwaway_venv(venv)
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", str(fresh_clone)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=780,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-5000:]

    found = run_probe(python, PACKAGES, tmp_path, env)
    assert not found["outside"], found["outside"]
    assert found["available"] == {"gateway": True, "worker": True}
    for part, path in found["libraries"].items():
        assert pathlib.Path(path).resolve().is_relative_to(site.resolve()), (part, path)

    # Package discovery as before: every module of the regular packages, generated stubs included, and
    # besides them only the stubs' .pyi files and the two bindings; no C++ sources, corpora or READMEs.
    # (pip's byte-code and the console script outside site-packages are in the record too)
    files = [f for f in found["files"] if not f.startswith("..") and not f.endswith(".pyc") and ".dist-info/" not in f]
    modules = {f for f in files if f.endswith(".py")}
    assert modules == expected_modules(fresh_clone)
    others = sorted(f for f in files if not f.endswith((".py", ".pyi")))
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    assert others == [f"gateway/native/build/_fovea_gateway{suffix}", f"worker/native/build/_fovea_worker{suffix}"]
    assert not [f for f in files if f.endswith(".pyi") and not f.startswith(("fovea/v1/", "inference/"))]

    # The console script, run from outside the clone.
    help_ = subprocess.run(
        [str(venv / "bin" / "fovea"), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert help_.returncode == 0 and "usage:" in help_.stdout, help_.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_an_editable_install_builds_into_the_tree_and_leaves_pythonpath_first(
    fresh_clone: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    env = clean_env()
    subprocess.run([sys.executable, "-m", "fovea.codegen"], cwd=fresh_clone, env=env, check=True, timeout=120)
    python, _ = throwaway_venv(tmp_path / "venv")
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-deps", "-e", str(fresh_clone)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=780,
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-5000:]
    where = "import gateway, worker, inference; print(gateway.__file__, worker.__file__, inference.__file__)"
    for pythonpath, tree in (None, fresh_clone), (str(ROOT), ROOT):
        probe = subprocess.run(
            [str(python), "-c", where],
            cwd=tmp_path,
            env=env if pythonpath is None else {**env, "PYTHONPATH": pythonpath},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert probe.returncode == 0, probe.stderr[-3000:]
        # Installed editable, the clone's code is imported; with PYTHONPATH naming another tree, that one's.
        assert all(pathlib.Path(f).is_relative_to(tree) for f in probe.stdout.split()), (pythonpath, probe.stdout)
    found = run_probe(python, ["gateway", "worker"], tmp_path, env)
    assert found["available"] == {"gateway": True, "worker": True}
    for part, (module, _) in BINDINGS.items():
        built = f"{module}{sysconfig.get_config_var('EXT_SUFFIX')}"
        assert found["libraries"][part] == str(fresh_clone / part / "native" / "build" / built)
