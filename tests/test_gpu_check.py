"""scripts/gpu_check.sh: its report is valid JSON at every moment, names each step's outcome and keeps every
finished step's result when another step fails, times out or the whole command is killed (dry run on CPU)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = ["wheels", "gpu_tests", "sampling", "text_memory", "training", "distill", "compile_eager", "compile_compiled"]


def run_check(report: Path, *args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args, str(report)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable, **(env or {})})


def failing_python(tmp_path: Path, marker: str) -> Path:
    """A python that exits 1 when its arguments contain ``marker`` and runs the real interpreter otherwise."""
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/bin/sh\ncase " $* " in *"{marker}"*) echo "failure injected for {marker}" >&2; exit 1;; esac\n'
                       f'exec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper


def test_the_plan_fits_seven_minutes_by_estimate_and_its_timeouts_the_command_limit():
    text = SCRIPT.read_text()
    table = {name: dict(re.findall(r"\[(\w+)\]=(\d+)", text[text.index(f"declare -A {name}="):].split("\n")[0]))
             for name in ("ESTIMATE", "TIMEOUT")}
    assert list(table["ESTIMATE"]) == list(table["TIMEOUT"]) == STEPS
    estimates, timeouts = (sum(int(v) for v in table[name].values()) for name in ("ESTIMATE", "TIMEOUT"))
    budget = int(re.search(r'BUDGET="\$\{GPU_CHECK_BUDGET_S:-(\d+)\}"', text).group(1))
    assert estimates <= 7 * 60 and timeouts <= budget < 10 * 60
    stated = re.search(r"#\s+total\s+(\d+) s\s+(\d+) s", text)
    assert (int(stated.group(1)), int(stated.group(2))) == (estimates, timeouts)  # the comment table's sums


@pytest.mark.parametrize("args, env, message", [
    (["--only", "sampling,nope"], {}, "--only: no step 'nope'"),
    ([], {"GPU_CHECK_TIMEOUTS": "sampling=soon"}, "'sampling=soon' is not step=seconds"),
    (["--fast"], {}, "unknown option --fast"),
])
def test_bad_arguments_are_refused_naming_the_fix(tmp_path, args, env, message):
    proc = run_check(tmp_path / "r.json", "--dry-run", *args, env=env)
    assert proc.returncode == 2 and message in proc.stderr and not (tmp_path / "r.json").exists()


def test_no_time_left_skips_steps_and_fails(tmp_path):
    proc = run_check(tmp_path / "r.json", "--dry-run", env={"GPU_CHECK_BUDGET_S": "3"})
    report = json.loads((tmp_path / "r.json").read_text())
    assert proc.returncode == 1 and report["complete"]
    assert all(report["steps"][s]["status"] == "skipped" for s in STEPS)
    assert "no time left in the 3 s budget" in report["steps"]["sampling"]["note"]


@pytest.mark.slow
def test_dry_run_writes_a_complete_report_with_every_steps_result(tmp_path):
    report_path = tmp_path / "out" / "gpu_check.json"
    proc = run_check(report_path, "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads(report_path.read_text())
    steps = report["steps"]
    assert report["dry_run"] and report["complete"] and list(steps) == STEPS
    assert steps["wheels"]["status"] == "skipped" and all(steps[s]["status"] == "ok" for s in STEPS[1:])
    assert all((report_path.parent / f"gpu_check.{s}.log").is_file() for s in STEPS[1:])  # the logs stay
    assert "3 tests collected" in steps["gpu_tests"]["output_tail"]
    sampling = steps["sampling"]["result"]
    for key in ("euler_bf16", "euler_bf16_pair", "euler_fp32_pair", "dopri5_bf16"):
        assert sampling[key]["seconds_per_image"] > 0 and sampling[key]["estimated_peak_gib"] > 0
    assert 0 < sampling["euler_bf16_vs_fp32"]["max_abs"] < 0.05
    text = steps["text_memory"]["result"]
    assert text["model"] == "T2I-Test/2" and 0 < text["batch_1"]["estimated_peak_gib"] < text["batch_2"]["estimated_peak_gib"]
    assert steps["training"]["result"]["train"]["images_per_s"] > 0
    distill = steps["distill"]["result"]
    assert distill["teacher_pairs_bf16"]["method"] == "ab2" and distill["teacher_pairs_bf16"]["seconds_per_image"] > 0
    assert distill["reflow_steps"]["seconds_per_step"] > 0 and distill["reflow_steps"]["loss"] > 0
    compiled = report["compiled_sampling"]
    assert compiled["model"] == "Test/2" and compiled["compile_seconds"] > 0 and compiled["speedup"] > 0


@pytest.mark.slow
def test_a_failed_and_a_timed_out_step_leave_a_valid_report_with_the_other_results(tmp_path):
    report_path = tmp_path / "gpu_check.json"
    proc = run_check(report_path, "--dry-run", "--only", "gpu_tests,text_memory,training,compile_compiled",
                     env={"PYTHON": str(failing_python(tmp_path, "--part text")), "GPU_CHECK_TIMEOUTS": "compile_compiled=1"})
    assert proc.returncode == 1
    report = json.loads(report_path.read_text())
    steps = report["steps"]
    assert report["complete"] and "compiled_sampling" not in report
    assert steps["text_memory"]["status"] == "failed" and steps["text_memory"]["exit_code"] == 1
    assert "failure injected for --part text" in steps["text_memory"]["output_tail"]
    assert steps["compile_compiled"]["status"] == "timeout" and steps["compile_compiled"]["exit_code"] == 124
    assert steps["gpu_tests"]["status"] == "ok" and steps["training"]["status"] == "ok"
    assert steps["training"]["result"]["train"]["images_per_s"] > 0  # ran after the failure
    assert {s: steps[s]["status"] for s in ("wheels", "sampling", "compile_eager")} == dict.fromkeys(
        ("wheels", "sampling", "compile_eager"), "skipped")
    assert "text_memory: failed" in proc.stdout and "compile_compiled: timeout" in proc.stdout


@pytest.mark.slow
def test_a_killed_check_leaves_a_valid_report_naming_the_running_step(tmp_path):
    """The whole command killed (a device's command limit) while a step runs: every read of the report on the
    way parses, and the last one holds the finished steps and names the one that was running."""
    report_path = tmp_path / "gpu_check.json"
    proc = subprocess.Popen(["bash", str(SCRIPT), "--dry-run", "--only", "gpu_tests,training", str(report_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "PYTHON": sys.executable})
    reads, deadline = 0, time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            if report_path.exists():
                report = json.loads(report_path.read_text())
                reads += 1
                if report["steps"]["training"]["status"] == "running":
                    break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    report = json.loads(report_path.read_text())
    assert reads > 1 and not report["complete"]
    assert report["steps"]["gpu_tests"]["status"] == "ok" and report["steps"]["training"]["status"] == "running"
    assert (tmp_path / "gpu_check.training.log").is_file() and (tmp_path / "gpu_check.gpu_tests.log").is_file()
