"""Writes the C source of a cffi extension module (API mode) from a native part's interface header.

    python scripts/cffi_module.py MODULE HEADER OUT.c

The header is the one declaration of the interface: the C++ that implements it includes it (so the compiler
checks each definition against it), and the module generated here includes it too, so the C compiler checks
every call Python makes through the module against the same declarations. Nothing is counted by hand.

cffi reads C declarations only: preprocessor lines and the `extern "C"` wrapper inside `#ifdef __cplusplus`
are left out of what it reads (the compiler still sees the whole header). CMakeLists.txt runs this at build
time and compiles OUT.c with the part's sources into one extension module.
"""

from __future__ import annotations

import pathlib
import re
import sys

import cffi


def declarations(text: str) -> str:
    """The header without preprocessor lines, C++-only blocks or comments, for cffi's cdef."""
    out: list[str] = []
    skipping = 0
    for line in text.splitlines():
        stripped = line.strip()
        if skipping:
            if stripped.startswith("#if"):
                skipping += 1
            elif stripped.startswith("#endif"):
                skipping -= 1
            continue
        if stripped.startswith("#ifdef __cplusplus"):
            skipping = 1
            continue
        if stripped.startswith("#"):
            continue
        out.append(line)
    body = "\n".join(out)
    body = re.sub(r"/\*.*?\*/", "", body, flags=re.S)
    return re.sub(r"//[^\n]*", "", body)


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print(__doc__, file=sys.stderr)
        return 2
    module, header, out = argv[1], pathlib.Path(argv[2]), pathlib.Path(argv[3])
    ffi = cffi.FFI()
    ffi.cdef(declarations(header.read_text()))
    ffi.set_source(module, f'#include "{header.name}"')
    out.parent.mkdir(parents=True, exist_ok=True)
    ffi.emit_c_code(str(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
