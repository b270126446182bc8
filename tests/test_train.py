import csv
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pixelflow.checkpoint import CheckpointError, load_pixelflow
from pixelflow.training.compare_runs import compare_runs
from pixelflow.training.eval_callback import read_metrics
from pixelflow.training.launch import build_training, check_global_batch, run_training
from tests.hydra_utils import compose_config, tiny_train_overrides

ROOT = Path(__file__).resolve().parents[1]
TWO_EMAS = "module.ema_decays=[0.9,0.5]"


def _state(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return ckpt["state_dict"], ckpt


def test_fast_dev_run_on_cpu(tmp_path):
    cfg = compose_config("train", tiny_train_overrides(tmp_path / "run", 2, ["+trainer.fast_dev_run=true"]))
    trainer, module, datamodule = build_training(cfg)
    before = [p.detach().clone() for p in module.model.parameters()]
    trainer.fit(module, datamodule=datamodule)
    assert trainer.global_step == 1
    assert any(not torch.equal(a, b) for a, b in zip(before, module.model.parameters()))


def test_training_writes_checkpoints_grid_and_export(tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_config("train", tiny_train_overrides(run_dir, 4))
    run_training(cfg)
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.ckpt")) == ["last.ckpt", "step_0000002.ckpt",
                                                                                 "step_0000004.ckpt"]
    assert (run_dir / "samples" / "final.png").is_file()
    exported = load_pixelflow(run_dir / "export" / "model.pt")
    from_ckpt = load_pixelflow(run_dir / "checkpoints" / "last.ckpt")
    for a, b in zip(exported.model.state_dict().values(), from_ckpt.model.state_dict().values()):
        assert torch.equal(a, b)  # both are the EMA weights
    assert exported.class_names == [str(i) for i in range(10)] and exported.schedule.image_size == 32


def test_two_ema_rates_are_exported_and_selectable(tmp_path):
    run_dir = tmp_path / "run"
    run_training(compose_config("train", tiny_train_overrides(run_dir, 2, [TWO_EMAS])))
    export = run_dir / "export"
    assert sorted(p.name for p in export.glob("*.pt")) == ["model.pt", "model_ema0.5.pt"]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    first, second = load_pixelflow(export / "model.pt"), load_pixelflow(export / "model.pt", ema=0.5)
    assert load_pixelflow(export / "model.pt", ema=0.9).source == str(export / "model.pt")  # the first rate is model.pt
    assert second.source == str(export / "model_ema0.5.pt")
    for name, weight in first.model.state_dict().items():
        assert torch.equal(weight, load_pixelflow(ckpt).model.state_dict()[name])
        assert torch.equal(second.model.state_dict()[name], load_pixelflow(ckpt, ema=0.5).model.state_dict()[name])
    key = "patch_embed.proj.weight"
    assert not torch.equal(first.model.state_dict()[key], second.model.state_dict()[key])
    for path in (export / "model.pt", ckpt):
        with pytest.raises(CheckpointError, match="0.7"):
            load_pixelflow(path, ema=0.7)


def test_resume_is_exact(tmp_path):
    """N steps straight == N/2 steps, stop, automatic resume to N: same parameters, both EMAs and optimizer."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_training(compose_config("train", tiny_train_overrides(straight, 6, [TWO_EMAS])))
    half = tiny_train_overrides(resumed, 6, [TWO_EMAS, "trainer.max_steps=3", "callbacks.checkpoint.every_n_train_steps=3"])
    run_training(compose_config("train", half))
    assert _state(resumed / "checkpoints" / "last.ckpt")[1]["global_step"] == 3
    run_training(compose_config("train", tiny_train_overrides(resumed, 6, [TWO_EMAS])))  # finds last.ckpt itself
    a, ckpt_a = _state(straight / "checkpoints" / "last.ckpt")
    b, ckpt_b = _state(resumed / "checkpoints" / "last.ckpt")
    assert ckpt_a["global_step"] == ckpt_b["global_step"] == 6
    assert a.keys() == b.keys() and {k.split(".")[1] for k in a if k.startswith("emas.")} == {"0", "1"}
    for key in a:
        assert torch.equal(a[key], b[key]), key
    opt_a, opt_b = ckpt_a["optimizer_states"][0]["state"], ckpt_b["optimizer_states"][0]["state"]
    assert all(torch.equal(opt_a[i]["exp_avg"], opt_b[i]["exp_avg"]) for i in opt_a)


def test_resume_can_be_disabled(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pixelflow")
    run_dir = tmp_path / "run"
    run_training(compose_config("train", tiny_train_overrides(run_dir, 2)))
    first = _state(run_dir / "checkpoints" / "last.ckpt")[0]
    caplog.clear()
    run_training(compose_config("train", tiny_train_overrides(run_dir, 2)))
    assert "resuming from" in caplog.text
    key = "model.patch_embed.proj.weight"
    assert torch.equal(first[key], _state(run_dir / "checkpoints" / "last.ckpt")[0][key])
    with pytest.raises(FileExistsError, match="resume=false"):
        run_training(compose_config("train", tiny_train_overrides(run_dir, 2, ["resume=false"])))
    other = tmp_path / "other"
    caplog.clear()
    run_training(compose_config("train", tiny_train_overrides(other, 2, ["resume=false", "seed=1"])))
    assert "starting a new run" in caplog.text
    second = _state(other / "checkpoints" / "last.ckpt")[0]
    assert not torch.equal(first["model.patch_embed.proj.weight"], second["model.patch_embed.proj.weight"])


def test_global_batch_invariant():
    assert check_global_batch(256, 32, 1, 8) == 256
    with pytest.raises(ValueError, match="accumulate_grad_batches=8"):
        check_global_batch(256, 32, 1, 1)


@pytest.mark.slow
def test_ddp_on_cpu_two_processes(tmp_path):
    run_dir = tmp_path / "ddp"
    cfg = compose_config("train", tiny_train_overrides(run_dir, 2, ["trainer=ddp_cpu", "global_batch_size=16"]))
    run_training(cfg)
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2


@pytest.mark.slow
def test_wandb_logger_runs_offline_and_keeps_its_run_id_on_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    grids = ["callbacks.sample_grid.every_n_steps=2"]
    overrides = [o for o in tiny_train_overrides(run_dir, 2, grids) if o != "logger=none"] + ["logger=wandb"]
    run_training(compose_config("train", overrides))
    run_id = (run_dir / "wandb_id.txt").read_text()
    assert len(list((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))) == 1
    run_training(compose_config("train", [o.replace("max_steps=2", "max_steps=4") for o in overrides]))
    assert (run_dir / "wandb_id.txt").read_text() == run_id
    launches = list((run_dir / "wandb").glob("offline-run-*"))
    assert launches and all(p.name.endswith(run_id) for p in launches)
    assert list((run_dir / "wandb").glob("offline-run-*/files/media/images/samples_*.png"))  # the sample grids


TINY_EXPERIMENT = """# @package _global_
defaults:
  - mnist_quickstart
  - override /model: test
  - override /logger: none
data: {batch_size: 8}
trainer: {enable_progress_bar: false}
callbacks:
  checkpoint: {every_n_train_steps: 2}
  sample_grid: {every_n_steps: 0, per_class: 1, sampler: {steps: 1}}
  evaluate: {every_n_steps: 2, num_samples: 20, batch_size: 10, sampler: {steps: 1}, num_ref: 200}
"""


def _multirun(tmp_path, steps, cache):
    """Fixed settings in an experiment config, the swept ones on the command line (keeps job directory names short)."""
    (tmp_path / "conf" / "experiment").mkdir(parents=True, exist_ok=True)
    (tmp_path / "conf" / "experiment" / "tiny_eval.yaml").write_text(TINY_EXPERIMENT)
    overrides = [f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "experiment=tiny_eval", f"paths.runs_dir={tmp_path / 'runs'}",
                 f"trainer.max_steps={steps}", "module.lr=1e-3,3e-3"]
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "-m", *overrides], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PIXELFLOW_CACHE_DIR": str(cache)}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_multirun_trains_each_job_in_its_own_run_directory_and_resumes_each(tmp_path, eval_cache):
    _multirun(tmp_path, 2, eval_cache)
    jobs = sorted(p for p in (tmp_path / "runs" / "tiny_eval_multirun").iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["experiment=tiny_eval,module.lr=0.001", "experiment=tiny_eval,module.lr=0.003"]
    out = _multirun(tmp_path, 4, eval_cache)  # more steps: the same directories, each resumed
    assert out.count("resuming from") == 2
    for job in jobs:
        assert _state(job / "checkpoints" / "last.ckpt")[1]["global_step"] == 4
        assert [r["step"] for r in read_metrics(job / "metrics.jsonl")] == [2, 4]
    a, b = (_state(job / "checkpoints" / "last.ckpt")[0]["model.patch_embed.proj.weight"] for job in jobs)
    assert not torch.equal(a, b)  # two learning rates, two different runs
    compare_runs(jobs, tmp_path / "compare")
    rows = list(csv.DictReader(open(tmp_path / "compare" / "runs.csv")))
    assert [(r["run"], r["step"]) for r in rows] == [("module.lr=0.001", "4"), ("module.lr=0.003", "4")]
    assert {p.name for p in (tmp_path / "compare").glob("*.png")} == {"classifier_accuracy.png", "classifier_fid.png"}
