"""The requeue signal's callback on one process: numbering, the environment Lightning gets, the vote once per
optimizer step, and a failed ``scontrol``. Two ranks under a real signal: tests/training/test_slurm_requeue.py."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from pixelflow.training import preemption
from pixelflow.training.preemption import RequeueOnSignal, hpc_checkpoint_path, slurm_environment

SLURM = dict(SLURM_NTASKS="1", SLURM_JOB_NAME="pixelflow", SLURM_JOB_ID="4242", SLURM_PROCID="0", SLURM_LOCALID="0",
             SLURM_NODEID="0", SLURM_NODELIST="localhost")


def test_hpc_checkpoints_are_numbered_above_the_highest_present(tmp_path):
    assert hpc_checkpoint_path(tmp_path) == tmp_path / "hpc_ckpt_1.ckpt"
    for name in ("hpc_ckpt_1.ckpt", "hpc_ckpt_3.ckpt", "hpc_ckpt_x.ckpt"):
        (tmp_path / name).touch()
    assert hpc_checkpoint_path(tmp_path) == tmp_path / "hpc_ckpt_4.ckpt"


def test_lightning_gets_slurm_without_its_own_requeue_handler(monkeypatch):
    for key in SLURM:
        monkeypatch.delenv(key, raising=False)
    assert slurm_environment() is None
    for key, value in SLURM.items():
        monkeypatch.setenv(key, value)
    environment = slurm_environment()
    assert environment is not None and environment.auto_requeue is False
    assert environment.requeue_signal == signal.SIGUSR1


class FakeTrainer:
    """What the callback reads of a Trainer: the step, the vote, the save and the rank."""

    def __init__(self, root: Path):
        self.default_root_dir, self.global_step, self.is_global_zero = str(root), 0, True
        self.votes, self.saved = [], []
        self.strategy = SimpleNamespace(reduce_boolean_decision=self._vote)

    def _vote(self, decision: bool, all: bool = True) -> bool:
        self.votes.append((self.global_step, decision, all))
        return decision

    def save_checkpoint(self, path: Path) -> None:
        self.saved.append((self.global_step, Path(path).name))


class FakeScontrol:
    """``subprocess.run`` for ``scontrol``: records the commands, exits with ``code``."""

    def __init__(self):
        self.calls, self.code = [], 0

    def __call__(self, cmd: list[str], **kwargs) -> SimpleNamespace:
        self.calls.append(cmd)
        return SimpleNamespace(returncode=self.code, stderr="Invalid job id")


@pytest.fixture
def scontrol(monkeypatch) -> FakeScontrol:
    fake = FakeScontrol()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.setattr(preemption.subprocess, "run", fake)
    return fake


def test_one_vote_per_optimizer_step_a_save_once_and_one_requeue(tmp_path, scontrol):
    trainer, callback = FakeTrainer(tmp_path), RequeueOnSignal()
    previous = signal.getsignal(signal.SIGUSR1)
    callback.setup(trainer, None, "fit")
    try:
        for step in (1, 1, 2):  # accumulation: two micro-batches end at step 1
            trainer.global_step = step
            callback.on_train_batch_end(trainer)
        signal.raise_signal(signal.SIGUSR1)  # recorded only: nothing is saved inside the handler
        assert trainer.saved == []
        for step in (3, 4, 5):
            trainer.global_step = step
            callback.on_train_batch_end(trainer)
            if step == 4:
                signal.raise_signal(signal.SIGUSR1)  # a second signal after the save is not acted on
    finally:
        callback.teardown(trainer, None, "fit")
    assert signal.getsignal(signal.SIGUSR1) == previous
    assert [(s, d) for s, d, _ in trainer.votes] == [(1, False), (2, False), (3, True)]
    assert all(not vote_all for *_, vote_all in trainer.votes)  # any rank's signal counts
    assert trainer.saved == [(3, "hpc_ckpt_1.ckpt")]
    assert scontrol.calls == [["scontrol", "requeue", "4242"]]


def test_a_failed_requeue_says_how_to_resume(tmp_path, scontrol, caplog):
    scontrol.code = 1
    trainer, callback = FakeTrainer(tmp_path), RequeueOnSignal()
    callback.setup(trainer, None, "fit")
    try:
        signal.raise_signal(signal.SIGUSR1)
        trainer.global_step = 7
        with caplog.at_level(logging.WARNING, logger="pixelflow"):
            callback.on_train_batch_end(trainer)
    finally:
        callback.teardown(trainer, None, "fit")
    assert "scontrol requeue 4242 failed (exit 1): Invalid job id" in caplog.text
    assert str(tmp_path / "hpc_ckpt_1.ckpt") in caplog.text
