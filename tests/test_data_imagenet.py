"""ImageNet folder data: augmentation geometry, ADM crop, class names, and unreadable-file handling."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from pixelflow.data.imagenet import (
    ImageNetDataModule,
    RobustImageFolder,
    adm_center_crop,
    deterministic_transform,
    imagenet_class_names,
)
from tests.hydra_utils import compose_config
from tests.imagefolder import CLASSES, CORRUPT, make_image_folder, num_good


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("imagenet") / "train")


def test_class_names_from_timm_and_unknown_folders_keep_their_name():
    assert imagenet_class_names(list(CLASSES)) == [
        "tench, Tinca tinca", "goldfish, Carassius auratus",
        "great white shark, white shark, man-eater, man-eating shark, Carcharodon carcharias", "zz_custom"]


def test_published_resize_keeps_aspect_with_short_side_nine_eighths():
    image = Image.new("RGB", (300, 200))
    assert deterministic_transform(256)(image).size == (432, 288)
    assert deterministic_transform(32)(image).size == (54, 36)


def test_adm_center_crop_box_halves_then_bicubic_then_centre():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (150, 400, 3), dtype=np.uint8))
    out = adm_center_crop(image, 32)
    # By hand: 400x150 -> BOX 200x75 -> BOX 100x37 (37 < 64 stops) -> BICUBIC x32/37 -> 86x32 -> centre 32.
    ref = image.resize((200, 75), Image.BOX).resize((100, 37), Image.BOX).resize((86, 32), Image.BICUBIC)
    ref = ref.crop((27, 0, 59, 32))
    assert out.size == (32, 32)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))
    # A small image is only upscaled (no BOX step) and centre-cropped.
    small = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    ref = small.resize((48, 32), Image.BICUBIC).crop((8, 0, 40, 32))
    np.testing.assert_array_equal(np.asarray(adm_center_crop(small, 32)), np.asarray(ref))


def test_corrupt_files_are_skipped_counted_and_named(folder):
    dataset = RobustImageFolder(folder, deterministic_transform(32, "adm"))
    assert len(dataset) == num_good() + len(CORRUPT)
    for i in range(len(dataset)):
        image, label = dataset[i]
        assert image.size == (32, 32) and 0 <= label < len(CLASSES)
    bad = sorted(str(Path(dataset.samples[i][0]).relative_to(folder)) for i in dataset.ledger.bad_indices())
    assert bad == sorted(CORRUPT)
    assert dataset.ledger.total >= len(CORRUPT)


def test_replacement_is_the_next_readable_file(folder):
    dataset = RobustImageFolder(folder, deterministic_transform(32, "adm"))
    i = next(k for k, (path, _) in enumerate(dataset.samples) if path.endswith("empty.JPEG"))
    _, label = dataset[i]
    assert label == dataset.samples[i + 1][1]
    assert dataset.ledger.bad_indices() == [i] and dataset.ledger.total == 1


def test_datamodule_batches_with_workers_count_skips_in_the_main_process(folder, caplog):
    dm = ImageNetDataModule(str(folder), batch_size=5, image_size=32, num_workers=2, seed=1)
    assert dm.num_classes == len(CLASSES) and dm.class_names[0] == "tench, Tinca tinca"
    dm.setup("fit")
    loader = iter(dm.train_dataloader())
    for _ in range(3):  # 15 samples = one full pass over the folder, split over two worker processes
        images, labels = next(loader)
        assert images.shape == (5, 3, 32, 32) and labels.dtype == torch.int64
        assert images.min() >= -1 and images.max() <= 1 and images.std() > 0.1
    del loader  # shuts the workers down: their prefetching into the next pass would move the counts read below
    assert len(dm.skips.bad_indices()) == len(CORRUPT)
    assert dm.skips.total >= len(CORRUPT)
    assert "3 distinct unreadable image(s)" in dm.describe_skips()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="pixelflow"):
        assert dm.report_skips("test") == dm.skips.total
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and f"{dm.skips.total} in total" in record.getMessage()  # new skips: a warning


def test_missing_folder_has_a_helpful_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="data/README.md"):
        ImageNetDataModule(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="crop must be one of"):
        ImageNetDataModule(str(make_image_folder(tmp_path / "x")), crop="centre")


@pytest.mark.parametrize("data, crop", [("imagenet", "random"), ("imagenet_adm", "adm")])
def test_data_configs_instantiate(folder, data, crop):
    cfg = compose_config("train", [f"data={data}", f"data.root={folder}", "data.image_size=32", "data.num_workers=0"])
    dm = instantiate(cfg.data)
    assert isinstance(dm, ImageNetDataModule) and cfg.data.crop == crop
    first = dm.transform.transforms[0]
    assert type(first).__name__ == ("ADMCenterCrop" if crop == "adm" else "ResizeShortSide")
