#!/usr/bin/env bash
# The main job on the embedded world: biased/robust classifiers x all eight VCE
# methods and two DiG-IN analyses (about ten minutes on 2 cores), results under
# runs/demo/, leaderboards and a report. Extra arguments go to `lit-vce demo`
# (e.g. --full for the complete 64-image benchmark).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/_setup.sh
exec .venv/bin/lit-vce demo "$@"
