"""The training console: one progress bar over the whole run, and no Lightning tips a user cannot act on."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

__all__ = ["StepProgressBar", "silence_lightning_tips"]


class StepProgressBar(TQDMProgressBar):
    """Optimizer step / ``max_steps`` with the logged loss, rate and ETA; one bar for the run, not one per epoch."""

    def init_train_tqdm(self) -> Any:
        bar = super().init_train_tqdm()
        bar.unit = "step"
        return bar

    def on_train_start(self, trainer: L.Trainer, *_: Any) -> None:
        super().on_train_start()
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.initial = bar.n = trainer.global_step  # a resumed run: rate and ETA from the steps done now
        bar.set_description("train")

    def on_train_epoch_start(self, *_: Any) -> None:
        """Nothing: the bar counts the run's steps across epochs."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *_: Any) -> None:
        bar, step = self.train_progress_bar, trainer.global_step
        if step != bar.n and self._should_update(step, bar.total):
            bar.n = step
            bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)  # the logger's version: always 0 in a run directory
        return metrics


def _not_a_tip(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("💡 Tip")


def silence_lightning_tips() -> None:
    """Drop Lightning's advertising tips (e.g. the litlogger one) from its rank-zero log; keep everything else."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_not_a_tip)
