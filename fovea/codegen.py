"""Generate Python code from protos/ with grpcio-tools.

Generated modules land beside the hand-written code (fovea/v1/, inference/)
and are never committed or edited. Set-up (scripts/setup.sh) and the image
builds run `python -m fovea.codegen`; importing Fovea never writes files, it
only checks (`require`) and says what to run.
"""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"


def proto_files() -> list[pathlib.Path]:
    return sorted(PROTOS.rglob("*.proto"))


def is_stale() -> bool:
    """True when any generated module is missing or older than its proto."""
    for proto in proto_files():
        rel = proto.relative_to(PROTOS).with_suffix("")
        out = ROOT / f"{rel}_pb2.py"
        if not out.exists() or out.stat().st_mtime < proto.stat().st_mtime:
            return True
    return False


def generate() -> None:
    import grpc_tools
    from grpc_tools import protoc

    include = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "protoc",
        f"-I{PROTOS}",
        f"-I{include}",
        f"--python_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        f"--pyi_out={ROOT}",
        *[str(p) for p in proto_files()],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    for proto in proto_files():
        pkg = ROOT / proto.relative_to(PROTOS).parent
        while pkg != ROOT:
            (pkg / "__init__.py").touch(exist_ok=True)
            pkg = pkg.parent


class StubsMissing(ImportError):
    """The generated gRPC modules are missing or older than protos/."""


def require() -> None:
    """Raise StubsMissing, saying what to run, unless the generated modules are current."""
    if is_stale():
        raise StubsMissing(
            f"the Python code generated from {PROTOS} is missing or older than the protos; "
            f"run `python -m fovea.codegen` in {ROOT} (scripts/setup.sh does)"
        )


if __name__ == "__main__":
    generate()
    sys.exit(0)
