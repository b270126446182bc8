"""Training callbacks: periodic sample grids from the EMA weights and the final export."""

from __future__ import annotations

import shutil
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

from pixelflow.checkpoint import export_released_format
from pixelflow.images import save_grid
from pixelflow.lit_module import DivergenceError, nonfinite_tensors
from pixelflow.samplers import CascadeSampler, SamplerConfig, to_uint8
from pixelflow.sharding import gather_model

__all__ = ["SampleGrid", "ExportWeights"]


class SampleGrid(L.Callback):
    """Every ``every_n_steps`` (and at the end), sample a fixed grid from the EMA weights.

    Rows are classes ``classes`` (default: the first ``num_classes`` up to 10), columns are
    ``per_class`` seeds; the seed and labels never change, so grids are comparable across steps.
    """

    def __init__(self, out_dir: str, every_n_steps: int = 500, per_class: int = 8, classes: list[int] | None = None,
                 seed: int = 0, steps: int = 10, cfg: float = 2.0, method: str = "euler", upscale: int = 2):
        self.out_dir, self.every_n_steps, self.per_class = Path(out_dir), every_n_steps, per_class
        self.classes, self.seed, self.upscale = classes, seed, upscale
        self.config = SamplerConfig(method=method, steps=steps, cfg=cfg)
        self._last_step, self._last_path = -1, None

    @rank_zero_only
    def write(self, pl_module: L.LightningModule, name: str) -> Path:
        model = pl_module.sampling_model
        classes = self.classes if self.classes is not None else list(range(min(model.num_classes, 10)))
        labels = torch.tensor(classes).repeat_interleave(self.per_class)
        was_training = model.training
        model.eval()
        sampler = CascadeSampler(model, pl_module.schedule, self.config)
        images = sampler.sample(labels, generator=torch.Generator(pl_module.device).manual_seed(self.seed)).images
        model.train(was_training)
        path = save_grid(to_uint8(images), self.out_dir / f"{name}.png", nrow=self.per_class, upscale=self.upscale)
        print(f"[pixelflow] sample grid: {path}")
        return path

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step, self._last_path = step, self.write(pl_module, f"step_{step:07d}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._last_path is not None and self._last_step == trainer.global_step:  # same weights and seed: same grid
            shutil.copyfile(self._last_path, self.out_dir / "final.png")
        else:
            self.write(pl_module, "final")


class ExportWeights(L.Callback):
    """At the end of training, write the EMA weights as ``model.pt`` + ``config.yaml`` (released layout).

    Under FSDP the full weights are gathered onto rank 0 first; non-finite weights are never written."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = gather_model(trainer, pl_module.sampling_model)  # collective under FSDP: every rank calls it
        if not trainer.is_global_zero:
            return
        if bad := nonfinite_tensors(model.state_dict()):
            raise DivergenceError(f"not exporting to {self.out_dir}: {len(bad)} tensor(s) hold NaN or inf (e.g. {bad[:3]})")
        path = export_released_format(model, pl_module.schedule, self.out_dir, pl_module.class_names)
        print(f"[pixelflow] exported EMA weights: {path}")
