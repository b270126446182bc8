#!/usr/bin/env bash
# The GPU check: one command on one GPU, one JSON report that is valid at every moment.
#
#   bash scripts/gpu_check.sh [--dry-run] [--only STEP[,STEP...]] REPORT_JSON
#
# Each step runs under its own timeout; its log goes to <report stem>.<step>.log beside the report, and the
# report (written atomically after every step, and before each one as "running") holds per step its status
# (pending, running, ok, failed, timeout, skipped), seconds, exit code, the tail of its output and the JSON
# it produced. A run cut short (a step's timeout, or the whole command killed) still leaves the report and
# every log; the exit status is 1 if any step failed, timed out or found no time left in the budget. --only reruns some steps (the others
# are reported as skipped). --dry-run runs the same steps on CPU at tiny sizes, with longer timeouts (a busy
# CPU is slower than the GPU); nothing is installed and the gpu tests are only collected.
# Environment: PYTHON (default .venv/bin/python, else python3); GPU_CHECK_TIMEOUTS="step=seconds ..." to
# change timeouts; GPU_CHECK_BUDGET_S (default 570): no step runs past it, so the whole check ends inside a
# 10-minute command limit.
#
# Steps, and their durations on one H100 SXM by estimate (none measured yet):
#   step             what                                                              estimate  timeout
#   wheels           pure-Python wheels from carry/ (make gpu-wheels) into a --target      15 s     40 s
#                    folder, pip --no-index --no-deps, then imported; skipped when they import
#   gpu_tests        pytest -m gpu tests/test_gpu.py (bf16 agreement, Dopri5 memory at       45 s     90 s
#                    batch 16, two steps of the 24 GB training recipe)
#   sampling         scripts/gpu_check.py --part sampling: XL/4 256 px, Euler 30 + CFG       55 s    100 s
#                    batch 16 bf16; Euler 10 on 2 images bf16 vs fp32; Dopri5 batch 4 bf16
#   text_memory      --part text: T2I-XL/4 1024 px bf16, 1 step a stage, batch 1 and 3         30 s     60 s
#   training         --part train: imagenet256_xl4_24gb, XL/4 micro-batch 32, 2 steps          25 s     55 s
#   distill          --part distill: 2 teacher pairs (AB2 8 a stage, guidance 2.4, bf16), then    30 s     60 s
#                    reflow steps of imagenet256_xl4_distill (micro-batch 32, ckpt, bf16)
#   compile_eager    scripts/benchmark.py --sampling: S/4 256 px bf16, Euler 10, batch 8        15 s     35 s
#   compile_compiled the same with --compile (4 shapes, compile time reported apart)          75 s    125 s
#   total                                                                                  290 s    565 s
# Method: time = FLOPs / (assumed MFU x peak) + per-process start. FLOPs counted exactly on the meta device
# (torch FlopCounterMode, one row through each stage): XL/4 0.058, 0.237, 1.049, 5.819 TFLOP at 32-256 px;
# T2I-XL/4 (512 text tokens) 1.40, 6.83, 52.9, 627 TFLOP at 128-1024 px; S/4 0.003-0.48 TFLOP; training
# 7.16 TFLOP an image with checkpointing. Stage 0 of a class model runs unguided (B rows), other stages 2B.
# bf16 at 40% of 989 TFLOP/s; fp32 without TF32 at 50% of 67 TFLOP/s (CUDA cores). Dopri5: 50 model
# calls a stage assumed (adaptive; the report gives the real count). Each Python process: 10-15 s to import
# torch, start CUDA and build a model. Compile: 25 s for the first shape of a 12-block network, 12 s for each
# further shape (assumed; Inductor and Triton caches are cold on a fresh machine). The old plan (Euler and
# Dopri5 at batch 16 in both bf16 and fp32, B/4 compile) came to about 10.5 minutes: its fp32 runs alone
# (6.9 and 11.4 PFLOP at 33 TFLOP/s) took 9.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
DRY_RUN=0
ONLY=""
while (( $# )); do
  case "$1" in
    --dry-run) DRY_RUN=1; shift ;;
    --only) ONLY="${2:?--only needs a comma-separated list of steps}"; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    -*) echo "[gpu_check] unknown option $1 (see --help)" >&2; exit 2 ;;
    *) break ;;
  esac
