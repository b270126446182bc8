"""SLURM pre-emption: the requeue signal is acted on at an optimizer step that every rank agrees on.

Lightning's own handler (``SLURMEnvironment(auto_requeue=True)``) saves the checkpoint inside the signal
handler, wherever the signal finds each rank. Under DDP a rank that is still inside a collective (the
per-step vote on a finite gradient norm) then meets the other rank's checkpoint barrier instead, and the
job hangs until SLURM kills it, with no checkpoint written. Here the handler only records the signal;
after each optimizer step the ranks vote, and on a yes they all save ``hpc_ckpt_<n>.ckpt`` together and
rank 0 asks SLURM to requeue the job. The requeued job resumes from that file (the newest by step).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment

__all__ = ["RequeueOnSignal", "slurm_environment", "hpc_checkpoint_path"]

logger = logging.getLogger(__name__)


def slurm_environment() -> SLURMEnvironment | None:
    """Under srun: SLURM's ranks and addresses for Lightning, with Lightning's own requeue handler off."""
    return SLURMEnvironment(auto_requeue=False) if SLURMEnvironment.detect() else None


def hpc_checkpoint_path(run_dir: Path) -> Path:
    """``hpc_ckpt_<n>.ckpt`` with n one above the highest already in ``run_dir`` (Lightning's naming)."""
    numbers = [int(p.stem.rsplit("_", 1)[1]) for p in run_dir.glob("hpc_ckpt_*.ckpt") if p.stem.rsplit("_", 1)[1].isdigit()]
    return run_dir / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt"


def _job_id() -> str:
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    return f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]


class RequeueOnSignal(L.Callback):
    """On ``signum`` (SLURM's ``--signal=SIGUSR1@<seconds>``): at the next optimizer step, save an HPC
    checkpoint on every rank at once and requeue the job from rank 0; training goes on until SLURM ends it.

    The signal is acted on once per process: SLURM sends it once per allocation, and a rank whose signal
    arrives just after the others' vote must not write a second checkpoint a step later.
    """

    def __init__(self, signum: int = signal.SIGUSR1):
        self.signum = signum
        self._signalled = self._done = False
        self._previous: Any = None
        self._voted_step = -1

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self._signalled = True

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._previous = signal.signal(self.signum, self._record)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._previous is not None:
            signal.signal(self.signum, self._previous)
            self._previous = None

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self._done or trainer.global_step == self._voted_step:  # not an optimizer step: accumulating
            return
        self._voted_step = trainer.global_step
        if not trainer.strategy.reduce_boolean_decision(self._signalled, all=False):
            return
        self._done = True
        path = hpc_checkpoint_path(Path(trainer.default_root_dir))
        trainer.save_checkpoint(path)  # every rank: the state is gathered collectively, rank 0 writes
        logger.info("requeue signal: saved %s at step %d", path, trainer.global_step)
        if trainer.is_global_zero:
            job = _job_id()
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if result.returncode:
                logger.warning("scontrol requeue %s failed (exit %d): %s; resubmit the job by hand, it resumes from %s",
                               job, result.returncode, result.stderr.strip(), path)
            else:
                logger.info("requeued SLURM job %s", job)
