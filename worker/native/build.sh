#!/usr/bin/env bash
# Builds the native inference front (libfovea_front.so) from front.cc, check.cc, relay.cc, ort_loop.cc and the
# inference protos. Needs g++, pkg-config and Debian's libgrpc++-dev, protobuf-compiler-grpc
# (scripts/setup.sh installs them).
#
# FOVEA_NATIVE_SANITIZE=1 builds with AddressSanitizer and UndefinedBehaviorSanitizer into build-asan/
# instead of build/; FOVEA_NATIVE_BUILD=build-asan makes worker/fast_port.py load that one
# (scripts/sanitize.sh does both, and preloads the sanitizer runtimes Python needs for it).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
flags=(-O2)
out="$here/build"
if [[ "${FOVEA_NATIVE_SANITIZE:-0}" == 1 ]]; then
  flags=(-O1 -g -fsanitize=address,undefined -fno-sanitize-recover=undefined -fno-omit-frame-pointer)
  out="$here/build-asan"
fi
mkdir -p "$out/gen"
stamp="$out/gen/inference/grpc_predict_v2.grpc.pb.h"
if [[ ! -f "$stamp" || "$root/protos/inference/grpc_predict_v2.proto" -nt "$stamp" \
      || "$root/protos/inference/model_config.proto" -nt "$stamp" ]]; then
  protoc -I"$root/protos" --cpp_out="$out/gen" --grpc_out="$out/gen" \
    --plugin=protoc-gen-grpc="$(command -v grpc_cpp_plugin)" \
    inference/grpc_predict_v2.proto inference/model_config.proto
fi
srcs=("$here/front.cc" "$here/check.cc" "$here/relay.cc" "$here/ort_loop.cc" "$out"/gen/inference/*.cc)
# With ccache installed (scripts/setup.sh), compiling unchanged sources again (another clone, a second set-up)
# is a cache hit; CCACHE_BASEDIR makes this clone's absolute paths relative, so clones elsewhere share entries.
cxx=(g++)
if command -v ccache >/dev/null 2>&1; then
  cxx=(ccache g++)
  export CCACHE_BASEDIR="$root"
fi
objs=()
pids=()
for src in "${srcs[@]}"; do
  obj="$out/$(basename "$src" .cc).o"
  objs+=("$obj")
  if [[ ! -f "$obj" || "$src" -nt "$obj" || "$here/front.h" -nt "$obj" || "$here/check.h" -nt "$obj" || "$here/relay.h" -nt "$obj" \
        || "$0" -nt "$obj" ]]; then
    "${cxx[@]}" -std=c++17 "${flags[@]}" -fPIC -fvisibility=hidden -I"$out/gen" $(pkg-config --cflags grpc++ protobuf) \
      -c "$src" -o "$obj" &
    pids+=($!)
  fi
done
for pid in "${pids[@]}"; do wait "$pid"; done  # a failed compile fails the build
# Only the fv_* functions are exported: this library shares a process with grpcio's own gRPC core.
g++ -shared "${flags[@]}" -o "$out/libfovea_front.so.tmp" "${objs[@]}" -Wl,--exclude-libs,ALL \
  $(pkg-config --libs grpc++ protobuf absl_synchronization)
mv "$out/libfovea_front.so.tmp" "$out/libfovea_front.so"
# The probe that proves each entry of ort_api.h against the real library (tests/worker/test_ort_api.py).
if [[ ! -f "$out/ort_probe" || "$here/ort_probe.cc" -nt "$out/ort_probe" || "$here/ort_api.h" -nt "$out/ort_probe" \
      || "$0" -nt "$out/ort_probe" ]]; then
  "${cxx[@]}" -std=c++17 "${flags[@]}" -Wall -Wextra -o "$out/ort_probe" "$here/ort_probe.cc" -ldl
fi
echo "built $out/libfovea_front.so and $out/ort_probe"
