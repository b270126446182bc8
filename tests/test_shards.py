"""Shard writing (write, count, resume; scripts/make_shards.py) and the streaming shard datamodule (split, resample,
robustness)."""

import io
import json
import multiprocessing
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import webdataset as wds
from PIL import Image

from pixelflow.atomic import PARTIAL_SUFFIX
from pixelflow.data import shard_writer
from pixelflow.data.imagenet import random_transform
from pixelflow.data.robust import SkipLedger
from pixelflow.data.shards import ShardDataModule, load_index, shard_pipeline
from tests.imagefolder import CLASSES, CORRUPT, GOOD_PER_CLASS, make_image_folder, num_good

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "make_shards.py"


def write(src: Path, out: Path, **settings) -> dict:
    return shard_writer.write_shards(shard_writer.ShardSettings(src, out, image_size=32, shard_size=4, **settings))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("shards")
    src = make_image_folder(root / "train")
    return src, root / "out", write(src, root / "out")


def read_all(urls: list[str], **kw) -> list[tuple[torch.Tensor, int]]:
    ledger = SkipLedger()
    samples = list(shard_pipeline(urls, random_transform(32), ledger, 1, resample=False, passes=1, **kw))
    return [(x[0], int(y[0])) for x, y in samples], ledger


def test_index_counts_every_readable_image_and_lists_the_corrupt_ones(shards):
    src, out, index = shards
    assert index["total"] == num_good() and index["num_classes"] == len(CLASSES)
    assert sum(s["count"] for s in index["shards"]) == num_good()
    assert len(index["shards"]) == 4  # 15 files, 4 per shard
    assert sorted(s["path"] for s in index["skipped"]) == sorted(CORRUPT)
    assert index["class_names"][1] == "goldfish, Carassius auratus"
    assert json.loads((out / "index.json").read_text()) == index
    assert not [p for p in out.iterdir() if p.name.endswith(PARTIAL_SUFFIX)]


def test_shards_read_back_exactly_with_labels_of_their_source_folder(shards):
    src, out, index = shards
    urls = [s["path"] for s in load_index(out / "index.json")["shards"]]
    samples, ledger = read_all(urls)
    assert len(samples) == num_good() and ledger.total == 0
    assert Counter(label for _, label in samples) == {c: GOOD_PER_CLASS for c in range(len(CLASSES))}
    for sample in wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples()):
        path = json.loads(sample["json"])["path"]
        assert CLASSES[int(sample["cls"])] == path.split("/")[0]
        assert min(Image.open(io.BytesIO(sample["jpg"])).size) == 36  # short side 9/8 x 32, aspect kept


def test_ranks_and_workers_split_a_pass_exactly(shards):
    _, out, _ = shards
    urls = [s["path"] for s in load_index(out / "index.json")["shards"]]
    per_rank = [read_all(urls, rank=r, world_size=2, seed=3)[0] for r in range(2)]
    keys = [{x.sum().item() for x, _ in samples} for samples in per_rank]
    assert len(per_rank[0]) + len(per_rank[1]) == num_good()
    assert not keys[0] & keys[1]
    # Two DataLoader workers on one rank: still every sample of the rank's shards once.
    ledger = SkipLedger()
    pipeline = shard_pipeline(urls, random_transform(32, flip=False), ledger, 1, resample=False, passes=1)
    loaded = list(torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=2))
    assert len(loaded) == num_good()


def test_resampled_streams_differ_per_rank_and_are_reproducible(shards):
    _, out, _ = shards
    urls = [s["path"] for s in load_index(out / "index.json")["shards"]]

    def first(rank: int, seed: int) -> list[int]:
        stream = iter(shard_pipeline(urls, random_transform(32), SkipLedger(), 4, rank=rank, world_size=2, seed=seed,
                                     shuffle_buffer=8))
        return [int(y) for _ in range(6) for y in next(stream)[1]]

    assert first(0, 0) == first(0, 0)
    assert first(0, 0) != first(1, 0)
    assert first(0, 0) != first(0, 1)


def _die_in_the_second_shard(src: Path, out: Path) -> None:
    """A writer that dies without any cleanup, as under SIGKILL, in the middle of the second shard."""
    real_encode, calls = shard_writer.encode_file, {"n": 0}

    def dying(job):
        calls["n"] += 1
        if calls["n"] == 6:
            os._exit(3)
        return real_encode(job)

    shard_writer.encode_file = dying
    write(src, out)


