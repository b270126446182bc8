"""Streaming training data from webdataset tar shards written by ``scripts/make_shards.py``.

Each sample is ``<key>.jpg`` (or ``.png``) holding the image after the deterministic part of the
augmentation (short side resized, or ADM centre-cropped), ``<key>.cls`` (the label) or, in caption
shards (``"captions": true`` in the index; batches are then (images, captions: list[str])),
``<key>.txt`` (the caption, UTF-8), and ``<key>.json`` (its source path). The random part (crop, flip) runs here. An ``index.json``
beside the shards lists them with their sample counts and the class names.

Two ways to split the stream over ranks and DataLoader workers:

- ``resample=True`` (default, training): every (rank, worker) draws shards with replacement
  from its own seeded stream (``wds.ResampledShards``), so the stream never ends, ranks never run
  out at different times, and no two ranks or workers read the same sequence.
- ``resample=False``: each pass permutes the shards, rank r takes every world-size-th shard and
  ``wds.split_by_worker`` deals those to the workers, so a pass reads every sample exactly once
  over all ranks and workers (needs at least world-size shards).

Either way samples are shuffled through a buffer before decoding; batches are always full.
A resumed run reseeds the stream with the number of samples already consumed, so it does not
replay the beginning (statistically equivalent, not sample-exact like the folder datamodule).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from pixelflow.data.datamodule import ImageDataModule
from pixelflow.data.imagenet import random_transform
from pixelflow.data.robust import UNREADABLE_ERRORS, SkipLedger, SkipReporting, open_rgb

__all__ = ["INDEX_FORMAT", "load_index", "RankShards", "shard_pipeline", "ShardDataModule"]

INDEX_FORMAT = "pixelflow-shards-v1"
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")


def load_index(path: str | Path) -> dict:
    """Read ``index.json``; shard paths become absolute (they are stored relative to the index)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"shard index {path} does not exist: write shards with scripts/make_shards.py (see docs/scale.md)")
    index = json.loads(path.read_text())
    if index.get("format") != INDEX_FORMAT:
        raise ValueError(f"{path} is not a {INDEX_FORMAT} index (format={index.get('format')!r})")
    for shard in index["shards"]:
        shard["path"] = str(path.parent / shard["path"])
    return index


class RankShards(IterableDataset):
    """This rank's shards, ``passes`` times (None: forever), in a fresh seeded permutation each pass."""

    def __init__(self, urls: list[str], seed: int, rank: int, world_size: int, passes: int | None = None):
        if len(urls) < world_size:
            raise ValueError(f"{len(urls)} shards cannot be split over {world_size} ranks; use resample=True or more shards")
        self.urls, self.seed, self.rank, self.world_size, self.passes = urls, seed, rank, world_size, passes

    def __iter__(self) -> Iterator[dict]:
        done = 0
        while self.passes is None or done < self.passes:
            order = list(self.urls)
            random.Random(self.seed * 1_000_003 + done).shuffle(order)
            for url in order[self.rank::self.world_size]:
                yield {"url": url}
            done += 1


def _worker_seed(rank: int) -> int:
    """Distinct per (rank, worker); the rank is captured in the main process (works with spawned workers too)."""
    info = get_worker_info()
    return rank * 1000 + (info.id if info is not None else 0)


def _shuffle(samples: Iterator[dict], bufsize: int, seed: int) -> Iterator[dict]:
    info = get_worker_info()
    worker = info.id if info is not None else 0
    return wds.shuffle(bufsize, initial=bufsize, seed=seed * 7919 + worker)(samples)


def _tar_error(ledger: SkipLedger, error: BaseException) -> bool:
    """tarfile_to_samples handler: count a broken shard or member and carry on."""
    ledger.record("in " + " ".join(str(a) for a in error.args[-1:]), error)
    return True


def _decode(samples: Iterator[dict], transform: Callable, ledger: SkipLedger,
            captions: bool = False) -> Iterator[tuple[torch.Tensor, int | str]]:
    for sample in samples:
        key = next((k for k in IMAGE_KEYS if k in sample), None)
        try:
            if key is None:
                raise KeyError(f"no image ({', '.join(IMAGE_KEYS)}) in the sample")
            if captions and "txt" not in sample:
                raise KeyError("no caption (.txt) in the sample of a caption shard")
            image = open_rgb(sample[key])
            label = sample["txt"].decode("utf-8").strip() if captions else int(sample["cls"])
        except (*UNREADABLE_ERRORS, KeyError) as err:
            ledger.record(f"{sample.get('__url__')}:{sample.get('__key__')}", err)
            continue
        yield transform(image), label


def shard_pipeline(urls: list[str], transform: Callable, ledger: SkipLedger, batch_size: int, rank: int = 0,
                   world_size: int = 1, seed: int = 0, shuffle_buffer: int = 2000, resample: bool = True,
                   passes: int | None = None, captions: bool = False) -> wds.DataPipeline:
    """Batches ``(images, labels)`` (``captions``: ``(images, list of captions)``) of exactly ``batch_size`` for this
    rank (see the module docstring)."""
    if resample:
        source = [wds.ResampledShards(urls, seed=seed, worker_seed=partial(_worker_seed, rank), deterministic=True)]
    else:
        source = [RankShards(urls, seed, rank, world_size, passes), wds.split_by_worker]
    return wds.DataPipeline(
        *source,
        wds.tarfile_to_samples(handler=partial(_tar_error, ledger)),
        partial(_shuffle, bufsize=shuffle_buffer, seed=seed * 1009 + rank),
        partial(_decode, transform=transform, ledger=ledger, captions=captions),
        wds.batched(batch_size, collation_fn=default_collate, partial=False),
    )


class ShardDataModule(SkipReporting, ImageDataModule):
    """Training batches streamed from webdataset shards described by ``index`` (an ``index.json``)."""

    def __init__(self, index: str, batch_size: int = 32, image_size: int = 256, num_workers: int = 8, seed: int = 0,
                 shuffle_buffer: int = 2000, resample: bool = True, flip: bool = True):
        self.index = load_index(index)
        stored = self.index["preprocess"]["image_size"]
        if stored != image_size:
            raise ValueError(f"shards in {index} were made for image_size={stored}, but data.image_size={image_size}")
        self.captions = bool(self.index.get("captions", False))
        super().__init__(batch_size, image_size, 0 if self.captions else self.index["num_classes"],
                         None if self.captions else self.index["class_names"], num_workers, seed)
        if self.captions:
            self.class_names = None  # captions, no classes
        self.urls = [shard["path"] for shard in self.index["shards"]]
        self.shuffle_buffer, self.resample = shuffle_buffer, resample
        self.transform = random_transform(image_size, flip)

    def setup(self, stage: str | None = None) -> None:
        missing = [url for url in self.urls if not Path(url).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} shard(s) listed in the index are missing, e.g. {missing[0]}")
        if self.skips is None:  # made here, in each rank's process, so ranks count separately
            self.skips = SkipLedger()

    def build_train_dataset(self) -> wds.DataPipeline:
        rank, world = self._rank_world()
        # Reseeding with the samples consumed keeps a resumed run from replaying the stream's start.
        return shard_pipeline(self.urls, self.transform, self.skips, self.batch_size, rank, world,
                              seed=self.seed * 1_000_003 + self._start, shuffle_buffer=self.shuffle_buffer,
                              resample=self.resample, captions=self.captions)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.build_train_dataset(), batch_size=None, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available(), persistent_workers=self.num_workers > 0)

    def samples_per_pass(self) -> int:
        return int(self.index["total"])
