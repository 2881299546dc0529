#!/usr/bin/env bash
# Coverage-guided fuzzing (libFuzzer, with ASan and UBSan) of the native code's request handling.
#
#   scripts/fuzz.sh [SECONDS]     each target runs SECONDS (default 60), one after the other
#
# Builds every worker/native/fuzz/fuzz_*.cc and gateway/native/fuzz/fuzz_*.cc (convention in
# worker/native/fuzz/README.md) into that folder's build-fuzz/ (scripts/native.sh fuzz, the CMake
# build's fuzz variant), runs each from its checked-in corpus (fuzz/corpus/fuzz_NAME/; what it finds
# goes to a scratch folder, not into the tree), and prints its
# executions and coverage. Fails on any crash, sanitizer report, leak, timeout or out-of-memory;
# the input that did it is kept and its path printed. Installs clang and libFuzzer (apt-get) if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
CXX="${CXX_FUZZ:-clang++-14}"
if ! command -v "$CXX" >/dev/null || [[ ! -e "$("$CXX" -print-file-name=libclang_rt.fuzzer-x86_64.a)" \
      && -z "$(ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a 2>/dev/null)" ]]; then
  SUDO=""
  [[ "$(id -u)" == 0 ]] || SUDO="sudo -n"
  echo "installing clang-14 and libfuzzer-14-dev" >&2
  $SUDO apt-get install -y -q clang-14 libfuzzer-14-dev >/dev/null \
    || { $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q clang-14 libfuzzer-14-dev >/dev/null; }
fi
scratch="$(mktemp -d "${TMPDIR:-/tmp}/fovea-fuzz.XXXXXX")"
failed=0
summary=()

# run_target DIR NAME: fuzzes one target for $seconds and prints its figures.
run_target() {
  local dir="$1" name="$2" corpus="$1/fuzz/corpus/$2" work="$scratch/$2" log="$scratch/$2.log" rc=0
  mkdir -p "$work" "$corpus" "$scratch/$name-crash"
  echo "== $dir/fuzz/$name.cc: ${seconds}s" >&2
  "$dir/build-fuzz/$name" "$work" "$corpus" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$scratch/$name-crash/" >"$log" 2>&1 || rc=$?
  local execs cov
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)"
  cov="$(grep -E '^#[0-9]+' "$log" | tail -1 | grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+/[0-9a-zA-Z]+' || true)"
  summary+=("$name: ${execs:-?} executions in ${seconds}s, ${cov:-no coverage line}, exit $rc")
  if [[ $rc -ne 0 ]]; then
    failed=1
    echo "FAILED: $name (exit $rc); the input that did it: $(ls "$scratch/$name-crash/"* 2>/dev/null | head -3)" >&2
    grep -E -A25 'ERROR|runtime error|==[0-9]+==|deadly signal' "$log" | head -60 >&2 || tail -40 "$log" >&2
  fi
}

# The CMake build's fuzz variant (CMakeLists.txt): every fuzz/fuzz_*.cc of both parts into build-fuzz/.
CXX_FUZZ="$CXX" nice scripts/native.sh fuzz
for dir in worker/native gateway/native; do
  compgen -G "$dir/fuzz/fuzz_*.cc" >/dev/null || continue
  for src in "$dir"/fuzz/fuzz_*.cc; do run_target "$dir" "$(basename "$src" .cc)"; done
done
printf '%s\n' "${summary[@]}"
if [[ $failed -ne 0 ]]; then
  echo "fuzz: FAILED; logs and inputs in $scratch" >&2
  exit 1
fi
rm -rf "$scratch"
echo "fuzz: no findings"
