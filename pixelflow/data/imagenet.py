"""ImageNet (ImageFolder layout ``root/<wnid>/*.JPEG``) with the published augmentation.

Two crops, both followed by a random horizontal flip:

- ``random`` (published PixelFlow recipe): resize the short side to 288 (for 256 px; 9/8 of the
  image size in general) with Lanczos, then a random 256 crop.
- ``adm`` (ADM / guided-diffusion centre crop): halve with a BOX filter while the short side is at
  least twice the target, resize the short side to the target with BICUBIC, crop the centre.

Unreadable files are skipped (the next index is read instead), counted and reported.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torchvision import transforms
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import find_classes

from pixelflow.data.datamodule import ImageDataModule
from pixelflow.data.robust import FolderSkipReporting, SkipLedger, SkippingFiles, open_rgb

__all__ = ["CROPS", "adm_center_crop", "resize_short_side", "deterministic_transform", "random_transform",
           "imagenet_class_names", "RobustImageFolder", "ImageNetDataModule"]

CROPS = ("random", "adm")


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
    """Resize (Lanczos) so the short side is ``size``, keeping the aspect ratio."""
    return transforms.functional.resize(image, size, interpolation=transforms.InterpolationMode.LANCZOS)


def adm_center_crop(image: Image.Image, size: int) -> Image.Image:
    """ADM centre crop: BOX-halve while min side >= 2*size, BICUBIC short side -> size, centre crop."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(side // 2 for side in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(side * scale) for side in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


class ADMCenterCrop:
    """Picklable transform wrapper around :func:`adm_center_crop`."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        return adm_center_crop(image, self.size)


class ResizeShortSide:
    """Picklable transform wrapper around :func:`resize_short_side`."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        return resize_short_side(image, self.size)


def default_resize(image_size: int) -> int:
    """Short side before the random crop: 288 for 256 px (the published 9/8 ratio)."""
    return round(image_size * 9 / 8)


def deterministic_transform(image_size: int, crop: str = "random", resize_size: int | None = None) -> Callable:
    """The part of the augmentation that involves no randomness (what shards store pre-applied)."""
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {crop!r}")
    if crop == "adm":
        return ADMCenterCrop(image_size)
    return ResizeShortSide(resize_size or default_resize(image_size))


def random_transform(image_size: int, flip: bool = True) -> transforms.Compose:
    """The random part: crop to ``image_size`` (a no-op on ADM crops), flip, scale to [-1, 1]."""
    ops = [transforms.RandomCrop(image_size)]
    if flip:
        ops.append(transforms.RandomHorizontalFlip())
    ops += [transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)]
    return transforms.Compose(ops)


def imagenet_class_names(wnids: list[str]) -> list[str]:
    """Human-readable names for WordNet ids via timm's bundled ImageNet metadata; unknown ids stay as they are."""
    try:
        from timm.data import ImageNetInfo
    except ImportError:
        return list(wnids)
    info = ImageNetInfo()
    known = set(info.label_names())
    return [info.label_name_to_description(w) if w in known else w for w in wnids]


class RobustImageFolder(SkippingFiles, ImageFolder):
    """ImageFolder whose unreadable files are skipped (the next readable index is returned) and counted."""

    def __init__(self, root: str | Path, transform: Callable | None = None, ledger: SkipLedger | None = None):
        super().__init__(str(root), transform=transform, loader=open_rgb)
        self.ledger = ledger if ledger is not None else SkipLedger(len(self.samples))

    def image_path(self, index: int) -> str:
        return self.samples[index][0]

    def item(self, index: int, image: Image.Image) -> tuple[torch.Tensor, int]:
        return (self.transform(image) if self.transform is not None else image), self.samples[index][1]

    @property
    def broken_hint(self) -> str:
        return f"is {self.root} a readable ImageFolder?"


class ImageNetDataModule(FolderSkipReporting, ImageDataModule):
    """ImageNet-1k train folder (or any ImageFolder) with the published or the ADM augmentation.

    ``num_classes`` and class names come from the sub-folder names (wnids -> names via timm).
    """

    def __init__(self, root: str, batch_size: int = 32, image_size: int = 256, num_workers: int = 8, seed: int = 0,
                 crop: str = "random", resize_size: int | None = None, flip: bool = True):
        if not Path(root).is_dir():
            raise FileNotFoundError(f"ImageNet train folder {root} does not exist: see data/README.md "
                                    "(expected root/<wnid>/*.JPEG; set data.root=...)")
        self.wnids, _ = find_classes(root)
        super().__init__(batch_size, image_size, len(self.wnids), imagenet_class_names(self.wnids), num_workers, seed)
        self.root = root
        self.transform = transforms.Compose([deterministic_transform(image_size, crop, resize_size),
                                             random_transform(image_size, flip)])

    def train_files(self) -> RobustImageFolder:
        return RobustImageFolder(self.root, self.transform)
