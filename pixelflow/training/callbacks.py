"""Training callbacks: periodic sample grids from the EMA weights and the final export."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import Logger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

from pixelflow.cascade import CascadeSchedule
from pixelflow.checkpoint import ema_export_name, export_released_format
from pixelflow.images import save_grid
from pixelflow.sampling.indexed import sample_uint8
from pixelflow.sampling.samplers import CascadeSampler, SamplerConfig
from pixelflow.text import TextEncoder
from pixelflow.training.lit_module import DivergenceError, nonfinite_tensors
from pixelflow.training.sharding import gather_model

__all__ = ["SampleGrid", "ExportWeights", "log_sample_grid", "save_text_encoder", "student_sampler", "TEXT_ENCODER_DIR"]

logger = logging.getLogger(__name__)

TEXT_ENCODER_DIR = "text_encoder"  # beside model.pt in an export


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` (and at the end), sample a fixed sample grid from the EMA weights.

    Rows are classes ``classes`` (default: the first ``num_classes`` up to 10), or for a text-to-image
    model the ``prompts`` (without prompts no grid is drawn), columns are ``per_class`` seeds; the seed and
    labels never change, so grids are comparable across steps. ``sampler``: :class:`SamplerConfig` fields (a
    ``conf/sampler`` preset). Images are sampled ``chunk_size`` at a time (bounding the memory taken on top of
    training) in ``precision`` (:mod:`pixelflow.precision`; auto = bf16 on CUDA); image i's noise comes from its
    own seed (:mod:`pixelflow.sampling.indexed`), so the grid does not depend on ``chunk_size``.
    """

    def __init__(self, out_dir: str, every_n_steps: int = 500, per_class: int = 8, classes: list[int] | None = None,
                 seed: int = 0, sampler: Mapping[str, Any] | SamplerConfig | None = None, upscale: int = 2,
                 chunk_size: int = 16, precision: str = "auto", prompts: list[str] | None = None):
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"callbacks.sample_grid.chunk_size must be an integer >= 1, got {chunk_size!r}")
        if prompts is not None and (isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts)):
            raise ValueError(f"prompts must be a list of strings (one grid row each), got {prompts!r}")
        self.prompts = list(prompts) if prompts else None
        self.out_dir, self.every_n_steps, self.per_class = Path(out_dir), every_n_steps, per_class
        self.classes, self.seed, self.upscale = classes, seed, upscale
        self.chunk_size, self.precision = chunk_size, precision
        self.config = SamplerConfig.from_mapping(sampler or {}, "callbacks.sample_grid.sampler")
        self._last_step, self._last_path = -1, None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.config = student_sampler(pl_module, self.config, "sample grid")
        self.config.stage_steps(pl_module.schedule.num_stages)  # a wrong per-stage length fails before training
        if not pl_module.model.cross_attention_dim:
            return
        if self.config.method != "euler":
            raise ValueError(f"callbacks.sample_grid.sampler.method={self.config.method!r}: text-to-image grids sample "
                             "with Euler only; set callbacks.sample_grid.sampler.method=euler")
        if not self.prompts and trainer.is_global_zero:
            logger.info("sample grid: off for this text-to-image model (no callbacks.sample_grid.prompts given)")

    @rank_zero_only
    def write(self, pl_module: L.LightningModule, name: str) -> Path | None:
        model = pl_module.sampling_model
        if model.cross_attention_dim and not self.prompts:
            return None
        was_training = model.training
        model.eval()
        if model.cross_attention_dim:
            prompts = [p for p in self.prompts for _ in range(self.per_class)]
            images = self.sample_text(model, pl_module.schedule, prompts, pl_module.text_encoder)
        else:
            classes = self.classes if self.classes is not None else list(range(min(model.num_classes, 10)))
            labels = torch.tensor(classes).repeat_interleave(self.per_class)
            images = self.sample(model, pl_module.schedule, labels)
        model.train(was_training)
        path = save_grid(images, self.out_dir / f"{name}.png", nrow=self.per_class, upscale=self.upscale)
        logger.info("sample grid: %s", path)
        log_sample_grid(pl_module.loggers, path, pl_module.global_step)
        return path

    def sample(self, model: torch.nn.Module, schedule: CascadeSchedule, labels: torch.Tensor) -> torch.Tensor:
        """uint8 NHWC images for ``labels`` (image i: sample i of the run with seed ``seed``)."""
        return sample_uint8(CascadeSampler(model, schedule, self.config), lambda chunk: labels[chunk],
                            torch.arange(len(labels)), self.seed, self.chunk_size, self.precision)

    def sample_text(self, model: torch.nn.Module, schedule: CascadeSchedule, prompts: list[str],
                    text_encoder: TextEncoder) -> torch.Tensor:
        """uint8 NHWC images for ``prompts`` (text-to-image), seeded as :meth:`sample`."""
        return sample_uint8(CascadeSampler(model, schedule, self.config),
                            lambda chunk: text_encoder.condition([prompts[i] for i in chunk.tolist()]),
                            torch.arange(len(prompts)), self.seed, self.chunk_size, self.precision)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step, self._last_path = step, self.write(pl_module, f"step_{step:07d}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_path is not None and self._last_step == trainer.global_step:  # same weights and seed: same grid
            shutil.copyfile(self._last_path, self.out_dir / "final.png")
        else:
            self.write(pl_module, "final")


def student_sampler(pl_module: L.LightningModule, config: SamplerConfig, what: str) -> SamplerConfig:
    """The sampler a module records (a distilled student is sampled as it was distilled), else ``config``."""
    recorded = pl_module.recorded_sampler
    if recorded is None:
        return config
    ours = SamplerConfig.from_mapping(recorded, where="the module's recorded sampler")
    if ours != config:
        logger.info("%s: sampling with the student's own sampler %s, not the configured one", what, ours)
    return ours


def log_sample_grid(loggers: list[Logger], path: Path, step: int) -> None:
    """Send a saved sample grid to every logger: W&B as an image (key ``samples``), any other logger with a folder
    (TensorBoard, CSV) as a PNG copy in ``<log_dir>/samples/``."""
    for run_logger in loggers:
        if isinstance(run_logger, WandbLogger):
            run_logger.log_image(key="samples", images=[str(path)], step=step, caption=[path.stem])
        elif run_logger.log_dir is not None:
            target = Path(run_logger.log_dir) / "samples" / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)


