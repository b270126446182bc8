"""Writing webdataset tar shards of pre-processed images, with an ``index.json`` (read by :mod:`pixelflow.data.shards`).

Files are read in a fixed seeded permutation (shards mix classes), so shard i always holds the
same samples: an interrupted run restarts where it stopped (finished shards are kept, a partial
shard is rewritten). Every file goes through :mod:`pixelflow.atomic`: written under a hidden ``.partial`` name
that no reader's ``*.tar`` / ``*.json`` pattern matches, and renamed when complete.
Each image gets the deterministic part of the augmentation (``crop="random"``: short side to
9/8 of the size, Lanczos; ``crop="adm"``: ADM centre crop) and is stored as JPEG or PNG bytes;
random crops and flips happen at training time. Unreadable files are reported and counted in
the index, never fatal.

Text-to-image (``captions=True``): the source is a caption folder (every image with a same-name
``.txt`` beside it, any depth; :mod:`pixelflow.data.caption_folder`) and each caption is stored as ``<key>.txt``.
"""

from __future__ import annotations

import io
import json
import logging
import random
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import webdataset as wds
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from tqdm import tqdm

from pixelflow.atomic import atomic_write, atomic_write_text
from pixelflow.data.caption_folder import caption_pairs, read_caption
from pixelflow.data.imagenet import CROPS, default_resize, deterministic_transform, imagenet_class_names
from pixelflow.data.robust import UNREADABLE_ERRORS, open_rgb
from pixelflow.data.shards import INDEX_FORMAT

__all__ = ["ShardSettings", "IMAGE_FORMATS", "write_shards", "encode_file"]

logger = logging.getLogger(__name__)
IMAGE_FORMATS = ("jpg", "png")


@dataclass(frozen=True)
class ShardSettings:
    """Where to read and write, and how every image is stored."""

    src: Path  # ImageFolder root src/<class>/<image>, or a caption folder with captions=True
    out: Path  # folder for shard-NNNNNN.tar and index.json
    image_size: int = 256
    crop: str = "random"  # random: store the short side at resize_size; adm: ADM centre crop
    resize_size: int | None = None  # short side stored for crop="random" (None: 9/8 x image_size)
    format: str = "jpg"
    quality: int = 95  # JPEG quality
    shard_size: int = 1000  # source files per shard
    workers: int = 0  # decode/encode processes (0: in this process)
    seed: int = 0  # file order permutation (fixed so that resuming is exact)
    captions: bool = False

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ValueError(f"crop={self.crop!r}: use one of {CROPS}")
        if self.format not in IMAGE_FORMATS:
            raise ValueError(f"format={self.format!r}: use one of {IMAGE_FORMATS}")
        if self.shard_size < 1 or self.workers < 0:
            raise ValueError(f"need shard_size >= 1 and workers >= 0, got {self.shard_size} and {self.workers}")


def encode_file(job: tuple[str, int, str, dict, bool]) -> tuple[str, int | str, bytes | None, str | None]:
    """(path, label or caption, image bytes or None, error or None) for one source file."""
    path, label, fmt, opts, captions = job
    try:
        if captions:
            label = read_caption(Path(path).with_suffix(".txt"))
        image = deterministic_transform(opts["image_size"], opts["crop"], opts["resize_size"])(open_rgb(path))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG" if fmt == "jpg" else "PNG", **({"quality": opts["quality"]} if fmt == "jpg" else {}))
        return path, label, buffer.getvalue(), None
    except UNREADABLE_ERRORS as err:
        return path, label, None, f"{type(err).__name__}: {err}"


