#!/usr/bin/env bash
# Builds the gateway's native front (build/_fovea_gateway*.so, the cffi module Python imports) after an edit,
# without reinstalling:
# a thin wrapper of scripts/native.sh, the project's CMake build that `pip install .` and `pip install -e .`
# run (CMakeLists.txt). FOVEA_NATIVE_SANITIZE=1 builds the ASan/UBSan variant into build-asan/ instead.
set -euo pipefail
variant=release
[[ "${FOVEA_NATIVE_SANITIZE:-0}" == 1 ]] && variant=asan
exec "$(dirname "$0")/../../scripts/native.sh" "$variant" gateway