class ExportWeights(L.Callback):
    """At the end of training, write the first EMA's weights as ``model.pt`` + ``config.yaml`` (released layout),
    and every further EMA rate beside it as ``model_ema<rate>.pt``. A text-to-image run's frozen text encoder
    goes to ``text_encoder/`` (model and tokenizer, ``save_pretrained``), named in config.yaml's ``text_encoder``.

    Under FSDP the full weights are gathered onto rank 0 first; non-finite weights are never written."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        decays = pl_module.ema_decays
        rates = decays or [None]  # no EMA: export the live weights (sampling_model)
        text = None
        if pl_module.text_encoder is not None and trainer.is_global_zero:
            text = save_text_encoder(pl_module.text_encoder, Path(self.out_dir) / TEXT_ENCODER_DIR)
        for i, decay in enumerate(rates):
            model = gather_model(trainer, pl_module.ema_model(decay))  # collective under FSDP: every rank calls it
            if not trainer.is_global_zero:
                continue
            if bad := nonfinite_tensors(model.state_dict()):
                raise DivergenceError(f"not exporting to {self.out_dir}: {len(bad)} tensor(s) hold NaN or inf (e.g. {bad[:3]})")
            name = "model.pt" if i == 0 else ema_export_name(decay)
            path = export_released_format(model, pl_module.schedule, self.out_dir, pl_module.class_names, name, decays,
                                          text_encoder=text, objective=pl_module.objective.describe(),
                                          sampler=pl_module.recorded_sampler)
            if i:
                logger.info("exported EMA %s weights: %s", decay, path)
            else:
                logger.info("exported EMA weights: %s", path)


def save_text_encoder(text_encoder: TextEncoder, folder: Path) -> dict:
    """Write the encoder and its tokenizer to ``folder`` (loadable offline by :func:`pixelflow.text.load_t5`);
    return config.yaml's ``text_encoder`` entry (``source`` relative to the export folder)."""
    text_encoder.model.save_pretrained(folder)
    text_encoder.tokenizer.save_pretrained(folder)
    return {"source": folder.name, "max_length": text_encoder.max_length}
