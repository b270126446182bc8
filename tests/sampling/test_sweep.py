"""scripts/sweep_sampler.py and pixelflow.sampling.sweep / sweep_report: the grid, per-cell resume, the report."""

import csv
import json
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from lightning.fabric import Fabric
from omegaconf import OmegaConf

import pixelflow.sampling.sweep as sweep
from pixelflow.cascade import CascadeSchedule
from pixelflow.checkpoint import export_released_format, load_pixelflow
from pixelflow.metrics.io import write_adm_npz
from pixelflow.metrics.references import mnist_images
from pixelflow.sampling.generate import generate
from pixelflow.sampling.samplers import SamplerConfig
from pixelflow.sampling.sweep import Cell, SweepError, SweepOptions, build_cells, eval_options, run_sweep, sweep_from_config
from pixelflow.sampling.sweep_report import write_report
from tests.hydra_utils import compose_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ckpt(tmp_path, tiny_model):
    return export_released_format(tiny_model, CascadeSchedule(image_size=32), tmp_path / "ckpt", [str(i) for i in range(10)])


def mean_pixel(samples: Path) -> dict:
    """A cheap stand-in for pixelflow.metrics: one number computed from the cell's own samples."""
    with np.load(samples) as data:
        return {"metrics": {"mean_pixel": float(data["arr_0"].mean())}, "unavailable": {}}


BASE = SamplerConfig(method="euler", steps=30, guidance_scale=4.0, atol=1e-5, rtol=1e-2)


def euler_calls(steps: int, guidance_scale: float, stages: int = 4) -> int:
    """Model calls per image of Euler under the stage-wise ramp: stage 0 (w = 1) conditional-only, guided stages 2 rows."""
    return steps * (1 + (stages - 1) * (2 if guidance_scale > 1 else 1))


def cells_2x2() -> list[Cell]:
    return build_cells(BASE, {"steps": [1, 2], "guidance_scale": [1, 3]}, 3, num_stages=4)


def test_cells_are_every_combination_with_settings_in_the_names():
    axes = {"method": ["euler", "heun"], "steps": [4, [1, 1, 1, 2]], "guidance_scale": [1.0, 4.5], "shift": [1.0],
            "guidance_interval": [None, [0.1, 0.9]]}
    cells = build_cells(BASE, axes, [10], num_stages=4)
    assert len(cells) == 16 and len({c.name for c in cells}) == 16
    assert "heun_steps1-1-1-2_guidance4.5_shift1_gi0.1-0.9_n10" in {c.name for c in cells}
    assert cells[0].settings() == {"method": "euler", "steps": 4, "guidance_scale": 1.0, "shift": 1.0,
                                   "guidance_interval": None, "num_samples": 10}
    assert cells[-1].sampler == SamplerConfig(method="heun", steps=(1, 1, 1, 2), guidance_scale=4.5,
                                              guidance_interval=(0.1, 0.9), atol=1e-5, rtol=1e-2)


def test_axes_left_out_take_the_presets_values():
    (cell,) = build_cells(BASE, {}, 5, num_stages=4)
    assert cell.sampler == BASE and cell.name == "euler_steps30_guidance4_shift1_giall_n5"
    assert [c.sampler.steps for c in build_cells(BASE, {"steps": 6, "method": None}, 5, num_stages=4)] == [6]


def test_dopri5_gets_one_cell_whatever_steps_and_shift_list():
    axes = {"method": ["euler", "dopri5"], "steps": [4, 8], "guidance_scale": [1.0, 3.0], "shift": [1.0, 2.0]}
    cells = build_cells(BASE, axes, [10], num_stages=4)
    dopri5 = [c.sampler for c in cells if c.method == "dopri5"]
    assert len(cells) == 8 + 2
    assert [(c.steps, c.shift, c.guidance_scale) for c in dopri5] == [(4, 1.0, 1.0), (4, 1.0, 3.0)]


