#!/usr/bin/env bash
# One command on one GPU (estimate, never run on one: <= 10 min on an H100/H200-class card, 1-2 of them
# compiling 4 shapes of B/4), one JSON report:
#   bash scripts/gpu_check.sh [--dry-run] [REPORT_JSON]        (default runs/gpu_check.json)
# 1. installs the pure-Python wheels the GPU image lacks from carry/ (`make gpu-wheels` fills it here)
#    with pip --no-index --no-deps (skipped when they import already);
# 2. runs the gpu-marked tests (tests/test_gpu.py);
# 3. scripts/gpu_check.py: XL/4 sampling (Euler 30 + CFG, Dopri5; batch 16; bf16 and fp32) s/image, peak
#    memory, bf16 vs fp32 agreement, T2I-XL/4 1024 px bf16 sampling memory (batch 1, 3) against its estimate,
#    and the imagenet256_xl4_24gb training figures (3 steps);
# 4. compiled against eager sampling (scripts/benchmark.py --sampling [--compile]): B/4 at 256 px, bf16, Euler
#    10 steps a stage, batch 16; compile time apart from the steady-state speed.
# --dry-run: nothing installed, the tests listed only, gpu_check.py and the compile comparison at tiny sizes on CPU.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && { DRY_RUN=1; shift; }
REPORT="${1:-$ROOT/runs/gpu_check.json}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PYTHON" ]] || PYTHON=python3   # the GPU image has no .venv
DRY_FLAG=(); (( DRY_RUN )) && DRY_FLAG=(--dry-run)
mkdir -p "$(dirname "$REPORT")"
TMP="$(mktemp -d)"; trap 'rm -rf "$TMP"' EXIT
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if (( ! DRY_RUN )) && ! "$PYTHON" -c "import hydra, omegaconf, torch_fidelity, webdataset" 2>/dev/null; then
  ls "$ROOT"/carry/*.whl >/dev/null 2>&1 || { echo "[gpu_check] no wheels in carry/: run 'make gpu-wheels' first" >&2; exit 1; }
  "$PYTHON" -m pip install -q --no-index --no-deps "$ROOT"/carry/*.whl
fi

if (( DRY_RUN )); then
  timeout 120 "$PYTHON" -m pytest -q --collect-only tests/test_gpu.py > "$TMP/pytest.txt" 2>&1 && rc=0 || rc=$?
else
  timeout 300 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py > "$TMP/pytest.txt" 2>&1 && rc=0 || rc=$?
fi
"$PYTHON" scripts/gpu_check.py ${DRY_FLAG[@]+"${DRY_FLAG[@]}"} --out "$TMP/measure.json"
BENCH=(--sampling --model B/4 --device cuda --sample-batch 16 --sample-steps 10 --methods euler --repeats 3)
(( DRY_RUN )) && BENCH=(--sampling --model Test/2 --num-stages 2 --device cpu --sample-batch 2 --sample-steps 2 --methods euler --repeats 1)
"$PYTHON" scripts/benchmark.py "${BENCH[@]}" --out "$TMP/eager.json" > /dev/null
"$PYTHON" scripts/benchmark.py "${BENCH[@]}" --compile --out "$TMP/compiled.json" > /dev/null
"$PYTHON" - "$TMP/pytest.txt" "$rc" "$TMP/measure.json" "$REPORT" "$TMP/eager.json" "$TMP/compiled.json" <<'PY'
import datetime, json, sys
log, rc, measured, report = open(sys.argv[1]).read(), int(sys.argv[2]), json.load(open(sys.argv[3])), sys.argv[4]
eager, compiled = (json.load(open(path)) for path in sys.argv[5:7])
summary = log.strip().splitlines()[-1] if log.strip() else ""
speed = {name: run["sampling"]["methods"]["euler"]["seconds_per_image"] for name, run in (("eager", eager), ("compiled", compiled))}
out = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
       "gpu_tests": {"exit_code": rc, "summary": summary, "log_tail": log[-4000:]}, **measured,
       "compiled_sampling": {"model": eager["model"], "eager_s_per_image": speed["eager"],
                             "compiled_s_per_image": speed["compiled"], "speedup": speed["eager"] / speed["compiled"],
                             "compile_seconds": compiled["sampling"]["compile_seconds"], "eager": eager, "compiled": compiled}}
json.dump(out, open(report, "w"), indent=2)
print(f"[gpu_check] report: {report} (gpu tests: {summary})")
PY
