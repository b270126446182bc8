"""scripts/benchmark.py, scripts/estimate_memory.py, scripts/gpu_check.sh and scripts/plot_sweeps.py run as commands on
tiny settings: valid JSON (a PNG for the plot) and clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script(name: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True, timeout=timeout)


def test_benchmark_command_prints_and_writes_the_same_json(tmp_path):
    out = tmp_path / "runs" / "sampling.json"
    proc = _script("benchmark.py", "--sampling", "--model", "Test/2", "--num-stages", "2", "--methods", "euler", "--guidance-scale", "1",
                   "--sample-batch", "1", "--sample-steps", "1", "--repeats", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)
    assert printed == json.loads(out.read_text())
    assert printed["sampling"]["methods"]["euler"]["model_calls_per_image"] == 2  # two stages, one unguided call each


def test_benchmark_command_refuses_a_bad_setting_with_a_usage_error():
    proc = _script("benchmark.py", "--sampling", "--device", "meta")
    assert proc.returncode == 2 and "needs device cpu or cuda" in proc.stderr and not proc.stdout


@pytest.mark.slow
def test_memory_estimate_matches_a_measured_step():
    proc = _script("estimate_memory.py", "--validate", "--validate-model", "Test/2", "--precision", "bf16-mixed",
                   "--micro-batch", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    checks = {c["gradient_checkpointing"]: c for c in json.loads(proc.stdout)["validation"]}
    check = checks[True]
    assert abs(check["relative_error"]) < 0.1
    assert check["retained_predicted_vs_measured"][0] == pytest.approx(check["retained_predicted_vs_measured"][1], rel=0.05)
    proc = _script("estimate_memory.py", "--model", "Test/2", "--image-size", "32", "--calibration-size", "32",
                   "--micro-batch", "4", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["gradient_checkpointing"] is True
    small, large = result["estimates"]
    for est in (small, large):  # weights + AdamW moments + EMA = 16 bytes/parameter, plus the fp32 input batch
        assert est["static"] == pytest.approx((16 * est["params"] + est["micro_batch"] * 3 * 32**2 * 4) / 2**30, abs=1e-3)
    assert large["retained"] > small["retained"] and large["fits"]


@pytest.mark.slow
def test_sampling_memory_model_predicts_whole_runs():
    """Calibrated at 32 px, the model of pixelflow.sampling.memory predicts whole Test/2 runs at 64 px."""
    proc = _script("estimate_memory.py", "--sampling", "--calibrate", "--model", "Test/2", "--batch", "1", "--method", "euler")
    assert proc.returncode == 0, proc.stderr[-3000:]
    checks = json.loads(proc.stdout)["whole_runs"]
    assert len(checks) == 4 and all(abs(c["relative_error"]) < 0.1 for c in checks), checks
    proc = _script("estimate_memory.py", "--sampling", "--batch", "16", "100", "--method", "dopri5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {(r["precision"], r["batch"]): r for r in json.loads(proc.stdout)["estimates"]}
    assert rows["bf16", 16]["fits_24gb"] and not rows["bf16", 100]["fits_24gb"] and rows["bf16", 100]["fits_40gb"]
    assert rows["fp32", 16]["peak_allocated"] > rows["bf16", 16]["peak_allocated"]



def test_plot_sweeps_overlays_each_sweeps_methods_and_names_a_bad_folder(tmp_path):
    columns = "method,steps,model_calls_per_image,classifier_fid\n"
    for name, rows in (("teacher", "euler,10,70,19.7\neuler,4,28,21.0\ndopri5,2,447,19.8\n"), ("student", "ab2,2,8,19.8\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.csv").write_text(columns + rows)
    out = tmp_path / "plots" / "calls.png"
    proc = _script("plot_sweeps.py", f"teacher={tmp_path / 'teacher'}", f"student={tmp_path / 'student'}", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 series" in proc.stdout and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = _script("plot_sweeps.py", f"x={tmp_path / 'absent'}", "--out", str(out))
    assert missing.returncode != 0 and "does not exist: pass a folder written by scripts/sweep_sampler.py" in missing.stderr
    metric = _script("plot_sweeps.py", f"x={tmp_path / 'student'}", "--metric", "fid", "--out", str(out))
    assert metric.returncode != 0 and "has no column 'fid'" in metric.stderr