@pytest.mark.parametrize("axes, message", [
    ({"method": ["euler", "euler"]}, "method lists euler more than once"),
    ({"steps": []}, "axes.steps is an empty list"),
    ({"method": ["rk4"]}, "sampler method must be one of"),
    ({"steps": [[1, 2]]}, "sampler steps [1, 2] give 2 stage(s) but the schedule has 4"),
    ({"guidance_interval": [0.1, 0.9]}, "one interval is written 'axes.guidance_interval=[[0.1,0.9]]'"),
    ({"guidance_scale": [0.5]}, "guidance_scale must be a number >= 1"),
    ({"cfg": [1, 5]}, "axes ['cfg'] cannot be swept; the axes are ['method', 'steps', 'guidance_scale'"),
    ({"atol": [1e-3]}, "axes ['atol'] cannot be swept"),
])
def test_bad_axes_are_clear_errors(axes, message):
    with pytest.raises(SweepError, match=re.escape(message)):
        build_cells(BASE, axes, [4], num_stages=4)
    with pytest.raises(SweepError, match="num_samples must be >= 2"):
        build_cells(BASE, {}, [1], num_stages=4)


def test_mnist_references_default_to_classifier_metrics_only():
    mnist, path = eval_options("mnist_test"), eval_options("/data/ref.npz")
    assert (mnist.inception, mnist.classifier, mnist.num_ref) == (False, True, 500)
    assert (path.inception, path.classifier, path.num_ref) == (True, False, None)
    assert eval_options("mnist_test", inception=True).inception
    with pytest.raises(SweepError, match="inception='yes': use auto, true or false"):
        eval_options("mnist_test", inception="yes")


