"""The datamodule interface every dataset plugs into, and a resumable infinite sampler.

Batches are ``(images, labels)``: images float (B, C, H, W) in [-1, 1], labels int64 (B,).
Training is step-based: the sampler is an endless, seeded stream of indices, so a resumed
run sees exactly the samples an uninterrupted run would have seen.
"""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["ResumableRandomSampler", "ImageDataModule"]


class ResumableRandomSampler(Sampler[int]):
    """Endless stream of epoch-wise random permutations, split across ranks, startable at any position.

    Global position n (over all ranks) reads ``perm(seed, n // N)[n % N]``; rank r of W takes
    positions r, r + W, ... beginning at ``start * W + r`` where ``start`` counts this rank's
    samples already consumed.
    """

    def __init__(self, num_samples: int, seed: int = 0, rank: int = 0, world_size: int = 1, start: int = 0):
        if num_samples <= 0:
            raise ValueError("the training dataset is empty: check data paths and split")
        self.num_samples, self.seed, self.rank, self.world_size, self.start = num_samples, seed, rank, world_size, start

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def __iter__(self) -> Iterator[int]:
        position = self.start * self.world_size + self.rank
        while True:
            epoch, offset = divmod(position, self.num_samples)
            chunk = self._permutation(epoch)[offset::self.world_size]
            yield from chunk.tolist()
            position += len(chunk) * self.world_size


class ImageDataModule(L.LightningDataModule):
    """Base datamodule: subclasses implement :meth:`build_train_dataset` (and may override loaders).

    Attributes used by the rest of the framework: ``image_size``, ``num_classes``,
    ``class_names``, ``batch_size`` (the per-device micro-batch).
    """

    def __init__(self, batch_size: int, image_size: int, num_classes: int, class_names: list[str] | None = None,
                 num_workers: int = 0, seed: int = 0):
        super().__init__()
        self.batch_size, self.image_size, self.num_workers, self.seed = batch_size, image_size, num_workers, seed
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self._start = 0
        self._train: Dataset | None = None

    def build_train_dataset(self) -> Dataset:
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        if self._train is None:
            self._train = self.build_train_dataset()

    def _rank_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_world()
        sampler = ResumableRandomSampler(len(self._train), self.seed, rank, world, start=self._start)
        return DataLoader(self._train, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          drop_last=True, pin_memory=torch.cuda.is_available(),
                          persistent_workers=self.num_workers > 0)

    def samples_consumed(self) -> int:
        """Samples this rank has trained on: optimizer steps x accumulation x micro-batch."""
        trainer = self.trainer
        return trainer.global_step * trainer.accumulate_grad_batches * self.batch_size if trainer else 0

    def state_dict(self) -> dict:
        return {"samples_consumed": self.samples_consumed(), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self._start, self.seed = int(state["samples_consumed"]), int(state["seed"])
