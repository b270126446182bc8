"""SLURM's pre-emption signal on a two-process run: two ranks started as srun starts them (faked SLURM variables,
gloo, a stub scontrol), SIGUSR1 sent to both while they train, as ``--signal=SIGUSR1@120`` does."""

from __future__ import annotations

import inspect
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from pixelflow.training.preemption import RequeueOnSignal
from pixelflow.training.retention import checkpoint_step
from tests.hydra_utils import tiny_train_overrides

ROOT = Path(__file__).resolve().parents[2]


class Progress(L.Callback):
    """Per rank: each finished step in ``<folder>/rank<r>.steps`` (after a pause that keeps the run going while
    the test signals it), and each checkpoint save in ``<folder>/rank<r>.saves``, marked ``hpc`` when made by
    the requeue-signal callback."""

    def __init__(self, folder: str, pause: float = 0.0):
        self.folder, self.pause = Path(folder), pause

    def _append(self, trainer: L.Trainer, kind: str, line: str) -> None:
        with open(self.folder / f"rank{trainer.global_rank}.{kind}", "a") as f:
            f.write(line + "\n")

    def on_train_batch_end(self, trainer, pl_module, *args):
        time.sleep(self.pause)
        self._append(trainer, "steps", str(trainer.global_step))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        by_signal = any(isinstance(frame.frame.f_locals.get("self"), RequeueOnSignal) for frame in inspect.stack())
        self._append(trainer, "saves", f"{'hpc' if by_signal else 'periodic'} {trainer.global_step}")


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(run_dir: Path, folder: Path, bin_dir: Path, steps: int, pause: float) -> list[subprocess.Popen]:
    """Two ranks of train.py as srun starts them: one process each, its rank in the SLURM variables."""
    overrides = tiny_train_overrides(run_dir, steps, [
        "trainer=ddp_cpu", "trainer.strategy=ddp", "callbacks.checkpoint.every_n_train_steps=1000", "hydra.output_subdir=null",
        "+callbacks.progress._target_=tests.training.test_slurm_requeue.Progress", f"+callbacks.progress.folder={folder}",
        f"+callbacks.progress.pause={pause}"])
    port = str(_free_port())
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT), "MASTER_PORT": port,
               "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_JOB_NAME": "pixelflow",
               "SLURM_JOB_ID": "4242", "SLURM_PROCID": str(rank), "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0",
               "SLURM_NODELIST": "localhost", "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "train.py", *overrides], cwd=ROOT, env=env,
                                      stdout=open(folder / f"rank{rank}.out", "w"), stderr=subprocess.STDOUT))
    return procs


def _wait(condition, procs: list[subprocess.Popen], what: str, folder: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
            outputs = "\n".join(f"--- rank {r}\n" + (folder / f"rank{r}.out").read_text()[-3000:] for r in (0, 1))
            raise AssertionError(f"{what}: not reached (exit codes {[p.poll() for p in procs]})\n{outputs}")
        time.sleep(0.05)


@pytest.mark.slow
def test_requeue_signal_on_two_ranks_saves_once_keeps_training_and_resumes(tmp_path):
    """SIGUSR1 to both ranks mid-run, landing at different points of a step: one hpc_ckpt_1.ckpt, saved by both
    ranks at the same step and exactly once, one ``scontrol requeue``, and both ranks go on training (no
    deadlock); the requeued job (the same two commands) resumes from the signal's checkpoint on both ranks and
    finishes."""
    run_dir, folder, bin_dir = tmp_path / "run", tmp_path / "progress", tmp_path / "bin"
    folder.mkdir()
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol_calls'}\n")
    (bin_dir / "scontrol").chmod(0o755)
    steps = 20
    procs = _launch(run_dir, folder, bin_dir, steps, pause=0.05)  # the signal lands anywhere in a step
    try:
        _wait(lambda: all(len(_lines(folder / f"rank{r}.steps")) >= 3 for r in (0, 1)), procs, "3 steps on both ranks", folder)
        for p in procs:  # apart by a fraction of a step: each rank is somewhere else in its step when it lands
            p.send_signal(signal.SIGUSR1)
            time.sleep(0.03)
        _wait(lambda: (tmp_path / "scontrol_calls").exists(), procs, "scontrol requeue", folder)
        _wait(lambda: all(len(_lines(folder / f"rank{r}.saves")) == 1 for r in (0, 1)), procs, "the save on both ranks", folder)
        signalled = checkpoint_step(run_dir / "hpc_ckpt_1.ckpt")
        _wait(lambda: all(int(_lines(folder / f"rank{r}.steps")[-1]) >= signalled + 2 for r in (0, 1)), procs,
              "two more steps after the signal on both ranks", folder)
    finally:
        for p in procs:  # the requeue: SLURM ends the job
            p.kill()
            p.wait()
    assert [_lines(folder / f"rank{r}.saves") for r in (0, 1)] == [[f"hpc {signalled}"]] * 2
    assert _lines(tmp_path / "scontrol_calls") == ["requeue 4242"]
    assert sorted(p.name for p in run_dir.glob("hpc_ckpt_*")) == ["hpc_ckpt_1.ckpt"] and 3 <= signalled < steps
    saved = torch.load(run_dir / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == signalled and saved["optimizer_states"]

    for r in (0, 1):
        (folder / f"rank{r}.steps").unlink()
    procs = _launch(run_dir, folder, bin_dir, steps, pause=0.0)
    codes = [p.wait(timeout=600) for p in procs]
    assert codes == [0, 0], "\n".join((folder / f"rank{r}.out").read_text()[-3000:] for r in (0, 1))
    assert f"resuming from {run_dir / 'hpc_ckpt_1.ckpt'} (step {signalled})" in (folder / "rank0.out").read_text()
    for r in (0, 1):
        assert [int(s) for s in _lines(folder / f"rank{r}.steps")] == list(range(signalled + 1, steps + 1))
    assert checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == steps
