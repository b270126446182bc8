"""Reference image sets: named datasets (``mnist_train`` / ``mnist_valid`` / ``mnist_test``) or a path."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pixelflow.data.mnist import default_mnist_path, load_mnist_arrays
from pixelflow.metrics.io import EvaluationInputError, ImageSet, image_set_from_array, load_image_set, sha256_file

__all__ = ["NAMED_REFERENCES", "MNIST_DEFAULT_NUM_REF", "mnist_images", "resolve_reference", "is_mnist_reference",
           "default_num_ref"]

NAMED_REFERENCES = {"mnist_train": "train", "mnist_valid": "valid", "mnist_test": "test"}
# Inception features are slow on a CPU: the first 500 images of a split keep a first evaluation short (times in
# docs/evaluation.md). num_ref=null uses every image.
MNIST_DEFAULT_NUM_REF = 500


def mnist_images(split: str) -> tuple[np.ndarray, np.ndarray]:
    """MNIST ``split`` as the project's models see it: uint8 (N, 32, 32, 3), digits zero-padded 28 -> 32, and labels."""
    images, labels = load_mnist_arrays()[split]
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(padded[..., None], 3, axis=-1), labels


def is_mnist_reference(spec: str) -> bool:
    """Whether ``spec`` names one of the MNIST references (for which the MNIST classifier metrics apply)."""
    return spec in NAMED_REFERENCES


def default_num_ref(spec: str, num_ref: int | str | None) -> int | None:
    """``num_ref=auto``: :data:`MNIST_DEFAULT_NUM_REF` for the named MNIST references, every image of a path."""
    if num_ref != "auto":
        return num_ref
    return MNIST_DEFAULT_NUM_REF if is_mnist_reference(spec) else None


def resolve_reference(spec: str, num_workers: int = 0) -> ImageSet:
    """A named reference (see :data:`NAMED_REFERENCES`) or a path (ADM npz, npz of real images, folder of PNGs)."""
    if spec in NAMED_REFERENCES:
        split = NAMED_REFERENCES[spec]
        images, labels = mnist_images(split)
        source = default_mnist_path()
        return image_set_from_array(images, f"{spec} (MNIST {split} split, 32 px, {source})", sha256_file(source), labels)
    path = Path(spec).expanduser()
    if not path.exists() and path.suffix == "" and "/" not in spec:
        raise EvaluationInputError(f"unknown reference {spec!r}: known named references are {sorted(NAMED_REFERENCES)}; "
                                   "otherwise pass a path to an ADM reference batch .npz, an .npz of real images or a folder of PNGs")
    return load_image_set(path, num_workers)
