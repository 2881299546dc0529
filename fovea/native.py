"""Loads a native part's Python binding: the cffi extension module CMakeLists.txt builds from
<part>/native/api.h into <part>/native/<build folder>/ (fovea_binding there)."""

from __future__ import annotations

import functools
import importlib.machinery
import importlib.util
import os
import pathlib
from typing import Any


def build_folder() -> str:
    """FOVEA_NATIVE_BUILD picks another build folder: build-asan is the sanitizer build (scripts/sanitize.sh)."""
    return os.environ.get("FOVEA_NATIVE_BUILD", "") or "build"


def binding_path(part_dir: pathlib.Path, module: str) -> pathlib.Path:
    """Where the module is (or would be): the first of this interpreter's extension suffixes found."""
    folder = part_dir / "native" / build_folder()
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = folder / f"{module}{suffix}"
        if path.exists():
            return path
    return folder / f"{module}{importlib.machinery.EXTENSION_SUFFIXES[0]}"


@functools.cache
def load_binding(part_dir: pathlib.Path, module: str) -> tuple[Any, Any]:
    """(ffi, lib) of the module, loaded once per process; RuntimeError saying how to build it when it is missing."""
    path = binding_path(part_dir, module)
    if not path.exists():
        raise RuntimeError(f"{path} is missing: build the native parts (scripts/setup.sh, or scripts/native.sh)")
    spec = importlib.util.spec_from_file_location(module, path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"{path} is not a Python extension module")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.ffi, mod.lib
