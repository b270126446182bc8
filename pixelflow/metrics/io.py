"""Reading and writing image sets for evaluation: ADM-layout ``.npz`` batches and folders of PNGs.

ADM layout (openai/guided-diffusion ``evaluations/``): ``arr_0`` uint8 images (N, H, W, 3), optional
``arr_1`` int labels (N,); reference batches add FID statistics ``mu``, ``sigma`` (pool3, 2048) and
``mu_s``, ``sigma_s`` (spatial, 2023). This project also stores its sampler settings as a JSON string
in ``settings``. Everything is read with ``allow_pickle=False``; ``arr_0`` is streamed batch by batch,
so a 50k x 256 x 256 batch never has to fit in memory.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from pixelflow.atomic import atomic_save_npz

__all__ = ["EvaluationInputError", "ImageSet", "sha256_file", "load_image_set", "load_npz", "load_png_folder",
           "image_set_from_array", "write_adm_npz", "check_images", "STATS_KEYS"]

IMAGE_KEY, LABEL_KEY, SETTINGS_KEY = "arr_0", "arr_1", "settings"
STATS_KEYS = {"mu": (2048,), "sigma": (2048, 2048), "mu_s": (2023,), "sigma_s": (2023, 2023)}
LAYOUT_HELP = ("expected an ADM-layout npz: 'arr_0' uint8 images (N, H, W, 3), optional 'arr_1' int labels (N,), "
               "optional 'settings' (JSON string), and for reference batches 'mu', 'sigma', 'mu_s', 'sigma_s'")


class EvaluationInputError(ValueError):
    """An input file or option is missing or malformed; the message names the problem and the fix."""


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def check_images(shape: tuple[int, ...], dtype: np.dtype, where: str) -> None:
    """Raise a clear error unless images are uint8 (N, H, W, C) with C in (1, 3)."""
    if len(shape) != 4:
        raise EvaluationInputError(f"{where}: images have shape {tuple(shape)}; expected 4 dims (N, H, W, 3). "
                                   "Add a channel axis for grayscale: images[..., None]")
    if shape[-1] not in (1, 3):
        hint = " (this looks like NCHW: transpose with images.transpose(0, 2, 3, 1))" if shape[1] in (1, 3) else ""
        raise EvaluationInputError(f"{where}: images have shape {tuple(shape)}; expected channels-last (N, H, W, 3) or (N, H, W, 1){hint}")
    if np.dtype(dtype) != np.uint8:
        raise EvaluationInputError(f"{where}: images have dtype {np.dtype(dtype)}; expected uint8 in [0, 255]. Convert [-1, 1] floats with "
                                   "pixelflow.sampling.samplers.to_uint8 or np.clip(np.rint((x + 1) * 127.5), 0, 255).astype(np.uint8)")
    if shape[0] < 1 or shape[1] < 1 or shape[2] < 1:
        raise EvaluationInputError(f"{where}: image array {tuple(shape)} is empty")


def _rgb(batch: np.ndarray) -> np.ndarray:
    return np.repeat(batch, 3, axis=-1) if batch.shape[-1] == 1 else batch


@dataclass
class ImageSet:
    """A set of uint8 images read lazily, with optional labels, sampler settings and ADM reference statistics."""

    name: str
    sha256: str
    shape: tuple[int, int, int, int]  # (N, H, W, C) as stored; batches are always 3-channel
    read: Callable[[int], Iterator[np.ndarray]] = field(repr=False)
    labels: np.ndarray | None = None
    settings: Any = None
    stats: dict[str, np.ndarray] | None = None

    def __len__(self) -> int:
        return self.shape[0]

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        """uint8 (B, H, W, 3) batches of the first ``limit`` images (all by default)."""
        remaining = len(self) if limit is None else min(limit, len(self))
        for batch in self.read(batch_size):
            if remaining <= 0:
                return
            batch = _rgb(batch[:remaining])
            remaining -= len(batch)
            yield batch


def image_set_from_array(images: np.ndarray, name: str, sha256: str, labels: np.ndarray | None = None) -> ImageSet:
    """Wrap an in-memory uint8 NHWC array."""
    check_images(images.shape, images.dtype, name)
    return ImageSet(name, sha256, tuple(images.shape), lambda bs: (images[i:i + bs] for i in range(0, len(images), bs)), labels)


def _npy_header(member) -> tuple[tuple[int, ...], bool, np.dtype] | None:
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(member)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(member)
    return None


def _stream_npz_array(path: Path, key: str, shape: tuple[int, ...], dtype: np.dtype, batch_size: int) -> Iterator[np.ndarray]:
    row = int(np.prod(shape[1:])) * dtype.itemsize
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as member:
        _npy_header(member)
        for start in range(0, shape[0], batch_size):
            count = min(batch_size, shape[0] - start)
            data = member.read(count * row)
            if len(data) != count * row:
                raise EvaluationInputError(f"{path}: '{key}' is truncated at image {start + len(data) // row} of {shape[0]}; "
                                           "re-create the file")
            yield np.frombuffer(data, dtype=dtype).reshape(count, *shape[1:]).copy()  # writable, for torch.from_numpy


def _parse_settings(raw: np.ndarray) -> Any:
    text = str(raw[()]) if raw.ndim == 0 else str(raw)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def load_npz(path: str | Path) -> ImageSet:
    """ADM-layout npz -> :class:`ImageSet` (images streamed; labels, settings and stats loaded)."""
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile) as err:
        raise EvaluationInputError(f"{path} is not a readable .npz file ({err}); {LAYOUT_HELP}") from err
    with zf:
        keys = {n.removesuffix(".npy") for n in zf.namelist()}
        if IMAGE_KEY not in keys:
            raise EvaluationInputError(f"{path} has keys {sorted(keys)} but no '{IMAGE_KEY}'; {LAYOUT_HELP}")
        with zf.open(f"{IMAGE_KEY}.npy") as member:
            header = _npy_header(member)
    where = f"{path} '{IMAGE_KEY}'"
    if header is not None:
        check_images(header[0], header[2], where)  # before reading any data
    if header is None or header[1]:  # npy format 3.0 or Fortran order: load whole (still no pickles)
        try:
            with np.load(path, allow_pickle=False) as npz:
                images = npz[IMAGE_KEY]
        except ValueError as err:
            raise EvaluationInputError(f"{where} could not be read ({err}); {LAYOUT_HELP}") from err
        check_images(images.shape, images.dtype, where)
        shape, dtype = images.shape, images.dtype
        read = lambda bs: (images[i:i + bs] for i in range(0, len(images), bs))  # noqa: E731
    else:
        shape, _, dtype = header
        read = lambda bs: _stream_npz_array(path, IMAGE_KEY, shape, dtype, bs)  # noqa: E731
    labels = settings = stats = None
    with np.load(path, allow_pickle=False) as npz:
        try:
            if LABEL_KEY in keys:
                labels = npz[LABEL_KEY]
                if labels.shape != (shape[0],) or not np.issubdtype(labels.dtype, np.integer):
                    raise EvaluationInputError(f"{path} '{LABEL_KEY}' has shape {labels.shape} dtype {labels.dtype}; expected int labels "
                                               f"of shape ({shape[0]},), one per image in '{IMAGE_KEY}'")
                labels = labels.astype(np.int64)
            if SETTINGS_KEY in keys:
                settings = _parse_settings(npz[SETTINGS_KEY])
            present = [k for k in STATS_KEYS if k in keys]
            if present:
                if missing := [k for k in STATS_KEYS if k not in keys]:
                    raise EvaluationInputError(f"{path} has reference statistics {present} but lacks {missing}; {LAYOUT_HELP}")
                stats = {k: npz[k].astype(np.float64) for k in STATS_KEYS}
                if bad := {k: v.shape for k, v in stats.items() if v.shape != STATS_KEYS[k]}:
                    raise EvaluationInputError(f"{path} statistics have shapes {bad}; expected {STATS_KEYS} "
                                               "(ADM's pool3 and mixed_6/conv[..., :7] features)")
        except ValueError as err:
            if isinstance(err, EvaluationInputError):
                raise
            raise EvaluationInputError(f"{path}: {err}; arrays must be plain numeric/str arrays (no pickled objects). "
                                       f"{LAYOUT_HELP}") from err
    return ImageSet(str(path), sha256_file(path), tuple(shape), read, labels, settings, stats)


def load_png_folder(path: str | Path, num_workers: int = 0) -> ImageSet:
    """Folder of ``*.png`` files (sorted by name; all the same size) -> :class:`ImageSet` of RGB images,
    decoded by ``num_workers`` threads (at least one)."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".png")
    if not files:
        raise EvaluationInputError(f"{path} contains no .png files; pass a folder of PNGs or an ADM-layout .npz")
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.name}\0{sha256_file(f)}\n".encode())
    with Image.open(files[0]) as first:
        width, height = first.size

    def decode(f: Path) -> np.ndarray:
        with Image.open(f) as im:
            if im.size != (width, height):
                raise EvaluationInputError(f"{f} is {im.size[0]}x{im.size[1]} but {files[0].name} is {width}x{height}; "
                                           "all images of a set must have the same size")
            return np.asarray(im.convert("RGB"))

    def read(batch_size: int) -> Iterator[np.ndarray]:
        with ThreadPoolExecutor(max(1, num_workers)) as pool:
            for start in range(0, len(files), batch_size):
                yield np.stack(list(pool.map(decode, files[start:start + batch_size])))

    return ImageSet(str(path), digest.hexdigest(), (len(files), height, width, 3), read)


