"""Writing samples as pictures: one PNG per image, and grids (the ADM ``.npz`` layout: pixelflow.metrics.io)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision.utils import make_grid

from pixelflow.atomic import atomic_write

__all__ = ["save_grid", "save_pngs", "grid_image"]


def grid_image(images_uint8: torch.Tensor, nrow: int, upscale: int = 1) -> Image.Image:
    """NHWC uint8 -> one PIL grid (nearest-neighbour upscaled by ``upscale``)."""
    grid = make_grid(images_uint8.permute(0, 3, 1, 2), nrow=nrow, padding=2, pad_value=255)
    image = Image.fromarray(grid.permute(1, 2, 0).numpy())
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    return image


def save_grid(images_uint8: torch.Tensor, path: str | Path, nrow: int, upscale: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "wb") as f:
        grid_image(images_uint8, nrow, upscale).save(f, format="PNG")
    return path


def save_pngs(images_uint8: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, out_dir: str | Path) -> None:
    """One PNG per image, named by global sample index and label: ``000123_7.png``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for image, label, index in zip(images_uint8.numpy(), labels.tolist(), indices.tolist()):
        with atomic_write(out / f"{index:06d}_{label}.png", "wb") as f:
            Image.fromarray(image).save(f, format="PNG")