def test_sweep_writes_tables_and_plots_with_one_row_per_cell(tmp_path, ckpt):
    out = tmp_path / "sweep"
    results = run_sweep(load_pixelflow(ckpt), cells_2x2(), out, mean_pixel, SweepOptions(batch_size=3), Fabric(accelerator="cpu"))
    paths = write_report(out, results)
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["steps"], r["guidance_scale"]) for r in rows] == [("1", "1"), ("1", "3"), ("2", "1"), ("2", "3")]
    for row in rows:
        assert float(row["model_calls_per_image"]) == euler_calls(int(row["steps"]), float(row["guidance_scale"]))
        assert float(row["seconds_per_image"]) > 0 and 0 < float(row["mean_pixel"]) < 255
        assert (row["method"], row["shift"], row["guidance_interval"], row["num_samples"]) == ("euler", "1", "", "3")
    assert len({r["mean_pixel"] for r in rows}) == 4  # every cell scored its own samples
    md = (out / "results.md").read_text().splitlines()
    assert len(md) == 2 + 4 and md[0].startswith("| method | steps | guidance_scale |") and "mean_pixel" in md[0]
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert plots == ["mean_pixel_vs_guidance_scale.png", "mean_pixel_vs_model_calls.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths[2:])
    for cell in cells_2x2():  # every cell's own record, with the metrics.json of its scoring
        record = json.loads((out / "cells" / cell.name / "result.json").read_text())
        assert record["settings"] == cell.settings() and record["images_measured"] == 3
        assert json.loads((out / "cells" / cell.name / "metrics.json").read_text())["metrics"] == record["metrics"]


def test_cells_report_their_images_distance_to_the_dopri5_cell_of_their_guidance(tmp_path, ckpt):
    cells = build_cells(BASE, {"method": ["euler", "dopri5"], "steps": [1, 3], "guidance_scale": [1, 3]}, 2, num_stages=4)
    out = tmp_path / "sweep"
    results = run_sweep(load_pixelflow(ckpt), cells, out, mean_pixel, SweepOptions(batch_size=2), Fabric(accelerator="cpu"))

    def images(cell: Cell) -> np.ndarray:
        with np.load(out / "cells" / cell.name / "samples.npz") as data:
            return data["arr_0"].astype(np.float64)

    for cell, result in zip(cells, results):
        dopri5 = next(c for c in cells if c.method == "dopri5" and c.sampler.guidance_scale == cell.sampler.guidance_scale)
        expected = np.abs(images(cell) - images(dopri5)).mean()
        assert result["metrics"][sweep.DISTANCE_TO_DOPRI5] == pytest.approx(expected, abs=1e-12)
        assert (expected == 0) == (cell.method == "dopri5")  # each Euler cell's own images differ from Dopri5's
    assert sweep.DISTANCE_TO_DOPRI5 not in json.loads((out / "cells" / cells[0].name / "result.json").read_text())["metrics"]
    write_report(out, results)
    assert (out / "plots" / f"{sweep.DISTANCE_TO_DOPRI5}_vs_model_calls.png").is_file()


def test_cells_without_a_dopri5_cell_of_their_guidance_get_no_distance(tmp_path, ckpt):
    cells = build_cells(BASE, {"steps": [1], "guidance_scale": [1, 3]}, 2, num_stages=4) + \
        build_cells(BASE, {"method": ["dopri5"], "guidance_scale": [3]}, 3, num_stages=4)  # another sample count
    results = run_sweep(load_pixelflow(ckpt), cells, tmp_path, mean_pixel, SweepOptions(batch_size=3), Fabric(accelerator="cpu"))
    assert [sweep.DISTANCE_TO_DOPRI5 in r["metrics"] for r in results] == [False, False, True]


def test_killed_sweep_restarts_only_the_missing_cells(tmp_path, ckpt, monkeypatch):
    out, loaded, opts, cpu = tmp_path / "sweep", load_pixelflow(ckpt), SweepOptions(batch_size=1), Fabric(accelerator="cpu")
    cells = cells_2x2()

    class Killed(Exception):
        pass

    def kill_after_two(cell, result):
        if cell == cells[1]:
            raise Killed

    with pytest.raises(Killed):
        run_sweep(loaded, cells, out, mean_pixel, opts, cpu, on_cell_done=kill_after_two)
    finished = {c.name: (out / "cells" / c.name / "result.json").stat().st_mtime_ns for c in cells[:2]}
    assert not (out / "cells" / cells[2].name).exists()
    # The third cell was also cut off inside generation: 2 of its 3 samples are in shards.
    generate(loaded, cells[2].sampler, out / "cells" / cells[2].name, 2, 1, save_png=False, fabric=cpu)

    generated = []
    real_generate = sweep.generate
    monkeypatch.setattr(sweep, "generate", lambda *a, **k: generated.append(a[2].name) or real_generate(*a, **k))
    results = run_sweep(loaded, cells, out, mean_pixel, opts, cpu)
    assert generated == [cells[2].name, cells[3].name]
    assert {n: (out / "cells" / n / "result.json").stat().st_mtime_ns for n in finished} == finished
    resumed = results[2]
    assert resumed["images_measured"] == 1  # only the missing sample was generated (and measured) again
    assert resumed["model_calls_per_image"] == euler_calls(2, 1.0)
    with np.load(out / "cells" / cells[2].name / "samples.npz") as data:
        assert len(data["arr_0"]) == 3
    assert run_sweep(loaded, cells, out, mean_pixel, opts, cpu) == results and len(generated) == 2  # nothing left to do


def test_restart_with_other_fixed_settings_is_refused(tmp_path, ckpt):
    loaded, cell = load_pixelflow(ckpt), cells_2x2()[:1]
    run_sweep(loaded, cell, tmp_path, mean_pixel, SweepOptions(seed=0, fixed={"ref": "a"}), Fabric(accelerator="cpu"))
    with pytest.raises(SweepError, match="ref: 'a' then, 'b' now; seed: 0 then, 1 now"):
        run_sweep(loaded, cell, tmp_path, mean_pixel, SweepOptions(seed=1, fixed={"ref": "b"}), Fabric(accelerator="cpu"))
    looser = [Cell(replace(cell[0].sampler, rtol=0.1), cell[0].num_samples)]  # same folder name, other Dopri5 tolerance
    with pytest.raises(SweepError, match="rtol: 0.01 then, 0.1 now"):
        run_sweep(loaded, looser, tmp_path, mean_pixel, SweepOptions(seed=0, fixed={"ref": "a"}), Fabric(accelerator="cpu"))


def test_out_dir_and_ref_are_required():
    with pytest.raises(SweepError, match="both out_dir= and ref= are required"):
        sweep_from_config(OmegaConf.to_container(compose_config("sweep_sampler", ["ref=mnist_test"]), resolve=True))


@pytest.mark.slow
def test_cli_sweep_scores_with_inception_against_a_reference_file(tmp_path, ckpt):
    images, labels = mnist_images("test")
    write_adm_npz(tmp_path / "ref.npz", images[:8], labels[:8])
    out = tmp_path / "sweep"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "sweep_sampler.py"), f"ckpt={ckpt}", f"out_dir={out}",
                           f"ref={tmp_path / 'ref.npz'}", "axes.method=[euler,dopri5]", "axes.steps=[1]",
                           "axes.guidance_scale=[2]", "num_samples=4", "batch_size=4", f"cache_dir={tmp_path / 'cache'}",
                           "eval_device=cpu"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["method"] for r in rows] == ["euler", "dopri5"]
    assert all(float(r["fid"]) > 0 and float(r["sfid"]) > 0 for r in rows) and "classifier_fid" not in rows[0]
    assert float(rows[0]["model_calls_per_image"]) == euler_calls(1, 2.0)
    assert float(rows[1]["model_calls_per_image"]) > float(rows[0]["model_calls_per_image"])  # adaptive steps, counted
    assert (out / "plots" / "fid_vs_model_calls.png").is_file() and "| method | steps |" in proc.stdout
    again = subprocess.run([sys.executable, str(ROOT / "scripts" / "sweep_sampler.py"), f"ckpt={ckpt}", f"out_dir={out}",
                            f"ref={tmp_path / 'ref.npz'}", "batch_size=4", "seed=1"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert again.returncode != 0 and "other fixed settings (seed: 0 then, 1 now)" in again.stderr
    assert "Traceback" not in again.stderr


@pytest.mark.slow
def test_compiled_sweep_gives_the_eager_images_and_reports_compile_time_apart(tmp_path, tiny_model):
    schedule = CascadeSchedule(image_size=32, num_stages=2)  # two shapes to compile keeps this to ~a minute on CPU
    ckpt = export_released_format(tiny_model, schedule, tmp_path / "ckpt", [str(i) for i in range(10)])
    cells, cpu = build_cells(BASE, {"steps": [2], "guidance_scale": [1]}, 2, num_stages=2), Fabric(accelerator="cpu")
    eager = run_sweep(load_pixelflow(ckpt), cells, tmp_path / "eager", mean_pixel, SweepOptions(batch_size=2), cpu)
    compiled = run_sweep(load_pixelflow(ckpt), cells, tmp_path / "compiled", mean_pixel,
                         SweepOptions(batch_size=2, compile=True), cpu)
    record = json.loads((tmp_path / "compiled" / "compile.json").read_text())
    assert record["compile_seconds"] > 0 and record["cells"] == [cells[0].name]
    assert compiled[0]["model_calls_per_image"] == eager[0]["model_calls_per_image"] == 2 * 2
    with np.load(tmp_path / "eager" / "cells" / cells[0].name / "samples.npz") as a, \
            np.load(tmp_path / "compiled" / "cells" / cells[0].name / "samples.npz") as b:
        assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1  # float ulps may flip a rounding


def test_the_sweep_starts_from_a_checkpoints_recorded_sampler(tmp_path, tiny_model, monkeypatch):
    """A distilled student's export records its sampler: the cells start from it unless a preset is named."""
    recorded = {"method": "ab2", "steps": 2, "shift": 1.0, "guidance_scale": 1.0, "guidance_interval": None}
    student = export_released_format(tiny_model, CascadeSchedule(image_size=32), tmp_path / "student",
                                     [str(i) for i in range(10)], sampler=recorded)
    seen: dict[str, list[Cell]] = {}
    monkeypatch.setattr(sweep, "run_sweep", lambda loaded, cells, *args: seen.setdefault("cells", cells))
    monkeypatch.setattr(sweep, "write_report", lambda out_dir, results: [])
    monkeypatch.setattr(sweep, "reference_scorer", lambda ref, evals: mean_pixel)
    for overrides, expected in (([], ("ab2", 2, 1.0)), (["sampler=euler30"], ("euler", 30, 4.0))):
        seen.clear()
        cfg = compose_config("sweep_sampler", [f"ckpt={student}", f"out_dir={tmp_path / 'sweep'}", "ref=mnist_test",
                                               *overrides])
        sweep_from_config(OmegaConf.to_container(cfg, resolve=True), sampler_overrides=overrides)
        assert [(c.sampler.method, c.sampler.steps, c.sampler.guidance_scale) for c in seen["cells"]] == [expected]
