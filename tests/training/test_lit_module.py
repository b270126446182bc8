import shutil

import pytest
import torch

from pixelflow.training.launch import run_training
from pixelflow.training.lit_module import lr_factor
from tests.hydra_utils import compose_config, tiny_train_overrides

DECAY = ["module.lr_decay_fraction=0.5", "module.lr_warmup_steps=1"]


def test_lr_factor_warms_up_holds_then_decays_to_zero():
    factors = [lr_factor(step, warmup_steps=2, decay_start=4, total_steps=8) for step in range(10)]
    assert factors == [0.5, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]


@pytest.mark.parametrize("bad", ["module.lr_decay_fraction=1.5", "module.lr_warmup_steps=-1"])
def test_bad_lr_schedule_is_refused(tmp_path, bad):
    with pytest.raises(ValueError, match="lr_warmup_steps >= 0 and lr_decay_fraction in"):
        run_training(compose_config("train", tiny_train_overrides(tmp_path / "run", 2, [bad])))


def test_decay_needs_max_steps(tmp_path):
    with pytest.raises(ValueError, match="finite trainer.max_steps"):
        run_training(compose_config("train", tiny_train_overrides(tmp_path / "run", 2, [*DECAY, "trainer.max_steps=-1",
                                                                                         "trainer.max_epochs=1"])))


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_decaying_run_resumes_exactly_after_a_kill(tmp_path):
    """4 steps straight == the step-2 checkpoint resumed to 4 in another directory (as after a kill and a move:
    last.ckpt is overwritten, not versioned to last-v1.ckpt); the last step's lr is lr / 2."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    cfg = compose_config("train", tiny_train_overrides(straight, 4, DECAY))
    run_training(cfg)
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "checkpoints" / "step_0000002.ckpt", resumed / "checkpoints" / "last.ckpt")
    run_training(compose_config("train", tiny_train_overrides(resumed, 4, DECAY)))
    a, b = _load(straight / "checkpoints" / "last.ckpt"), _load(resumed / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 4
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    for ckpt in (a, b):  # decay over steps 2..3 of 4: factors 1, 1/2 (and 0 at step 4)
        assert ckpt["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(cfg.module.lr / 2)
