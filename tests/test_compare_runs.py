"""pixelflow.training.compare_runs and scripts/compare_runs.py: the table of overrides and final metrics, one plot per
metric, clear errors."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pixelflow.training.compare_runs import compare_runs

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_runs.py"


def _run(path, overrides, records):
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _record(step, ema, acc, fid):
    return {"step": step, "ema_decay": ema, "metrics": {"classifier_accuracy": acc, "classifier_fid": fid}}


def test_table_of_final_metrics_and_one_plot_per_metric(tmp_path):
    a = _run(tmp_path / "a", ["model=tiny", "module.lr=0.001", "paths.runs_dir=/x"],
             [_record(100, 0.99, 0.5, 9.0), _record(100, 0.9, 0.4, 10.0), _record(200, 0.99, 0.8, 3.0), _record(200, 0.9, 0.7, 4.0)])
    b = _run(tmp_path / "b", ["model=tiny", "module.lr=0.003", "paths.runs_dir=/x"], [_record(100, 0.99, 0.6, 8.0)])
    (csv_path, table_path), plots = compare_runs([a, b], tmp_path / "out")
    assert (csv_path, table_path) == (tmp_path / "out" / "runs.csv", tmp_path / "out" / "runs.md")
    assert sorted(p.name for p in plots) == ["classifier_accuracy.png", "classifier_fid.png"]
    rows = list(csv.DictReader(open(tmp_path / "out" / "runs.csv")))
    assert [(r["run"], r["ema"], r["step"], r["classifier_fid"]) for r in rows] == [
        ("module.lr=0.001", "0.99", "200", "3.0"), ("module.lr=0.001", "0.9", "200", "4.0"), ("module.lr=0.003", "0.99", "100", "8.0")]
    assert rows[0]["overrides"] == "model=tiny module.lr=0.001"  # path settings left out
    table = (tmp_path / "out" / "runs.md").read_text()
    assert "| module.lr=0.003 | model=tiny module.lr=0.003 | 0.99 | 100 | 0.6 | 8 |" in table
    for metric in ("classifier_accuracy", "classifier_fid"):
        with Image.open(tmp_path / "out" / f"{metric}.png") as img:
            assert img.size[0] > 300


def test_a_run_without_evaluations_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="metrics.jsonl is missing or empty"):
        compare_runs([tmp_path / "empty"], tmp_path / "out")


def test_the_command_prints_the_table_and_refuses_a_run_without_evaluations(tmp_path):
    run = _run(tmp_path / "a", ["module.lr=0.001"], [_record(100, 0.99, 0.5, 9.0)])
    proc = subprocess.run([sys.executable, str(SCRIPT), str(run), "--out", str(tmp_path / "out")], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "runs.md").read_text() in proc.stdout and "and 2 plot(s)" in proc.stdout
    (tmp_path / "empty").mkdir()
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "empty"), "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "error: " in proc.stderr and "metrics.jsonl is missing or empty" in proc.stderr


def test_seeds_fold_into_mean_and_spread_and_a_difference_is_judged_against_the_spread(tmp_path):
    runs = [_run(tmp_path / f"{name}{seed}", [f"+ablation={name}", f"seed={seed}"], [_record(500, 0.99, acc, fid)])
            for name, seed, acc, fid in [("published", 0, 0.90, 20.0), ("published", 1, 0.94, 22.0),
                                         ("x_pred", 0, 0.95, 10.0), ("x_pred", 1, 0.96, 11.0),
                                         ("shifted", 0, 0.91, 21.0), ("shifted", 1, 0.93, 23.5)]]
    compare_runs(runs, tmp_path / "out", baseline="+ablation=published")
    lines = (tmp_path / "out" / "seeds.md").read_text().splitlines()
    x_pred = next(line for line in lines if line.startswith("| +ablation=x_pred |"))
    shifted = next(line for line in lines if line.startswith("| +ablation=shifted |"))
    # x_pred: accuracy 0.955 +- 0.005 against 0.92 +- 0.02: +0.035 is within the larger spread 0.04;
    # FID 10.5 against 21: -10.5 exceeds the spreads 1 and 2
    assert "| 2 | 500 | 0.955 +- 0.005 | 10.5 +- 0.5 | +0.035 | -10.5 (beyond spread) |" in x_pred
    assert "(beyond spread)" not in shifted
    for metric in ("classifier_accuracy", "classifier_fid"):  # one picture per metric of the rows and their seeds
        assert (tmp_path / "out" / f"seeds_{metric}.png").read_bytes().startswith(b"\x89PNG")
    assert not list((tmp_path / "out").glob(".*"))  # no unfinished writes left behind
    with pytest.raises(ValueError, match="baseline 'nope' is none of the runs"):
        compare_runs(runs, tmp_path / "out2", baseline="nope")