def load_image_set(path: str | Path, num_workers: int = 0) -> ImageSet:
    """An ``.npz`` file (ADM layout) or a folder of PNGs."""
    path = Path(path).expanduser()
    if not path.exists():
        raise EvaluationInputError(f"{path} does not exist; pass an ADM-layout .npz (e.g. the samples.npz written by sample.py) "
                                   "or a folder of .png images")
    if path.is_dir():
        return load_png_folder(path, num_workers)
    if path.suffix != ".npz":
        raise EvaluationInputError(f"{path} is neither a .npz file nor a folder; {LAYOUT_HELP}, or a folder of .png images")
    return load_npz(path)


def write_adm_npz(path: str | Path, images: np.ndarray, labels: np.ndarray | None = None, settings: Any = None,
                  stats: dict[str, np.ndarray] | None = None) -> Path:
    """Write images (uint8 NHWC) and optional labels / JSON settings / reference stats in ADM layout, atomically."""
    path = Path(path)
    check_images(images.shape, images.dtype, str(path))
    arrays: dict[str, np.ndarray] = {IMAGE_KEY: images}
    if labels is not None:
        arrays[LABEL_KEY] = np.asarray(labels, dtype=np.int64)
        if arrays[LABEL_KEY].shape != (len(images),):
            raise EvaluationInputError(f"labels have shape {arrays[LABEL_KEY].shape}; expected ({len(images)},)")
    if settings is not None:
        arrays[SETTINGS_KEY] = np.array(json.dumps(settings, sort_keys=True))
    if stats is not None:
        if set(stats) != set(STATS_KEYS):
            raise EvaluationInputError(f"stats keys {sorted(stats)}; expected exactly {sorted(STATS_KEYS)}")
        arrays.update({k: np.asarray(v, dtype=np.float64) for k, v in stats.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_npz(path, **arrays)
    return path
