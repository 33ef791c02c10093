#!/usr/bin/env bash
# The main job on the embedded world: biased/robust classifiers x classifier
# guidance/DVCE, results under runs/demo/ and a leaderboard. Extra arguments go
# to `lit-vce demo` (e.g. --num-samples 32).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/_setup.sh
exec .venv/bin/lit-vce demo "$@"
