#!/usr/bin/env bash
# Builds the worker's and the gateway's native code with AddressSanitizer and UndefinedBehaviorSanitizer
# (the CMake build's asan variant: build-asan/ beside each build/) and runs the native tests against that build. Fails on a failing test
# and on any sanitizer report, from this process or any it started (reports are logged to files).
#
#   scripts/sanitize.sh [pytest arguments]     (default: the native tests below)
#
# Python loads the native code into its own process (the gateway's and the worker's cffi modules), so the
# sanitizer runtimes must be loaded first (LD_PRELOAD).
# Leak detection is off: the interpreter keeps its objects until exit by design.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
nice scripts/native.sh asan  # the CMake build's asan variant (CMakeLists.txt), both parts
scripts/ort_gpu_library.sh  # test_ort_api.py proves the CUDA provider's entries on onnxruntime-gpu's library
tests=("$@")
if [[ ${#tests[@]} -eq 0 ]]; then
  tests=(tests/worker/test_fast_port.py tests/worker/test_hostile_requests.py tests/worker/test_ort_api.py
         tests/worker/test_image_path.py tests/worker/test_typed_contents.py tests/worker/test_buckets.py
         tests/worker/test_native_cuda.py
         tests/gateway/test_fast_port.py tests/gateway/test_native_classify.py tests/gateway/test_forward.py
         tests/gateway/test_native_binding.py)
fi
logs="$(mktemp -d "${TMPDIR:-/tmp}/fovea-sanitize.XXXXXX")"
export FOVEA_NATIVE_BUILD=build-asan
export LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libubsan.so)"
# ASan writes its reports to files under $logs (log_path); GCC's UBSan ignores log_path, so its reports
# go to stderr: --capture=sys leaves native writes to fd 2 uncaptured, and stderr is kept in $logs too.
# Services the tests start as processes log under --basetemp, which is searched as well.
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:abort_on_error=1:log_path=$logs/asan"
export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1"
status=0
# A time limit: a test that fails can leave a server thread that keeps the interpreter from exiting.
timeout -k 10 "${FOVEA_SANITIZE_TIMEOUT_S:-900}" \
  python -m pytest -q -p no:cacheprovider --capture=sys --basetemp="$logs/tmp" "${tests[@]}" \
  2> >(tee "$logs/stderr" >&2) || status=$?
unset LD_PRELOAD
pattern='runtime error:|ERROR: AddressSanitizer|SUMMARY: [A-Za-z]+Sanitizer'
if found="$(grep -rlE "$pattern" "$logs")"; then
  echo "sanitizer reports in:" >&2
  for f in $found; do
    echo "==> $f" >&2
    grep -E -A30 "$pattern" "$f" | head -80 >&2
  done
  status=1
fi
if [[ $status -eq 0 ]]; then
  rm -rf "$logs"
  echo "sanitize: native tests pass under ASan and UBSan, no reports"
else
  echo "sanitize: FAILED (exit $status); logs kept in $logs" >&2
fi
exit $status
