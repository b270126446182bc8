import errno

import pytest
import torch

import pixelflow.atomic as atomic
from pixelflow.atomic import DiskFullError
from pixelflow.training.checkpoint_io import AtomicCheckpointIO
from pixelflow.training.launch import build_training
from tests.hydra_utils import compose_config, tiny_train_overrides


def test_checkpoints_are_written_atomically_and_a_full_disk_keeps_the_last_one(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1, "weights": torch.ones(3)}, path)
    assert io.load_checkpoint(path, weights_only=True)["step"] == 1
    assert not list(path.parent.glob(".*"))  # no temporary left beside it

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    with pytest.raises(DiskFullError, match="last.ckpt"):
        io.save_checkpoint({"step": 2, "weights": torch.zeros(3)}, path)
    assert io.load_checkpoint(path, weights_only=True)["step"] == 1
    assert list(path.parent.glob("*.ckpt")) == [path] and not list(path.parent.glob(".*"))


def test_the_training_launch_saves_through_it(tmp_path):
    trainer, _, _ = build_training(compose_config("train", tiny_train_overrides(tmp_path, 2)))
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
