"""Caption datamodules: MNIST template captions, a caption folder, and caption webdataset shards."""

import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixelflow.data.caption_folder import CaptionFolder, CaptionFolderDataModule, caption_pairs
from pixelflow.data.imagenet import random_transform
from pixelflow.data.mnist_captions import (
    HELDOUT_TEMPLATES,
    NUMBER_WORDS,
    TRAIN_TEMPLATES,
    MNISTCaptionDataModule,
    MNISTCaptions,
    caption,
    heldout_prompts,
    template_choice,
)
from pixelflow.data.robust import SkipLedger
from pixelflow.data.shard_writer import ShardSettings, write_shards
from pixelflow.data.shards import ShardDataModule, load_index, shard_pipeline


def test_heldout_phrasings_are_disjoint_from_training_ones():
    train = {caption(t, d) for t in TRAIN_TEMPLATES for d in range(10)}
    prompts, digits = heldout_prompts(20)
    assert len(prompts) == 200 and Counter(digits) == {d: 20 for d in range(10)}
    assert not train & set(prompts) and not set(TRAIN_TEMPLATES) & set(HELDOUT_TEMPLATES)
    assert {p for p in prompts} == {caption(t, d) for t in HELDOUT_TEMPLATES for d in range(10)}
    for prompt, digit in zip(prompts, digits):  # every prompt names its digit, as a word or a numeral
        assert re.search(rf"\b({NUMBER_WORDS[digit]}|{digit})\b", prompt), prompt
    assert caption("a handwritten {word}", 7) == "a handwritten seven" and caption("the digit {digit}", 7) == "the digit 7"
    with pytest.raises(ValueError, match="0-9"):
        caption("{word}", 10)


def test_mnist_captions_name_the_label_and_are_fixed_per_image_by_the_seed():
    data = MNISTCaptions(seed=0)
    labels = data.digits.labels
    for i in range(50):
        image, text = data[i]
        assert image.shape == (3, 32, 32)
        assert text == caption(TRAIN_TEMPLATES[int(data.choice[i])], int(labels[i]))
    assert torch.equal(data.choice, template_choice(len(data), len(TRAIN_TEMPLATES), 0))
    assert not torch.equal(data.choice, template_choice(len(data), len(TRAIN_TEMPLATES), 1))
    assert set(data.choice.tolist()) == set(range(len(TRAIN_TEMPLATES)))  # every template is used
    with pytest.raises(ValueError, match="templates is empty"):
        MNISTCaptions(templates=())


def test_mnist_caption_datamodule_yields_images_and_caption_lists():
    dm = MNISTCaptionDataModule(batch_size=4)
    assert dm.num_classes == 0 and dm.class_names is None
    dm.setup("fit")
    images, captions = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and len(captions) == 4 and all(isinstance(c, str) for c in captions)


def _caption_folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for i, name in enumerate(["a/red.png", "a/b/blue.jpg", "green.png"]):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40 + i, 48, 3), dtype=np.uint8)).save(path)
        path.with_suffix(".txt").write_text(f"  a {path.stem} square\n")
    (root / "a" / "broken.png").write_bytes(b"not an image")
    (root / "a" / "broken.txt").write_text("never read")
    return root


def test_caption_folder_pairs_images_with_their_text_and_skips_unreadable_ones(tmp_path):
    root = _caption_folder(tmp_path / "captions")
    data = CaptionFolder(root, random_transform(32))
    assert [p.name for p, _ in data.pairs] == ["blue.jpg", "broken.png", "red.png", "green.png"]
    got = [data[i] for i in range(len(data))]
    assert [text for _, text in got] == ["a blue square", "a red square", "a red square", "a green square"]
    assert got[0][0].shape == (3, 32, 32) and data.ledger.total == 1  # broken.png -> the next readable pair
    (root / "green.txt").unlink()
    with pytest.raises(FileNotFoundError, match="green.txt"):
        caption_pairs(root)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        caption_pairs(tmp_path / "nowhere")


def test_caption_folder_datamodule_batches(tmp_path):
    dm = CaptionFolderDataModule(str(_caption_folder(tmp_path / "captions")), batch_size=2, image_size=32, num_workers=0)
    assert dm.num_classes == 0 and dm.class_names is None
    dm.setup("fit")
    images, captions = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 32, 32) and all(c.endswith("square") for c in captions)


def test_caption_shards_store_and_stream_the_captions(tmp_path):
    root = _caption_folder(tmp_path / "captions")
    index = write_shards(ShardSettings(root, tmp_path / "out", captions=True, image_size=32, shard_size=2))
    assert index["captions"] is True and index["num_classes"] == 0 and index["total"] == 3 and index["num_skipped"] == 1
    urls = [s["path"] for s in load_index(tmp_path / "out" / "index.json")["shards"]]
    batches = list(shard_pipeline(urls, random_transform(32), SkipLedger(), 1, resample=False, passes=1, captions=True))
    assert sorted(c for _, (c,) in batches) == ["a blue square", "a green square", "a red square"]
    dm = ShardDataModule(str(tmp_path / "out" / "index.json"), batch_size=2, image_size=32, num_workers=0, shuffle_buffer=4)
    assert dm.num_classes == 0 and dm.class_names is None
    dm.setup("fit")
    images, captions = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 32, 32) and all(c.endswith("square") for c in captions)
