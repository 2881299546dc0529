#!/usr/bin/env bash
# Builds the gateway's native fast port (libfovea_gateway_front.so) from front.cc.
# Needs g++, pkg-config, Debian's libgrpc++-dev and libssl-dev (scripts/setup.sh installs them).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="$here/build"
mkdir -p "$out"
lib="$out/libfovea_gateway_front.so"
if [[ -f "$lib" && "$lib" -nt "$here/front.cc" && "$lib" -nt "$0" ]]; then
  echo "up to date: $lib"
  exit 0
fi
# Only the fg_* functions are exported: this library shares a process with grpcio's own gRPC core.
g++ -std=c++17 -O2 -fPIC -fvisibility=hidden -Wall $(pkg-config --cflags grpc++) -shared \
  -o "$lib.tmp" "$here/front.cc" -Wl,--exclude-libs,ALL $(pkg-config --libs grpc++ absl_synchronization) -lcrypto
mv "$lib.tmp" "$lib"
echo "built $lib"
