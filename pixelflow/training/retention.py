"""Checkpoint files of a run: which one to resume from, and which ones to keep (bounded disk).

A run directory holds ``checkpoints/last.ckpt`` (overwritten at every save), periodic
``checkpoints/step_*.ckpt`` and, on SLURM, ``hpc_ckpt_<n>.ckpt`` that Lightning writes in the run
directory when the job is signalled before a requeue. :func:`newest_checkpoint` picks the newest
readable one by global step; :class:`RetainingCheckpoint` deletes what is no longer needed.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

__all__ = ["checkpoint_step", "newest_checkpoint", "ResumeChoice", "RetainingCheckpoint"]

logger = logging.getLogger(__name__)


def checkpoint_step(path: str | Path) -> int:
    """The ``global_step`` of a Lightning checkpoint, read cheaply (memory-mapped: no tensor is read).

    Raises for a file that is truncated (e.g. the job was killed while writing it), corrupt or not a
    checkpoint: a zip archive's directory is at its end, so a cut-off file fails here.
    """
    ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(ckpt["global_step"])


@dataclass
class ResumeChoice:
    path: Path | None                 # the checkpoint to resume from (None: nothing readable)
    step: int | None
    found: list[Path] = field(default_factory=list)   # every candidate file, readable or not
    notes: list[str] = field(default_factory=list)    # what was skipped and why, for the log


def _candidates(run_dir: Path) -> list[tuple[int, Path]]:
    """(preference on equal steps, path): last.ckpt before an HPC checkpoint before a periodic one."""
    ckpt_dir = run_dir / "checkpoints"
    last = [(2, p) for p in [ckpt_dir / "last.ckpt"] if p.is_file()]
    hpc = [(1, p) for p in sorted(run_dir.glob("hpc_ckpt_*.ckpt")) + sorted(ckpt_dir.glob("hpc_ckpt_*.ckpt"))]
    periodic = [(0, p) for p in sorted(ckpt_dir.glob("*.ckpt")) if p.name != "last.ckpt" and not p.name.startswith("hpc_ckpt_")]
    return last + hpc + periodic


def newest_checkpoint(run_dir: str | Path) -> ResumeChoice:
    """The readable checkpoint of ``run_dir`` with the highest global step (last.ckpt on a tie).

    An HPC checkpoint written at a SLURM preemption signal is newer than last.ckpt (periodic), so a
    requeued job continues from the signal, not from the last periodic save. Unreadable files are
    reported in ``notes`` and passed over.
    """
    choice = ResumeChoice(None, None)
    best: tuple[int, int] | None = None
    for preference, path in _candidates(Path(run_dir)):
        choice.found.append(path)
        try:
            step = checkpoint_step(path)
        except Exception as err:  # torch raises many types for truncated / foreign files
            choice.notes.append(f"{path} ({path.stat().st_size} bytes) is unreadable, passed over: truncated by a kill "
                                f"during the write, or corrupt ({type(err).__name__}: {str(err)[:160]})")
            continue
        if best is None or (step, preference) > best:
            best, choice.path, choice.step = (step, preference), path, step
    if choice.path is not None and choice.path.name != "last.ckpt":
        choice.notes.append(f"newest readable checkpoint is {choice.path.name} (step {choice.step}), not last.ckpt")
    return choice


def _step_regex(template: str) -> re.Pattern[str]:
    """A regex for file names made from a ModelCheckpoint ``filename`` template, capturing the step."""
    parts, pos = [], 0
    for m in re.finditer(r"\{([^}:]+)(?::[^}]*)?\}", template):
        parts.append(re.escape(template[pos:m.start()]))
        parts.append(r"(?:step=)?(?P<step>\d+)" if m.group(1) == "step" else r"(?:[^/]*?)")
        pos = m.end()
    parts.append(re.escape(template[pos:]) + re.escape(ModelCheckpoint.FILE_EXTENSION))
    return re.compile("".join(parts))


class RetainingCheckpoint(ModelCheckpoint):
    """ModelCheckpoint with bounded disk use.

    Keeps ``last.ckpt``, the newest ``keep_last`` periodic checkpoints and every ``keep_every``-th one
    (steps divisible by ``keep_every x every_n_train_steps``); after each save, deletes the other
    periodic checkpoints and SLURM ``hpc_ckpt_*.ckpt`` files older than the checkpoint just written.
    ``keep_last: null`` keeps every periodic checkpoint. Only files matching ``filename`` are touched.
    """

    def __init__(self, *args, keep_last: int | None = 2, keep_every: int | None = 20, **kwargs):
        super().__init__(*args, **kwargs)
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or null (keep every checkpoint), got {keep_last}")
        if keep_every and not self._every_n_train_steps:
            raise ValueError("keep_every counts periodic checkpoints: it needs every_n_train_steps")
        if keep_last is not None and "{step" not in (self.filename or ""):
            raise ValueError(f"checkpoint retention reads the step from the file name: filename={self.filename!r} needs {{step}}")
        self.keep_last, self.keep_every = keep_last, keep_every

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if trainer.is_global_zero and self.keep_last is not None:
            self.prune(trainer)

    def prune(self, trainer: L.Trainer) -> list[Path]:
        """Delete what the retention rule does not keep; return the deleted paths."""
        if self.dirpath is None:
            return []
        pattern = _step_regex(self.filename)
        periodic = sorted((int(m["step"]), p) for p in Path(self.dirpath).glob(f"*{self.FILE_EXTENSION}")
                          if p.name != f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}" and (m := pattern.fullmatch(p.name)))
        period = (self.keep_every or 0) * (self._every_n_train_steps or 0)
        keep = {p for _, p in periodic[-self.keep_last:]} | {p for s, p in periodic if period and s % period == 0}
        doomed = [p for _, p in periodic if p not in keep]
        for folder in {Path(self.dirpath), Path(trainer.default_root_dir)}:
            for path in folder.glob("hpc_ckpt_*.ckpt"):  # written at a requeue signal; superseded by this save
                try:
                    older = checkpoint_step(path) < trainer.global_step
                except Exception:
                    older = True
                if older:
                    doomed.append(path)
        for path in doomed:
            trainer.strategy.remove_checkpoint(path)
        if doomed:
            logger.info("checkpoint retention: deleted %s", ", ".join(p.name for p in doomed))
        return doomed
