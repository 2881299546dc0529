#!/usr/bin/env bash
# Builds the gateway's native fast port (libfovea_gateway_front.so) from front.cc.
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
if [[ -f "$lib" && "$lib" -nt "$here/front.cc" && "$lib" -nt "$0" ]]; then
  echo "up to date: $lib"
  exit 0
fi
# Only the fg_* functions are exported: this library shares a process with grpcio's own gRPC core.
g++ -std=c++17 "${flags[@]}" -fPIC -fvisibility=hidden -Wall $(pkg-config --cflags grpc++) -shared \
  -o "$lib.tmp" "$here/front.cc" -Wl,--exclude-libs,ALL $(pkg-config --libs grpc++ absl_synchronization) -lcrypto
mv "$lib.tmp" "$lib"
echo "built $lib"
