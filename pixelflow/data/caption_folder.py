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
from PIL import Image
from torchvision import transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from pixelflow.data.datamodule import ImageDataModule
from pixelflow.data.imagenet import deterministic_transform, random_transform
from pixelflow.data.robust import FolderSkipReporting, SkipLedger, SkippingFiles

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


class CaptionFolder(SkippingFiles):
    """(image tensor, caption) pairs of :func:`caption_pairs`; unreadable images are skipped (next index)."""

    def __init__(self, root: str | Path, transform: Callable | None = None, ledger: SkipLedger | None = None):
        self.root, self.transform = Path(root), transform
        self.pairs = caption_pairs(root)
        self.ledger = ledger if ledger is not None else SkipLedger(len(self.pairs))

    def __len__(self) -> int:
        return len(self.pairs)

    def image_path(self, index: int) -> Path:
        return self.pairs[index][0]

    def item(self, index: int, image: Image.Image) -> tuple[torch.Tensor, str]:
        return (self.transform(image) if self.transform is not None else image), read_caption(self.pairs[index][1])

    @property
    def broken_hint(self) -> str:
        return f"are the files under {self.root} images?"


class CaptionFolderDataModule(FolderSkipReporting, ImageDataModule):
    """Batches (images, captions: list[str]) from a caption folder (see the module docstring)."""

    def __init__(self, root: str, batch_size: int = 32, image_size: int = 256, num_workers: int = 8, seed: int = 0,
                 crop: str = "random", resize_size: int | None = None, flip: bool = False):
        super().__init__(batch_size, image_size, 0, None, num_workers, seed)
        self.class_names = None  # captions, no classes
        self.root = root
        self.transform = transforms.Compose([deterministic_transform(image_size, crop, resize_size),
                                             random_transform(image_size, flip)])

    def train_files(self) -> CaptionFolder:
        return CaptionFolder(self.root, self.transform)
