#!/usr/bin/env bash
# Shared set-up of demo.sh and test.sh: create .venv on first use and install the
# package with every extra, the test tools and the documentation tools, at the exact versions of
# constraints.txt (the set the tests ran on; pyproject.toml holds the ranges).
# robustbench comes last with --no-deps: its only release pins timm==1.0.9, which
# cannot load from the hub beside current diffusers (README, Installation).
# Skips the install when pyproject.toml and constraints.txt are unchanged.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.install-stamp
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing lit_vce and its dependencies into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -c constraints.txt -e ".[all,test,docs]"
  .venv/bin/python -m pip install -q -c constraints.txt --no-deps robustbench
  echo "$want" > "$stamp"
else
  echo "[setup] .venv is up to date"
fi
