#!/usr/bin/env bash
# Set up .venv (first use) and run the test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/_setup.sh
exec .venv/bin/python -m pytest "$@"
