"""Distillation data: a teacher checkpoint's cascade samples (:mod:`pixelflow.training.teacher_pairs`) as batches.

The teacher is loaded and checked when the datamodule is made, so a bad ``teacher=`` stops a run at start-up;
its pairs are sampled in :meth:`prepare_data` (once, resumably, into ``pairs_dir``). Batches are
``(stage ends, labels, seeds)``: one (B, C, s_k, s_k) tensor per stage, int64 labels and int64 noise seeds.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from pixelflow.checkpoint import LoadedModel, load_pixelflow
from pixelflow.data.datamodule import ImageDataModule
from pixelflow.sampling.samplers import SamplerConfig
from pixelflow.training.teacher_pairs import TeacherPairs, write_teacher_pairs

__all__ = ["load_teacher", "TeacherPairsDataModule"]


def load_teacher(path: str | Path | None, image_size: int | None = None) -> LoadedModel:
    """The teacher checkpoint at ``path`` (anything :func:`~pixelflow.checkpoint.load_pixelflow` reads), checked
    to be a class-to-image model of ``image_size``; every problem is named with its fix."""
    if not path:
        raise ValueError("distillation needs a teacher: teacher=runs/mnist_quickstart/export/model.pt (any export, "
                         ".ckpt or hf:// checkpoint; `make train` makes that one)")
    if not str(path).startswith("hf://") and not Path(path).expanduser().is_file():
        raise FileNotFoundError(f"teacher={path} does not exist: train one first (`make train` writes "
                                "runs/mnist_quickstart/export/model.pt) or point teacher= at an export or .ckpt")
    teacher = load_pixelflow(path)
    if teacher.model.cross_attention_dim:
        raise ValueError(f"teacher={path} is a text-to-image model; this distillation trains a class-to-image student: "
                         "give a class-to-image teacher")
    if image_size is not None and teacher.schedule.image_size != image_size:
        raise ValueError(f"teacher={path} makes {teacher.schedule.image_size} px images but this run is set to "
                         f"{image_size} px (data.image_size): use the teacher's size, data.image_size="
                         f"{teacher.schedule.image_size}")
    teacher.model.eval()
    return teacher


class TeacherPairsDataModule(ImageDataModule):
    """Batches of a teacher's stage ends; ``num_pairs`` of them, sampled with ``teacher_sampler`` (a
    ``conf/sampler`` mapping) at noise seeds ``pairs_seed * 10**7 + i``. Keep ``pairs_seed`` away from the seeds
    the student is evaluated at (evaluation uses seed 0), or it is scored on the very noises it was fitted to."""

    def __init__(self, teacher: str, teacher_sampler: Mapping[str, Any], pairs_dir: str, num_pairs: int = 10_000,
                 pairs_seed: int = 7, pairs_batch_size: int = 250, batch_size: int = 64, image_size: int = 32,
                 num_workers: int = 0, seed: int = 0):
        self.teacher = load_teacher(teacher, image_size)
        super().__init__(batch_size, image_size, self.teacher.model.num_classes, self.teacher.class_names, num_workers, seed)
        self.teacher_sampler = SamplerConfig.from_mapping(teacher_sampler, where="data.teacher_sampler")
        if num_pairs < batch_size:
            raise ValueError(f"data.num_pairs={num_pairs} is less than one batch ({batch_size}): make more pairs")
        self.pairs_dir, self.num_pairs, self.pairs_seed, self.pairs_batch_size = Path(pairs_dir), num_pairs, pairs_seed, pairs_batch_size

    def prepare_data(self) -> None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        write_teacher_pairs(self.teacher, self.teacher_sampler, self.pairs_dir, self.num_pairs, self.pairs_batch_size,
                            self.pairs_seed, device)
        self.teacher.model.cpu()

    def build_train_dataset(self) -> Dataset:
        return TeacherPairs(self.pairs_dir)
