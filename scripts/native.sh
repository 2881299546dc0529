#!/usr/bin/env bash
# Builds the native parts with the project's CMake build (CMakeLists.txt), as `pip install -e .` does,
# for development after editing C++ and for the sanitizer and fuzzing variants:
#
#   scripts/native.sh [release|asan|fuzz] [gateway] [worker]     (default: release, both parts)
#
# release -> <part>/native/build/, asan -> build-asan/ (scripts/sanitize.sh), fuzz -> build-fuzz/ with
# clang ($CXX_FUZZ, default clang++-14; scripts/fuzz.sh). The CMake folder is build/native/<variant>/,
# as deep as pip's build/<state>/<wheel tag>/, so ccache serves the same compiles to both.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
variant="${1:-release}"
[[ $# -gt 0 ]] && shift
case "$variant" in
  release | asan | fuzz) ;;
  *) echo "usage: scripts/native.sh [release|asan|fuzz] [gateway] [worker]" >&2; exit 2 ;;
esac
parts="gateway;worker"
if [[ $# -gt 0 ]]; then parts="$(IFS=';'; echo "$*")"; fi
dir="$root/build/native/$variant"
args=(-S "$root" -B "$dir" -DFOVEA_NATIVE_VARIANT="$variant" -DFOVEA_NATIVE_PARTS="$parts")
if [[ "$variant" == fuzz ]]; then
  args+=(-DCMAKE_CXX_COMPILER="${CXX_FUZZ:-clang++-14}")
fi
if [[ ! -f "$dir/CMakeCache.txt" ]] && command -v ninja >/dev/null 2>&1; then
  args+=(-G Ninja)
fi
# Configure once per folder and set of parts (pkg-config takes seconds); the build re-runs CMake itself
# when CMakeLists.txt changes or a source file is added.
if ! grep -qxF "FOVEA_NATIVE_PARTS:STRING=$parts" "$dir/CMakeCache.txt" 2>/dev/null; then
  cmake "${args[@]}" >/dev/null
fi
cmake --build "$dir" --parallel "$(nproc)"
