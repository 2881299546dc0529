#!/usr/bin/env bash
# The house checks, one named step each: lint, format, protos, types (default: all of them, in
# that order). CI runs them as separate steps (.ci/run); pre-commit runs the same script.
#   scripts/check.sh [lint|format|protos|types ...]
# FOVEA_BUF_AGAINST: what `buf breaking` compares protos/ with (default: the previous commit).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] && PATH="$PWD/.venv/bin:$PATH"
BUF=$(realpath -m "${FOVEA_BUF:-protos/node_modules/.bin/buf}")

lint() { ruff check .; }
format() { ruff format --check .; }
types() { python -m mypy; }
protos() {
  if [ ! -x "$BUF" ]; then
    (cd protos && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  fi
  (cd protos && "$BUF" lint)
  local against=${FOVEA_BUF_AGAINST:-}
  if [ -z "$against" ]; then
    if ! git rev-parse -q --verify HEAD~1 >/dev/null; then
      echo "buf breaking: no previous commit to compare with (shallow clone?); set FOVEA_BUF_AGAINST" >&2
      return 1
    fi
    against=".git#ref=HEAD~1,subdir=protos"
  fi
  "$BUF" breaking protos --against "$against"
}

steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(lint format protos types)
for step in "${steps[@]}"; do
  case "$step" in
    lint | format | protos | types) ;;
    *) echo "unknown step '$step' (lint, format, protos, types)" >&2; exit 2 ;;
  esac
  start=$(date +%s)
  echo "== $step"
  # Not `if ! "$step"`: inside a condition bash ignores `set -e`, and a step would go on past a failure.
  set +e
  (set -e; "$step")
  rc=$?
  set -e
  if [ "$rc" != 0 ]; then
    echo "== $step FAILED after $(($(date +%s) - start)) s" >&2
    exit 1
  fi
  echo "== $step ok in $(($(date +%s) - start)) s"
done