def test_resume_keeps_finished_shards_and_rewrites_the_partial_one(shards, tmp_path):
    src, _, reference = shards
    out = tmp_path / "out"
    killed = multiprocessing.get_context("fork").Process(target=_die_in_the_second_shard, args=(src, out))
    killed.start()
    killed.join()
    assert killed.exitcode == 3
    partial = [p.name for p in out.iterdir() if p.name.endswith(PARTIAL_SUFFIX)]
    assert len(partial) == 1 and partial[0].startswith(".shard-000001.tar.")  # the dead writer's unfinished shard
    assert sorted(p.name for p in out.iterdir()) == sorted(["make_shards.json", "shard-000000.json", "shard-000000.tar",
                                                           *partial])
    assert [p.name for p in out.glob("*.tar")] == ["shard-000000.tar"]  # a reader's pattern does not match it
    with pytest.raises(FileExistsError, match="other settings"):
        write(src, out, format="png")
    first_mtime = (out / "shard-000000.tar").stat().st_mtime_ns
    index = write(src, out)
    assert (out / "shard-000000.tar").stat().st_mtime_ns == first_mtime
    assert [p.name for p in out.iterdir() if p.name.endswith(PARTIAL_SUFFIX)] == partial  # never read, never renamed
    strip = lambda i: {k: v for k, v in i.items() if k != "source"}  # noqa: E731
    assert strip(index) == strip(reference)
    for shard in reference["shards"]:  # same samples, same bytes (tar headers carry mtimes, so compare members)
        assert members(out / shard["path"]) == members(Path(reference["source"]).parent / "out" / shard["path"])


def test_the_command_writes_shards_reports_skips_and_refuses_other_settings(shards, tmp_path):
    src, _, reference = shards
    out = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), str(src), str(out), "--image-size", "32", "--shard-size", "4"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "index.json").read_text())["total"] == reference["total"]
    assert f"[make_shards] {reference['total']} images in 4 shards under {out}" in proc.stderr
    assert proc.stderr.count("[make_shards] skipping unreadable") == len(CORRUPT)
    proc = subprocess.run([*command, "--format", "png"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "error: " in proc.stderr and "other settings" in proc.stderr


def members(path: Path) -> list[dict]:
    return [{k: v for k, v in s.items() if k != "__url__"} for s in wds.DataPipeline(wds.SimpleShardList([str(path)]),
                                                                                 wds.tarfile_to_samples())]


def test_broken_samples_and_truncated_shards_are_skipped_and_counted(shards, tmp_path):
    _, out, _ = shards
    good = [s["path"] for s in load_index(out / "index.json")["shards"]]
    bad_samples = str(tmp_path / "bad.tar")
    with wds.TarWriter(bad_samples) as sink:
        sink.write({"__key__": "a", "jpg": b"not a jpeg", "cls": 0})
        sink.write({"__key__": "b", "jpg": b"", "cls": 1})
        sink.write({"__key__": "c", "cls": 1})  # no image at all
    truncated = tmp_path / "truncated.tar"
    # Cut inside the first image: tar header + .cls member (1024 bytes), .jpg header (512), 100 image bytes.
    truncated.write_bytes(Path(good[0]).read_bytes()[:1636])
    samples, ledger = read_all(good[1:] + [bad_samples, str(truncated)])
    assert len(samples) == sum(s["count"] for s in load_index(out / "index.json")["shards"][1:])
    assert ledger.total == 5  # three bad samples, the cut shard's image-less sample, the tar read error


def test_datamodule_streams_full_batches_and_checks_the_index(shards, tmp_path):
    _, out, _ = shards
    dm = ShardDataModule(str(out / "index.json"), batch_size=4, image_size=32, num_workers=0, shuffle_buffer=8)
    assert dm.num_classes == len(CLASSES) and dm.samples_per_pass() == num_good()
    dm.setup("fit")
    stream = iter(dm.train_dataloader())
    for _ in range(5):  # more than one pass: resampling never runs dry
        images, labels = next(stream)
        assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64
    with pytest.raises(ValueError, match="image_size=32"):
        ShardDataModule(str(out / "index.json"), image_size=64)
    with pytest.raises(FileNotFoundError, match="make_shards"):
        ShardDataModule(str(tmp_path / "index.json"))
