"""The training console: a step / max_steps bar with loss and ETA, no Lightning tips, no model-summary table."""

import logging

from pixelflow.training.launch import run_training
from tests.hydra_utils import compose_config, tiny_train_overrides


def test_short_run_shows_steps_of_max_steps_with_loss_and_eta_and_nothing_unactionable(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    overrides = [o for o in tiny_train_overrides(tmp_path / "run", steps=4, extra=[
        "trainer.enable_progress_bar=true", "trainer.log_every_n_steps=1", "~callbacks.sample_grid", "~callbacks.export"])
        if not o.startswith(("trainer.enable_model_summary", "callbacks.sample_grid"))]  # the defaults of both
    run_training(compose_config("train", overrides))
    out = capsys.readouterr()
    console = out.out + out.err + caplog.text
    assert "train: 100%" in console and "4/4 [" in console and "step/s" in console and "train/loss=" in console
    assert "0/4 [00:00<?" in console  # tqdm's ETA slot: "elapsed<remaining"
    assert "Epoch" not in console and "v_num" not in console
    assert "Tip" not in console and "litlogger" not in console  # Lightning's advertisement is filtered
    assert "FLOPs" not in console and "Params" not in console  # no model-summary table (train.py prints the count)
    assert "Seed set to 0" in caplog.text  # other Lightning info still comes through


def test_resumed_run_counts_from_the_step_it_resumes_at(tmp_path, capsys):
    overrides = tiny_train_overrides(tmp_path / "run", steps=2, extra=["trainer.enable_progress_bar=true"])
    run_training(compose_config("train", overrides))
    capsys.readouterr()
    run_training(compose_config("train", [*overrides, "trainer.max_steps=4"]))
    err = capsys.readouterr().out
    assert "2/4 [00:00<?" in err and "4/4 [" in err and "train:   0%" not in err

