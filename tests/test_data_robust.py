"""Folder datasets that skip unreadable images (pixelflow.data.robust), through both of them."""

import pytest

from pixelflow.data.caption_folder import CaptionFolder
from pixelflow.data.imagenet import RobustImageFolder
from pixelflow.data.robust import MAX_CONSECUTIVE_UNREADABLE


def _broken_files(root, captions: bool):
    for name in ("a", "b", "c"):
        (root / "n01440764").mkdir(parents=True, exist_ok=True)
        (root / "n01440764" / f"{name}.png").write_bytes(b"not an image")
        if captions:
            (root / "n01440764" / f"{name}.txt").write_text("never read")
    return root


@pytest.mark.parametrize("dataset, hint", [
    (lambda root: RobustImageFolder(_broken_files(root, False)), "is .*folder a readable ImageFolder"),
    (lambda root: CaptionFolder(_broken_files(root, True)), "are the files under .* images"),
])
def test_a_folder_of_nothing_but_unreadable_images_is_an_error_that_says_what_to_check(tmp_path, dataset, hint):
    data = dataset(tmp_path / "folder")
    with pytest.raises(RuntimeError, match=f"{MAX_CONSECUTIVE_UNREADABLE} unreadable images in a row from .*a.png: {hint}"):
        data[0]
    assert data.ledger.bad_indices() == [0, 1, 2] and data.ledger.total == MAX_CONSECUTIVE_UNREADABLE
