#!/usr/bin/env bash
# Builds the gateway's native front (libfovea_gateway_front.so), the server of its one gRPC port, from front.cc
# (and classify.h, which it includes).
# Needs g++, pkg-config, Debian's libgrpc++-dev and libssl-dev (scripts/setup.sh installs them).
#
# FOVEA_NATIVE_SANITIZE=1 builds with AddressSanitizer and UndefinedBehaviorSanitizer into build-asan/
# instead of build/; FOVEA_NATIVE_BUILD=build-asan makes gateway/fast_port.py load that one (scripts/sanitize.sh).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
flags=(-O2)
out="$here/build"
if [[ "${FOVEA_NATIVE_SANITIZE:-0}" == 1 ]]; then
  flags=(-O1 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer)
  out="$here/build-asan"
fi
mkdir -p "$out"
lib="$out/libfovea_gateway_front.so"
if [[ -f "$lib" && "$lib" -nt "$here/front.cc" && "$lib" -nt "$here/classify.h" && "$lib" -nt "$0" ]]; then
  echo "up to date: $lib"
  exit 0
fi
# With ccache installed (scripts/setup.sh), compiling unchanged sources again (another clone, a second set-up)
# is a cache hit; CCACHE_BASEDIR makes this clone's absolute paths relative, so clones elsewhere share entries.
cxx=(g++)
if command -v ccache >/dev/null 2>&1; then
  cxx=(ccache g++)
  export CCACHE_BASEDIR="$(cd "$here/../.." && pwd)"
fi
"${cxx[@]}" -std=c++17 "${flags[@]}" -fPIC -fvisibility=hidden -Wall $(pkg-config --cflags grpc++) \
  -c "$here/front.cc" -o "$out/front.o"
# Only the fg_* functions are exported: this library shares a process with grpcio's own gRPC core.
g++ -shared "${flags[@]}" -o "$lib.tmp" "$out/front.o" -Wl,--exclude-libs,ALL \
  $(pkg-config --libs grpc++ absl_synchronization) -lcrypto
mv "$lib.tmp" "$lib"
echo "built $lib"
