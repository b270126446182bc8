"""The tuning pass end to end on a seconds-long run: sigma_rel reconstructions and an export, one report, a preset."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from pixelflow.metrics.io import load_image_set
from pixelflow.sampling.samplers import SamplerConfig
from pixelflow.sampling.sweep import SweepError
from pixelflow.sampling.tune import candidates, tune_from_config, with_unguided
from pixelflow.sampling.tune_report import best_row, summary_rows
from pixelflow.training.launch import run_training
from tests.hydra_utils import compose_config, tiny_train_overrides

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("tune") / "run"
    run_training(compose_config("train", tiny_train_overrides(run, 6, ["callbacks.posthoc_ema.snapshot_every=2"])))
    return run


def _config(run_dir, out, **extra):
    cfg = OmegaConf.load(ROOT / "conf" / "tune.yaml")
    del cfg["hydra"], cfg["defaults"]
    cfg.sampler = {**OmegaConf.load(ROOT / "conf" / "sampler" / "quickstart.yaml"), "steps": 1}
    cfg.merge_with({"run": str(run_dir), "sigma_rel": [0.07, 0.1], "exports": [str(run_dir / "export" / "model.pt")],
                    "out_dir": str(out), "ref": "mnist_test", "num_samples": [20], "num_ref": 100, "batch_size": 20,
                    "axes": {"guidance_scale": [1, 2, 3]}, "accelerator": "cpu", **extra})
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.fixture(scope="module")
def tuned(run_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("tuned")
    return out, tune_from_config(_config(run_dir, out))


@pytest.mark.slow  # a training run and 9 sampled, scored cells
def test_every_ema_gets_every_cell_and_the_reconstructions_are_cached(tuned, run_dir):
    out, _ = tuned
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == 3 * 3  # (2 sigma_rel + 1 export) x 3 guidance scales
    assert {r["candidate"] for r in rows} == {"sigma_rel0.07_step0000006", "sigma_rel0.1_step0000006", "export0_export_model"}
    assert sorted(p.name for p in (out / "exports").iterdir()) == ["sigma_rel0.07_step0000006", "sigma_rel0.1_step0000006"]
    model = out / "exports" / "sigma_rel0.07_step0000006" / "model.pt"
    before = model.stat().st_mtime_ns
    candidates(run_dir, [0.07], None, [], out / "exports")
    assert model.stat().st_mtime_ns == before  # reused, not reconstructed again
    for label in ("sigma_rel0.1_step0000006", "export0_export_model"):
        assert (out / "candidates" / label / "results.csv").is_file()  # each EMA's own sweep report


@pytest.mark.slow  # a training run and 9 sampled, scored cells
def test_summary_sets_each_emas_unguided_cell_beside_its_best_guided_one(tuned):
    out, _ = tuned
    text = (out / "results.md").read_text()
    assert text.startswith("Selection metric: classifier_fid (lower is better)")
    rows = [dict(r, guidance_scale=float(r["guidance_scale"]), classifier_fid=float(r["classifier_fid"]),
                 sigma_rel=r["sigma_rel"] or None) for r in csv.DictReader(open(out / "results.csv"))]
    for s in summary_rows(rows, "classifier_fid"):
        assert s["unguided"]["guidance_scale"] == 1 and s["guided"]["guidance_scale"] in (2, 3)
        assert f"| {s['candidate']} | " in text
    assert (out / "plots" / "classifier_fid_vs_sigma_rel.png").is_file()
    assert (out / "plots" / "classifier_accuracy_vs_sigma_rel.png").is_file()


@pytest.mark.slow  # a training run and 9 sampled, scored cells
def test_the_best_cell_becomes_a_preset_and_best_json(tuned):
    out, _ = tuned
    best = json.loads((out / "best.json").read_text())
    rows = [dict(r, classifier_fid=float(r["classifier_fid"])) for r in csv.DictReader(open(out / "results.csv"))]
    assert best["value"] == pytest.approx(best_row(rows, "classifier_fid")["classifier_fid"], rel=1e-3)
    preset = OmegaConf.to_container(OmegaConf.load(out / "sampler" / "tuned.yaml"))
    config = SamplerConfig.from_mapping(preset)
    assert config.guidance_scale == best["sampler"]["guidance_scale"] and config.steps == 1 and config.method == "euler"
    assert f"ckpt={best['checkpoint']}" in (out / "sampler" / "tuned.yaml").read_text()


def test_the_unguided_cell_is_always_swept():
    base = SamplerConfig(guidance_scale=5.0)
    assert with_unguided(base, {"guidance_scale": [3, 5]})["guidance_scale"] == [1, 3, 5]
    assert with_unguided(base, {"guidance_scale": [5, 1]})["guidance_scale"] == [5, 1]
    assert with_unguided(base, {"steps": [4]}) == {"steps": [4], "guidance_scale": [1, 5.0]}


def test_sigma_rel_without_a_run_and_nothing_to_tune_are_refused(tmp_path):
    with pytest.raises(SweepError, match="sigma_rel values need run="):
        candidates(None, [0.1], None, [], tmp_path)
    with pytest.raises(SweepError, match="nothing to tune"):
        candidates(None, [], None, [], tmp_path)


@pytest.mark.slow
def test_sample_py_takes_the_preset_by_config_dir(tuned, tmp_path):
    out, _ = tuned
    best = json.loads((out / "best.json").read_text())
    done = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--config-dir", str(out), "sampler=tuned",
                           f"ckpt={best['checkpoint']}", f"out_dir={tmp_path}", "num_samples=2", "save_png=false"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    settings = load_image_set(tmp_path / "samples.npz").settings
    assert settings["sampler"]["guidance_scale"] == best["sampler"]["guidance_scale"], settings
