"""LightningModule: cascade flow-matching training with EMA, for any model size and dataset."""

from __future__ import annotations

import logging
import math
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
from pixelflow.text import TextEncoder
from pixelflow.training.objective import Objective, cascade_loss
from pixelflow.training.process_group import destroy_gloo_group_at_exit
from pixelflow.training.repa import RepaAlignment
from pixelflow.training.sharding import is_fsdp

__all__ = ["PixelFlowLitModule", "DivergenceError", "nonfinite_tensors"]

logger = logging.getLogger(__name__)


class DivergenceError(RuntimeError):
    """Training stopped: too many non-finite steps in a row, or weights about to be saved are not finite."""


def nonfinite_tensors(named: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors in ``named`` holding a NaN or an infinity."""
    return [k for k, v in named.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


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

    Text-to-image models (``cross_attention_dim``) take a frozen ``text_encoder``: batches carry captions,
    dropped to the empty prompt "" with probability ``label_dropout`` (caption dropout, for guidance). The
    encoder is a plain attribute, not a submodule: it is not trained, not averaged into the EMAs and not in
    the checkpoint's state_dict (it is rebuilt from the config on resume; the export saves it beside
    ``model.pt``).

    Randomness (stages, t, noise, label or caption dropout) comes from a generator seeded by
    (seed, optimizer step, micro-batch within the step, rank), so a resumed run draws
    exactly what an uninterrupted run would have drawn.

    ``objective`` (:class:`~pixelflow.training.objective.Objective`, default the published recipe) chooses the
    prediction target, loss space, time sampling and stage shares and weights; ``alignment`` is its REPA term
    (a submodule: the projector trains with the model and is in the checkpoint, not in the EMAs or the export).

    A non-finite loss or global gradient norm skips that optimizer step (no weight, moment or EMA
    update; ``train/skipped_steps`` counts them); ``max_nonfinite_steps`` of them in a row stop the run.
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
        max_nonfinite_steps: int = 20,
        text_encoder: TextEncoder | None = None,
        objective: Objective | None = None,
        alignment: RepaAlignment | None = None,
    ):
        super().__init__()
        _check_text_encoder(model, text_encoder)
        objective = objective or Objective()
        objective.check_stages(schedule.num_stages)
        _check_objective(model, objective, alignment)
        self.ema_decays = [float(d) for d in ema_decays or ()]
        if not all(0.0 < d < 1.0 for d in self.ema_decays) or len(set(self.ema_decays)) != len(self.ema_decays):
            raise ValueError(f"ema_decays must be distinct rates in (0, 1), e.g. [0.9999, 0.999], or null (no EMA); got {ema_decays}")
        if lr_warmup_steps < 0 or not 0.0 <= lr_decay_fraction <= 1.0:
            raise ValueError(f"need lr_warmup_steps >= 0 and lr_decay_fraction in [0, 1], got {lr_warmup_steps}, {lr_decay_fraction}")
        if not 0.0 <= label_dropout < 1.0:
            raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}")
        if max_nonfinite_steps < 1:
            raise ValueError(f"max_nonfinite_steps must be >= 1, got {max_nonfinite_steps}")
        self.model, self.schedule = model, schedule
        self.lr, self.weight_decay, self.betas = lr, weight_decay, tuple(betas)
        self.lr_warmup_steps, self.lr_decay_fraction = lr_warmup_steps, lr_decay_fraction
        self.label_dropout, self.seed, self.class_names = label_dropout, seed, class_names
        self.text_encoder = text_encoder
        self.objective, self.alignment = objective, alignment
        self.emas = nn.ModuleList(AveragedModel(model, multi_avg_fn=partial(ema_update, decay=d)) for d in self.ema_decays)
        self.emas.requires_grad_(False)
        self._micro_batch = 0
        self.max_nonfinite_steps = max_nonfinite_steps
        self.skipped_steps = self._nonfinite_streak = 0  # non-finite steps: in total, and in a row now
        self._loss_finite: torch.Tensor | None = None  # all micro-batch losses of this step finite (no host sync)
        self._step_finite = True

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

    @property
    def recorded_sampler(self) -> dict[str, Any] | None:
        """The sampler this model was trained for, recorded in checkpoints and exports (None: any; a distilled
        student records its own)."""
        return None

    def batch_loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The micro-batch's loss and the terms to log (``train/loss_<name>``)."""
        images, labels = batch  # labels: class ids, or captions for a text-to-image model
        encode = self.text_encoder.encode if self.text_encoder is not None else None
        return cascade_loss(self.model, self.schedule, images, labels, self._generator(), self.label_dropout,
                            encode_text=encode, objective=self.objective, alignment=self.alignment)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss, terms = self.batch_loss(batch)
        self._micro_batch += 1
        finite = torch.isfinite(loss.detach())
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite
        self.log("train/loss", loss, prog_bar=True)
        self.log("train/lr", self.learning_rate(self.global_step))
        for name, value in terms.items():
            self.log(f"train/loss_{name}", value)
        return loss

    def learning_rate(self, step: int) -> float:
        """The lr of optimizer step ``step``: a function of the step and ``trainer.max_steps`` alone, so a
        resumed run needs no scheduler state (resuming with a larger max_steps moves the decay window)."""
        total = decay_start = sys.maxsize  # no decay
        if self.lr_decay_fraction:
            total = self.trainer.max_steps
            decay_start = round(total * (1 - self.lr_decay_fraction))
        return self.lr * lr_factor(step, self.lr_warmup_steps, decay_start, total)

    def setup(self, stage: str) -> None:
        destroy_gloo_group_at_exit()  # in every process of a distributed run, after its group exists

    def on_fit_start(self) -> None:
        if self.text_encoder is not None:  # a plain attribute: Lightning does not move it with the module
            self.text_encoder.model.to(self.device)
        if self.alignment is not None:  # its frozen encoder is a plain attribute too
            self.alignment.encoder.to(self.device)
        if self.lr_decay_fraction and not self.trainer.max_steps > 0:
            raise ValueError("module.lr_decay_fraction needs a finite trainer.max_steps (the decay ends there)")

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        for group in optimizer.param_groups:
            group["lr"] = self.learning_rate(self.global_step)
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self._micro_batch = 0
        if not self._count_nonfinite():  # skipped step: the weights did not move, so neither do the EMAs
            return
        for ema in self.emas:
            ema.update_parameters(self.model)

    def configure_gradient_clipping(self, optimizer: Any, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip by the global gradient norm (under FSDP through the root module, which sees every shard) and drop
        the gradients when the loss or that norm is not finite, so that the optimizer step changes nothing."""
        root = self.trainer.strategy.model
        by_value = bool(gradient_clip_val) and gradient_clip_algorithm == "value"
        max_norm = float(gradient_clip_val) if gradient_clip_val and not by_value else math.inf
        if is_fsdp(self.trainer):  # torch.nn.utils.clip_grad_norm_ would see only local shards
            norm = root.clip_grad_norm_(max_norm)
        else:
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        finite = torch.isfinite(norm) if self._loss_finite is None else torch.isfinite(norm) & self._loss_finite
        self._step_finite = self.trainer.strategy.reduce_boolean_decision(bool(finite), all=True)
        self._loss_finite = None
        self.log("train/grad_norm", norm.float())
        if not self._step_finite:
            optimizer.zero_grad(set_to_none=True)  # AdamW skips parameters without a gradient: no update at all
        elif by_value:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _count_nonfinite(self) -> bool:
        """After an optimizer step: count a skipped one, stop after ``max_nonfinite_steps`` in a row; True if it stepped."""
        finite, self._step_finite = self._step_finite, True
        self._nonfinite_streak = 0 if finite else self._nonfinite_streak + 1
        self.skipped_steps += not finite
        self.log("train/skipped_steps", float(self.skipped_steps))
        if not finite:
            step = self.global_step  # Lightning counts the step after this hook
            logger.warning("step %d: non-finite loss or gradient norm, optimizer step skipped (%d in a row, %d in total)",
                           step, self._nonfinite_streak, self.skipped_steps)
            if self._nonfinite_streak >= self.max_nonfinite_steps:
                callback = self.trainer.checkpoint_callback
                last = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "") or self.trainer.ckpt_path
                raise DivergenceError(
                    f"stopping at step {step}: the loss or gradient norm was not finite in {self._nonfinite_streak} "
                    f"optimizer steps in a row (steps {step - self._nonfinite_streak + 1}-{step}; module.max_nonfinite_steps="
                    f"{self.max_nonfinite_steps}); those steps were skipped, so the weights are still finite. "
                    f"Last good checkpoint: {last or 'none written yet'}. Lower module.lr or check the data, then "
                    "resume (the newest checkpoint is picked up automatically).")
        return finite

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """AdamW over the model (and the REPA projector); its lr is set before every step by :meth:`learning_rate`
        (constant by default, as in the paper)."""
        params = list(self.model.parameters())
        if self.alignment is not None:
            params += list(self.alignment.projector.parameters())
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay, betas=self.betas)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["pixelflow"] = {
            "model": model_kwargs(self.model),
            "schedule": asdict(self.schedule),
            "class_names": self.class_names,
            "ema_decays": self.ema_decays,  # state_dict keys emas.<i>.module.* hold rate ema_decays[i]
            "text_encoder": None if self.text_encoder is None else self.text_encoder.spec,  # how to build it again
            "nonfinite_steps": {"skipped": self.skipped_steps, "streak": self._nonfinite_streak},
            "objective": self.objective.describe(),
        }
        if self.recorded_sampler is not None:
            checkpoint["pixelflow"]["sampler"] = self.recorded_sampler
        bad = nonfinite_tensors(checkpoint.get("state_dict", {}))
        if bad:
            raise DivergenceError(f"refusing to write a checkpoint at step {self.global_step}: {len(bad)} tensor(s) hold "
                                  f"NaN or inf (e.g. {bad[:3]}); the last checkpoint on disk is unchanged")

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Restore the non-finite step counters (Lightning restores weights, optimizer and loop state)."""
        counts = checkpoint["pixelflow"]["nonfinite_steps"]
        self.skipped_steps, self._nonfinite_streak = counts["skipped"], counts["streak"]

    def init_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Start training from ``state`` (a model state_dict): strict load into the live model and every EMA."""
        self.model.load_state_dict(state, strict=True)
        for ema in self.emas:
            ema.module.load_state_dict(state, strict=True)


def _check_text_encoder(model: PixelFlowTransformer, text_encoder: TextEncoder | None) -> None:
    """A text-to-image model needs a text encoder of its ``cross_attention_dim``; a class-to-image model none."""
    width = model.cross_attention_dim
    if width and text_encoder is None:
        raise ValueError(f"the model is text-to-image (cross_attention_dim={width}) but no text encoder was given: set "
                         "text_encoder in the config (e.g. experiment=mnist_t2i_quickstart) and a caption datamodule")
    if text_encoder is not None and not width:
        raise ValueError("a text encoder was given but the model is class-to-image (no cross_attention_dim): drop "
                         "text_encoder from the config, or train on captions (a caption datamodule builds a T2I model)")
    if text_encoder is not None and text_encoder.width != width:
        raise ValueError(f"the text encoder's width {text_encoder.width} differs from the model's cross_attention_dim "
                         f"{width}; build the model with cross_attention_dim={text_encoder.width}")


def _check_objective(model: PixelFlowTransformer, objective: Objective, alignment: RepaAlignment | None) -> None:
    """The objective, its REPA term and the network must agree; each conflict is named with its fix."""
    if model.prediction != objective.prediction:
        raise ValueError(f"the model predicts {model.prediction!r} but objective.prediction={objective.prediction!r}: build "
                         "the model with the objective's prediction (train.py does)")
    if (objective.repa is None) != (alignment is None):
        raise ValueError("objective.repa and the alignment term must come together: build the RepaAlignment from "
                         "objective.repa (train.py does), or set objective.repa=null")
    if alignment is None:
        return
    depth = len(model.transformer_blocks)
    if not 0 <= alignment.block < depth:
        raise ValueError(f"objective.repa.block={alignment.block} but the model has {depth} blocks (0-{depth - 1}): "
                         f"pick a block in range (REPA aligns an early one, e.g. {max(depth // 3 - 1, 0)})")
    if alignment.encoder.channels != model.in_channels:
        raise ValueError(f"the REPA encoder reads {alignment.encoder.channels}-channel images but the model's images have "
                         f"{model.in_channels}: use an encoder for this data (MNIST: pixelflow.training.repa.MNISTClassifierEncoder; "
                         "RGB: pixelflow.training.repa.TimmEncoder)")
