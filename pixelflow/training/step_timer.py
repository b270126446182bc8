"""Wall time per optimizer step of a real training loop, for comparing recipes' costs."""

from __future__ import annotations

import statistics
import time
from typing import Any

import lightning as L

__all__ = ["StepTimer"]


class StepTimer(L.Callback):
    """Records the wall time between consecutive optimizer steps; :meth:`median` skips the first ``warmup``."""

    def __init__(self, warmup: int = 10):
        self.warmup, self.stamps = warmup, []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.stamps.append(time.perf_counter())

    def median(self) -> float:
        """Median seconds per step after the warm-up steps."""
        gaps = [b - a for a, b in zip(self.stamps[self.warmup:], self.stamps[self.warmup + 1:])]
        if not gaps:
            raise ValueError(f"only {len(self.stamps)} steps ran: need more than warmup={self.warmup} + 1")
        return statistics.median(gaps)