def _write_shard(tar_path: Path, results: Iterator, first_key: int, fmt: str, src: Path, progress: tqdm) -> dict:
    """Write one shard atomically, then its stats (a shard counts as finished when both exist); return the stats."""
    count, skipped = 0, []
    with atomic_write(tar_path, "wb") as stream, wds.TarWriter(stream) as sink:
        for offset, (path, label, data, error) in enumerate(results):
            progress.update(1)
            if data is None:
                skipped.append({"path": str(Path(path).relative_to(src)), "error": error})
                logger.warning("skipping unreadable %s: %s", path, error)
                continue
            rel = str(Path(path).relative_to(src))
            target = {"txt": label} if isinstance(label, str) else {"cls": label}
            sink.write({"__key__": f"{first_key + offset:09d}", fmt: data, **target, "json": {"path": rel}})
            count += 1
    stats = {"path": tar_path.name, "count": count, "skipped": skipped}
    _atomic_write_json(tar_path.with_suffix(".json"), stats)
    return stats


def _atomic_write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1))


def write_shards(settings: ShardSettings) -> dict:
    """Write (or finish writing) all shards and the index; return the index.

    Raises FileExistsError when ``settings.out`` holds shards written with other settings."""
    src, out = Path(settings.src), Path(settings.out)
    if settings.captions:
        classes, samples = [], [(str(image), -1) for image, _ in caption_pairs(src)]
    else:
        classes, class_to_idx = find_classes(src)
        samples = make_dataset(str(src), class_to_idx, extensions=IMG_EXTENSIONS)
    random.Random(settings.seed).shuffle(samples)
    out.mkdir(parents=True, exist_ok=True)
    opts = {"image_size": settings.image_size, "crop": settings.crop, "quality": settings.quality,
            "resize_size": (settings.resize_size or default_resize(settings.image_size)) if settings.crop == "random" else None}
    recorded = {**opts, "format": settings.format, "shard_size": settings.shard_size, "seed": settings.seed,
                "files": len(samples), **({"captions": True} if settings.captions else {})}
    settings_path = out / "make_shards.json"
    if settings_path.is_file() and json.loads(settings_path.read_text()) != recorded:
        raise FileExistsError(f"{out} holds shards written with other settings ({settings_path}); use a new folder")
    _atomic_write_json(settings_path, recorded)
    size = settings.shard_size
    num_shards = (len(samples) + size - 1) // size
    shards: list[dict] = [{}] * num_shards
    todo: list[int] = []
    for i in range(num_shards):
        tar_path, stats_path = out / f"shard-{i:06d}.tar", out / f"shard-{i:06d}.json"
        if tar_path.is_file() and stats_path.is_file():
            shards[i] = json.loads(stats_path.read_text())
        else:
            todo.append(i)
    done_files = sum(min(size, len(samples) - i * size) for i in set(range(num_shards)) - set(todo))
    if done_files:
        logger.info("resuming: %d of %d shards already written", num_shards - len(todo), num_shards)
    with Pool(settings.workers) if settings.workers > 0 else nullcontext() as pool, \
            tqdm(total=len(samples), initial=done_files, unit="img", desc="shards") as progress:
        for i in todo:
            jobs = [(path, label, settings.format, opts, settings.captions) for path, label in samples[i * size:(i + 1) * size]]
            results = pool.imap(encode_file, jobs, chunksize=8) if pool else map(encode_file, jobs)
            shards[i] = _write_shard(out / f"shard-{i:06d}.tar", results, i * size, settings.format, src, progress)
    skipped = [s for shard in shards for s in shard["skipped"]]
    index = {
        "format": INDEX_FORMAT,
        "source": str(src.resolve()),
        "preprocess": {"image_size": settings.image_size, **{k: v for k, v in opts.items() if k != "image_size"},
                       "format": settings.format, "seed": settings.seed},
        "classes": classes,
        "class_names": imagenet_class_names(classes),
        "captions": settings.captions,
        "num_classes": len(classes),
        "shards": [{"path": s["path"], "count": s["count"]} for s in shards],
        "total": sum(s["count"] for s in shards),
        "num_skipped": len(skipped),
        "skipped": skipped,
    }
    _atomic_write_json(out / "index.json", index)
    logger.info("%d images in %d shards under %s; %d unreadable file(s) skipped%s", index["total"], num_shards, out,
                len(skipped), " (listed in index.json)" if skipped else "")
    return index