done
(( $# == 1 )) || { echo "[gpu_check] usage: gpu_check.sh [--dry-run] [--only STEPS] REPORT_JSON" >&2; exit 2; }
mkdir -p "$(dirname "$1")" || exit 2
REPORT="$(cd "$(dirname "$1")" && pwd)/$(basename "$1")"
LOGS="${REPORT%.json}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[[ -x "$PYTHON" ]] || command -v "$PYTHON" >/dev/null || PYTHON=python3   # the GPU image has no .venv
SITE="${TMPDIR:-/tmp}/pixelflow-gpu-check-site"   # the wheels' --target folder
export PYTHONPATH="$SITE:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"

STEPS=(wheels gpu_tests sampling text_memory training distill compile_eager compile_compiled)
declare -A ESTIMATE=([wheels]=15 [gpu_tests]=45 [sampling]=55 [text_memory]=30 [training]=25 [distill]=30 [compile_eager]=15 [compile_compiled]=75)
declare -A TIMEOUT=([wheels]=40 [gpu_tests]=90 [sampling]=100 [text_memory]=60 [training]=55 [distill]=60 [compile_eager]=35 [compile_compiled]=125)
BUDGET="${GPU_CHECK_BUDGET_S:-570}"
if (( DRY_RUN )); then
  for s in "${STEPS[@]}"; do TIMEOUT[$s]=600; done
  BUDGET="${GPU_CHECK_BUDGET_S:-3600}"
fi
for pair in ${GPU_CHECK_TIMEOUTS:-}; do
  [[ -n "${TIMEOUT[${pair%%=*}]+set}" && "${pair#*=}" =~ ^[0-9]+$ ]] || {
    echo "[gpu_check] GPU_CHECK_TIMEOUTS: '$pair' is not step=seconds for a step of: ${STEPS[*]}" >&2; exit 2; }
  TIMEOUT[${pair%%=*}]="${pair#*=}"
done
for s in ${ONLY//,/ }; do
  [[ -n "${TIMEOUT[$s]+set}" ]] || { echo "[gpu_check] --only: no step '$s'; the steps: ${STEPS[*]}" >&2; exit 2; }
done

# record REPORT init DRY_RUN BUDGET STEP=ESTIMATE:TIMEOUT...  |  record REPORT STEP STATUS SECONDS EXIT LOG [JSON] [NOTE]
record() {
  "$PYTHON" - "$@" <<'PY'
import datetime, json, sys
from pathlib import Path
from pixelflow.atomic import atomic_write_text

now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
report_path, what = Path(sys.argv[1]), sys.argv[2]
if what == "init":
    dry_run, budget, plan = sys.argv[3] == "1", int(sys.argv[4]), sys.argv[5:]
    steps = {}
    for item in plan:
        name, times = item.split("=")
        estimate, timeout = times.split(":")
        steps[name] = {"status": "pending", "estimate_seconds": int(estimate), "timeout_seconds": int(timeout)}
    report = {"dry_run": dry_run, "started_utc": now, "updated_utc": now, "complete": False,
              "budget_seconds": budget, "steps": steps}
else:
    report = json.loads(report_path.read_text())
    status, seconds, code, log = sys.argv[3], float(sys.argv[4]), sys.argv[5], Path(sys.argv[6])
    out = Path(sys.argv[7]) if len(sys.argv) > 7 and sys.argv[7] else None
    step = report["steps"][what]
    step.update(status=status, seconds=round(seconds, 1), exit_code=int(code) if code else None, log=log.name)
    if len(sys.argv) > 8:
        step["note"] = sys.argv[8]
    if log.is_file():
        step["output_tail"] = log.read_text(errors="replace")[-4000:]
    if out is not None and out.is_file():
        try:
            step["result"] = json.loads(out.read_text())
        except ValueError as error:
            step["result_error"] = f"{out.name} is not JSON: {error}"
    eager, compiled = (report["steps"].get(k, {}).get("result") for k in ("compile_eager", "compile_compiled"))
    if status != "running" and eager and compiled and "sampling" in compiled:
        speed = {n: r["sampling"]["methods"]["euler"]["seconds_per_image"] for n, r in (("eager", eager), ("compiled", compiled))}
        report["compiled_sampling"] = {"model": eager["model"], "eager_s_per_image": speed["eager"],
                                       "compiled_s_per_image": speed["compiled"], "speedup": speed["eager"] / speed["compiled"],
                                       "compile_seconds": compiled["sampling"]["compile_seconds"]}
    report["complete"] = all(s["status"] in ("ok", "failed", "timeout", "skipped") for s in report["steps"].values())
report["updated_utc"] = now
atomic_write_text(report_path, json.dumps(report, indent=2) + "\n")
PY
  local rc=$?
  (( rc == 0 )) || echo "[gpu_check] WARNING: could not update $1" >&2
  return $rc
}

# The command of each step (dry run: tiny sizes on CPU).
DRY=(); (( DRY_RUN )) && DRY=(--dry-run)
cmd=()
BENCH=(--sampling --model S/4 --device cuda --sample-batch 8 --sample-steps 10 --methods euler --repeats 2)
(( DRY_RUN )) && BENCH=(--sampling --model Test/2 --num-stages 2 --device cpu --sample-batch 2 --sample-steps 2 --methods euler --repeats 1)
set_command() {  # step, its JSON output: sets cmd
  case "$1" in
    wheels) cmd=("$PYTHON" -m pip install -q --no-index --no-deps --target "$SITE" "$ROOT"/carry/*.whl) ;;
    gpu_tests)
      if (( DRY_RUN )); then cmd=("$PYTHON" -m pytest -q --collect-only -p no:cacheprovider tests/test_gpu.py)
      else cmd=("$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py); fi ;;
    sampling) cmd=("$PYTHON" scripts/gpu_check.py "${DRY[@]}" --part sampling --out "$2") ;;
    text_memory) cmd=("$PYTHON" scripts/gpu_check.py "${DRY[@]}" --part text --out "$2") ;;
    training) cmd=("$PYTHON" scripts/gpu_check.py "${DRY[@]}" --part train --out "$2") ;;
    distill) cmd=("$PYTHON" scripts/gpu_check.py "${DRY[@]}" --part distill --out "$2") ;;
    compile_eager) cmd=("$PYTHON" scripts/benchmark.py "${BENCH[@]}" --out "$2") ;;
    compile_compiled) cmd=("$PYTHON" scripts/benchmark.py "${BENCH[@]}" --compile --out "$2") ;;
  esac
}

plan=()
for s in "${STEPS[@]}"; do plan+=("$s=${ESTIMATE[$s]}:${TIMEOUT[$s]}"); done
record "$REPORT" init "$DRY_RUN" "$BUDGET" "${plan[@]}" || { echo "[gpu_check] cannot write $REPORT" >&2; exit 1; }
echo "[gpu_check] report: $REPORT (logs: $LOGS.<step>.log); budget ${BUDGET} s$( (( DRY_RUN )) && echo "; dry run on CPU")"

START=$SECONDS
failures=0
n=0
for s in "${STEPS[@]}"; do
  n=$((n + 1))
  log="$LOGS.$s.log"; out="$LOGS.$s.json"
  rm -f "$out"
  note=""
  if [[ -n "$ONLY" && ",$ONLY," != *",$s,"* ]]; then
    note="not selected (--only $ONLY)"
  elif [[ "$s" == wheels ]] && (( DRY_RUN )); then
    note="dry run: nothing installed"
  elif [[ "$s" == wheels ]] && "$PYTHON" -c "import hydra, omegaconf, torch_fidelity, webdataset, pytest" 2>/dev/null; then
    note="hydra, omegaconf, torch_fidelity, webdataset and pytest import already"
  elif [[ "$s" == wheels ]] && ! ls "$ROOT"/carry/*.whl >/dev/null 2>&1; then
    echo "no wheels in $ROOT/carry: run 'make gpu-wheels' on a machine with PyPI, and carry carry/ along" > "$log"
    record "$REPORT" "$s" failed 0 "" "$log" "" "no wheels in carry/"
    echo "[gpu_check] ($n/${#STEPS[@]}) $s: failed (no wheels in carry/: make gpu-wheels)"
    failures=$((failures + 1)); continue
  fi
  left=$((BUDGET - (SECONDS - START)))
  limit=${TIMEOUT[$s]}; (( left < limit )) && limit=$left
  if [[ -z "$note" ]] && (( left < 5 )); then note="no time left in the ${BUDGET} s budget"; failures=$((failures + 1)); fi
  if [[ -n "$note" ]]; then
    record "$REPORT" "$s" skipped 0 "" "$log" "" "$note"
    echo "[gpu_check] ($n/${#STEPS[@]}) $s: skipped ($note)"
    continue
  fi
  set_command "$s" "$out"
  (( limit < TIMEOUT[$s] )) && note="timeout cut to ${limit} s by the budget"
  : > "$log"  # the log exists before the report names it: a kill between the two leaves no dangling name
  record "$REPORT" "$s" running 0 "" "$log" "" ${note:+"$note"}
  echo "[gpu_check] ($n/${#STEPS[@]}) $s: running (estimate ${ESTIMATE[$s]} s, timeout ${limit} s) ..."
  t0=$SECONDS
  { echo "\$ ${cmd[*]}"; timeout --kill-after=10 "$limit" "${cmd[@]}"; } > "$log" 2>&1
  rc=$?
  if (( rc == 0 )); then status=ok
  elif (( rc == 124 || rc == 137 )); then status=timeout; failures=$((failures + 1))
  else status=failed; failures=$((failures + 1)); fi
  [[ "$s" == wheels && "$status" == ok ]] && ! "$PYTHON" -c "import hydra, omegaconf, torch_fidelity, webdataset, pytest" >> "$log" 2>&1 \
    && { status=failed; failures=$((failures + 1)); }
  record "$REPORT" "$s" "$status" "$((SECONDS - t0))" "$rc" "$log" "$out" ${note:+"$note"}
  echo "[gpu_check] ($n/${#STEPS[@]}) $s: $status in $((SECONDS - t0)) s (exit $rc; log $log)"
  (( rc == 0 )) || tail -n 5 "$log" | sed 's/^/[gpu_check]   | /'
done
echo "[gpu_check] done in $((SECONDS - START)) s: $failures step(s) failed or timed out; report $REPORT"
(( failures == 0 ))
