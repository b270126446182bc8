"""LightningModule: cascade flow-matching training with EMA, for any model size and dataset."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import asdict
from functools import partial
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from pixelflow.cascade import CascadeSchedule
from pixelflow.checkpoint import model_kwargs
from pixelflow.model import PixelFlowTransformer
from pixelflow.objective import cascade_loss

__all__ = ["PixelFlowLitModule"]


def lr_factor(step: int, warmup_steps: int, decay_start: int, total_steps: int) -> float:
    """Warmup-stable-decay multiplier of the lr at 0-based ``step``: (step + 1) / warmup_steps while warming
    up, 1 until ``decay_start``, then linear to 0 at ``total_steps`` (and 0 after it)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step < decay_start:
        return 1.0
    return max(0.0, (total_steps - step) / max(1, total_steps - decay_start))


def ema_update(ema_params: list[torch.Tensor], params: list[torch.Tensor], num_averaged: torch.Tensor, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * param (a picklable stand-in for torch's closure, for ddp_spawn)."""
    torch._foreach_lerp_(ema_params, params, 1.0 - decay)


class PixelFlowLitModule(L.LightningModule):
    """Trains ``model`` on the cascade loss; keeps one EMA copy per rate in ``ema_decays`` (the first is used for
    samples and ``export/model.pt``).

    Randomness (stages, t, noise, label dropout) comes from a generator seeded by
    (seed, optimizer step, micro-batch within the step, rank), so a resumed run draws
    exactly what an uninterrupted run would have drawn.
    """

    def __init__(
        self,
        model: PixelFlowTransformer,
        schedule: CascadeSchedule,
        lr: float = 1e-4,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        ema_decays: Sequence[float] | None = (0.9999,),
        lr_warmup_steps: int = 0,
        lr_decay_fraction: float = 0.0,
        label_dropout: float = 0.1,
        seed: int = 0,
        class_names: list[str] | None = None,
    ):
        super().__init__()
        self.ema_decays = [float(d) for d in ema_decays or ()]
        if not all(0.0 < d < 1.0 for d in self.ema_decays) or len(set(self.ema_decays)) != len(self.ema_decays):
            raise ValueError(f"ema_decays must be distinct rates in (0, 1), e.g. [0.9999, 0.999], or null (no EMA); got {ema_decays}")
        if lr_warmup_steps < 0 or not 0.0 <= lr_decay_fraction <= 1.0:
            raise ValueError(f"need lr_warmup_steps >= 0 and lr_decay_fraction in [0, 1], got {lr_warmup_steps}, {lr_decay_fraction}")
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
        self.model, self.schedule = model, schedule
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.lr_warmup_steps, self.lr_decay_fraction = lr_warmup_steps, lr_decay_fraction
        self.label_dropout, self.seed, self.class_names = label_dropout, seed, class_names
        self.emas = nn.ModuleList(AveragedModel(model, multi_avg_fn=partial(ema_update, decay=d)) for d in self.ema_decays)
        self.emas.requires_grad_(False)
        self._micro_batch = 0

    @property
    def sampling_model(self) -> PixelFlowTransformer:
        """The weights to sample from: the first EMA when kept, else the live model."""
        return self.ema_model(None)

    def ema_model(self, decay: float | None) -> PixelFlowTransformer:
        """The EMA weights of rate ``decay`` (None: the first EMA, or the live model when none is kept)."""
        if decay is None:
            return self.emas[0].module if self.ema_decays else self.model
        if float(decay) not in self.ema_decays:
            raise ValueError(f"no EMA with rate {decay} in this run; it keeps module.ema_decays={self.ema_decays}")
        return self.emas[self.ema_decays.index(float(decay))].module

    def _generator(self) -> torch.Generator:
        step_seed = (self.global_step * 4096 + self._micro_batch) * max(self.trainer.world_size, 1) + self.global_rank
        return torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + step_seed)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss, per_stage = cascade_loss(self.model, self.schedule, images, labels, self._generator(), self.label_dropout)
        self._micro_batch += 1
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.learning_rate(self.global_step))
        for k, value in per_stage.items():
            self.log(f"train/loss_stage{k}", value)
        return loss

    def learning_rate(self, step: int) -> float:
        """The lr of optimizer step ``step``: a function of the step and ``trainer.max_steps`` alone, so a
        resumed run needs no scheduler state (resuming with a larger max_steps moves the decay window)."""
        total = decay_start = sys.maxsize  # no decay
        if self.lr_decay_fraction:
            total = self.trainer.max_steps
            decay_start = round(total * (1 - self.lr_decay_fraction))
        return self.lr * lr_factor(step, self.lr_warmup_steps, decay_start, total)

    def on_fit_start(self) -> None:
        if self.lr_decay_fraction and not self.trainer.max_steps > 0:
            raise ValueError("module.lr_decay_fraction needs a finite trainer.max_steps (the decay ends there)")

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        for group in optimizer.param_groups:
            group["lr"] = self.learning_rate(self.global_step)
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self._micro_batch = 0
        for ema in self.emas:
            ema.update_parameters(self.model)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW; its lr is set before every step by :meth:`learning_rate` (constant by default, as in the paper)."""
        return torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay, betas=self.betas)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["pixelflow"] = {
            "model": model_kwargs(self.model),
            "schedule": asdict(self.schedule),
            "class_names": self.class_names,
            "has_ema": bool(self.ema_decays),
            "ema_decays": self.ema_decays,  # state_dict keys emas.<i>.module.* hold rate ema_decays[i]
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resume checkpoints written before several EMAs existed (one EMA under ``ema.``) as ``emas.0.``."""
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("ema.")]:
            state["emas.0." + key[len("ema."):]] = state.pop(key)
