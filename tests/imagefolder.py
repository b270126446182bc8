"""A small ImageFolder with deliberately broken files, shared by the data, shard and scale tests."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

# Real ImageNet wnids (tench, goldfish, great white shark) plus a folder timm does not know.
CLASSES = ("n01440764", "n01443537", "n01484850", "zz_custom")
GOOD_PER_CLASS = 3
# Relative paths of the broken files: a truncated JPEG, random bytes named .JPEG, a zero-byte file.
CORRUPT = ("n01440764/truncated.JPEG", "n01443537/random_bytes.JPEG", "n01484850/empty.JPEG")


def _jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_image_folder(root: Path, seed: int = 0) -> Path:
    """root/<class>/img_k.JPEG (varied sizes and aspect ratios) plus the :data:`CORRUPT` files."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(GOOD_PER_CLASS):
            width, height = 40 + 13 * k + c, 36 + 7 * ((k + c) % 3)
            (folder / f"img_{k}.JPEG").write_bytes(_jpeg(rng, width, height))
    good = _jpeg(rng, 64, 48)
    (root / CORRUPT[0]).write_bytes(good[: len(good) // 2])
    (root / CORRUPT[1]).write_bytes(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
    (root / CORRUPT[2]).write_bytes(b"")
    return root


def num_good() -> int:
    return len(CLASSES) * GOOD_PER_CLASS
