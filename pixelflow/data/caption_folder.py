"""Text-to-image pairs from a folder: every image (any depth) with a same-name ``.txt`` caption beside it.

    root/cats/0001.jpg + root/cats/0001.txt ("a cat asleep on a sofa"), ...

Images get the ImageNet augmentation's deterministic part (short side resize, or the ADM centre crop)
and a random crop (flips are off by default: captions may say "left" or "right"). Unreadable images
are skipped, counted and reported (:mod:`pixelflow.data.robust`); a missing caption is an error.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from pixelflow.data.datamodule import ImageDataModule
from pixelflow.data.imagenet import MAX_CONSECUTIVE_UNREADABLE, deterministic_transform, random_transform
from pixelflow.data.robust import UNREADABLE_ERRORS, SkipLedger, SkipReporting, open_rgb

__all__ = ["caption_pairs", "read_caption", "CaptionFolder", "CaptionFolderDataModule"]


def read_caption(path: Path) -> str:
    """The caption in a UTF-8 text file, surrounding whitespace stripped."""
    return path.read_text(encoding="utf-8").strip()


def caption_pairs(root: str | Path) -> list[tuple[Path, Path]]:
    """Sorted (image, caption file) pairs under ``root``; every image must have its ``.txt``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"caption folder {root} does not exist: expected images with same-name .txt captions "
                                "beside them (root/**/name.jpg + name.txt); set data.root=...")
    images = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
    if not images:
        raise ValueError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {root}")
    missing = [p for p in images if not p.with_suffix(".txt").is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(images)} images under {root} have no caption, e.g. {missing[0]} "
                                f"needs {missing[0].with_suffix('.txt').name} beside it: write the captions or move those "
                                "images out of the folder")
    return [(p, p.with_suffix(".txt")) for p in images]


class CaptionFolder(Dataset):
    """(image tensor, caption) pairs of :func:`caption_pairs`; unreadable images are skipped (next index)."""

    def __init__(self, root: str | Path, transform: Callable | None = None, ledger: SkipLedger | None = None):
        self.root, self.transform = Path(root), transform
        self.pairs = caption_pairs(root)
        self.ledger = ledger if ledger is not None else SkipLedger(len(self.pairs))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        for offset in range(MAX_CONSECUTIVE_UNREADABLE):
            i = (index + offset) % len(self.pairs)
            image_path, text_path = self.pairs[i]
            try:
                image = open_rgb(image_path)
            except UNREADABLE_ERRORS as err:
                self.ledger.record(str(image_path), err, index=i)
                continue
            return (self.transform(image) if self.transform is not None else image), read_caption(text_path)
        raise RuntimeError(f"{MAX_CONSECUTIVE_UNREADABLE} unreadable images in a row from {self.pairs[index][0]}: "
                           f"are the files under {self.root} images?")


class CaptionFolderDataModule(SkipReporting, ImageDataModule):
    """Batches (images, captions: list[str]) from a caption folder (see the module docstring)."""

    def __init__(self, root: str, batch_size: int = 32, image_size: int = 256, num_workers: int = 8, seed: int = 0,
                 crop: str = "random", resize_size: int | None = None, flip: bool = False):
        super().__init__(batch_size, image_size, 0, None, num_workers, seed)
        self.class_names = None  # captions, no classes
        self.root = root
        self.transform = transforms.Compose([deterministic_transform(image_size, crop, resize_size),
                                             random_transform(image_size, flip)])

    def build_train_dataset(self) -> Dataset:
        dataset = CaptionFolder(self.root, self.transform)
        self.skips = dataset.ledger
        return dataset

    def samples_per_pass(self) -> int:
        return len(self._train) if self._train is not None else 0

    def describe_skips(self) -> str:
        bad = self.skips.bad_indices()
        if not bad:
            return ""
        names = [str(self._train.pairs[i][0]) for i in bad[:10]]
        return f"{len(bad)} distinct unreadable image(s): " + ", ".join(names) + (" ..." if len(bad) > 10 else "")
