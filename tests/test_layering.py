"""The layers, read from the imports of every Python file (nothing is imported or run).

- fovea, the shared core, imports no service and none of the tools built on top of it. The generated
  stubs in fovea/v1 are left out; they import only themselves and protobuf.
- gateway, worker and registry import fovea and the generated stubs, never each other, training,
  loadtest, bench or tests.
- training and loadtest import no service, and not each other, bench or tests.
- Among the packages that ship (fovea, the services, training, loadtest, inference), only training
  imports torch. bench and tests may, since they measure and check training.

An import is any `import` or `from ... import` anywhere in a file: at the top, inside a function, under
`if TYPE_CHECKING:`; relative imports are resolved to their package. A file that calls
`importlib.import_module` or `__import__` is also taken to import every dotted first-party module name
written in it as a string (`"training.cli"`), since that is how such a table of commands is written.
"""

from __future__ import annotations

import ast
import pathlib
import re
from collections.abc import Iterator

ROOT = pathlib.Path(__file__).resolve().parents[1]

SERVICES = ("gateway", "worker", "registry")
TOOLS = ("training", "loadtest", "bench", "tests")
FIRST_PARTY = ("fovea", *SERVICES, *TOOLS, "inference")
SHIPPED = ("fovea", *SERVICES, "training", "loadtest", "inference")
TORCH = ("torch", "torchvision", "torchaudio")

# The `fovea` command is a tool on top of the core that happens to live in the core's folder: its
# subcommands `train`, `evaluate`, `publish`, `model export|import-pretrained` run training's code and
# `loadtest` runs loadtest's, both imported only when that subcommand runs; `fovea up` exports the
# pretrained model with training on its first run. These exact imports are allowed there and nowhere
# else in fovea/; anything more in these files, or in any other core file, fails.
CORE_EXCEPTIONS = {
    "fovea/cli.py": {"training", "loadtest"},
    "fovea/up.py": {"training"},
}

_DOTTED = re.compile("^(" + "|".join(FIRST_PARTY) + r")(\.\w+)+$")


def _package_of(path: pathlib.Path) -> str:
    return path.relative_to(ROOT).parts[0]


def _module_parts(path: pathlib.Path) -> list[str]:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imported_modules(path: pathlib.Path, source: str | None = None) -> Iterator[str]:
    """Every module name the file imports, absolute."""
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    package = _module_parts(path)
    if path.name != "__init__.py":
        package = package[:-1]
    dynamic = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                yield ".".join([*base, *([node.module] if node.module else [])])
            else:
                yield node.module or ""
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in ("import_module", "__import__"):
                dynamic = True
                if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                    yield node.args[0].value
    if dynamic:
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and _DOTTED.match(node.value):
                yield node.value


def imported_packages(path: pathlib.Path, source: str | None = None) -> set[str]:
    return {name.split(".")[0] for name in imported_modules(path, source) if name}


def python_files(package: str) -> list[pathlib.Path]:
    files = sorted((ROOT / package).rglob("*.py"))
    return [f for f in files if "node_modules" not in f.parts and ".venv" not in f.parts]


def _rel(path: pathlib.Path) -> str:
    return path.relative_to(ROOT).as_posix()


def core_violations(path: pathlib.Path, source: str | None = None) -> set[str]:
    """The packages a fovea/ file imports that the core may not."""
    bad = imported_packages(path, source) & {*SERVICES, *TOOLS}
    return bad - CORE_EXCEPTIONS.get(_rel(path), set())


def _core_files() -> list[pathlib.Path]:
    return [f for f in python_files("fovea") if (ROOT / "fovea" / "v1") not in f.parents]


def test_the_scan_sees_the_tree() -> None:
    core = _core_files()
    assert len(core) >= 10 and (ROOT / "fovea" / "errors.py") in core
    assert not any((ROOT / "fovea" / "v1") in f.parents for f in core)
    for package in (*SERVICES, "training", "loadtest"):
        assert python_files(package), package
    # The CLI's delegated subcommands are found through the string table it imports them by.
    assert {"training", "loadtest"} <= imported_packages(ROOT / "fovea" / "cli.py")


def test_the_core_imports_no_service_and_no_tool() -> None:
    found = {_rel(f): sorted(bad) for f in _core_files() if (bad := core_violations(f))}
    assert not found, f"fovea/ is the shared core and may not import these: {found}"


def test_the_exceptions_are_still_needed() -> None:
    # An exception that nothing uses any more should go, so that the rule tightens again.
    for rel, allowed in CORE_EXCEPTIONS.items():
        used = imported_packages(ROOT / rel) & allowed
        assert used == allowed, f"{rel} no longer imports {sorted(allowed - used)}: narrow CORE_EXCEPTIONS"


def test_services_import_only_the_core() -> None:
    found: dict[str, list[str]] = {}
    for service in SERVICES:
        others = {*SERVICES, *TOOLS} - {service}
        for f in python_files(service):
            if bad := imported_packages(f) & others:
                found[_rel(f)] = sorted(bad)
    assert not found, f"a service imports fovea and the generated stubs only: {found}"


def test_training_and_loadtest_import_no_service() -> None:
    found: dict[str, list[str]] = {}
    for tool in ("training", "loadtest"):
        others = {*SERVICES, *TOOLS} - {tool}
        for f in python_files(tool):
            if bad := imported_packages(f) & others:
                found[_rel(f)] = sorted(bad)
    assert not found, f"training and loadtest import fovea and the generated stubs only: {found}"


def test_only_training_imports_torch() -> None:
    found: dict[str, list[str]] = {}
    for package in SHIPPED:
        if package == "training" or not (ROOT / package).is_dir():
            continue
        for f in python_files(package):
            if bad := imported_packages(f) & set(TORCH):
                found[_rel(f)] = sorted(bad)
    assert not found, f"only training imports torch: {found}"
    assert any(imported_packages(f) & set(TORCH) for f in python_files("training"))


def test_the_rule_catches_a_new_import() -> None:
    # What the checks above would say about fovea/errors.py with one more import at the top, in a
    # function, relative, or by name.
    errors = ROOT / "fovea" / "errors.py"
    source = errors.read_text()
    for extra, package in [
        ("import gateway\n", "gateway"),
        ("from worker.config import WorkerConfig\n", "worker"),
        ("def f():\n    import training.train\n", "training"),
        ("def f():\n    from registry import service\n", "registry"),
        ("import importlib\nimportlib.import_module('loadtest.cli')\n", "loadtest"),
        ("import torch\n", "torch"),
    ]:
        imported = imported_packages(errors, source + "\n" + extra)
        assert package in imported, extra
        if package != "torch":
            assert core_violations(errors, source + "\n" + extra) == {package}, extra
    # The same addition to the CLI is caught too, unless it is one of its two allowed packages.
    cli = ROOT / "fovea" / "cli.py"
    assert core_violations(cli, cli.read_text() + "\nimport gateway\n") == {"gateway"}
    # A relative import resolves to its package.
    relative = ROOT / "gateway" / "routing.py"
    assert "gateway" in imported_packages(relative, "from . import config\n")
    assert "fovea" in imported_packages(ROOT / "fovea" / "v1" / "__init__.py", "from .. import errors\n")
