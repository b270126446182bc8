"""MNIST with template captions ("a handwritten seven", "the digit 7"): the CPU text-to-image quickstart.

Each training image gets one caption, a training template (:data:`TRAIN_TEMPLATES`) filled with its
digit as a number word or a numeral; the template is fixed per image by ``seed``, so a resumed run
sees the same captions. :data:`HELDOUT_TEMPLATES` are phrasings never used in training, for
evaluation (:func:`heldout_prompts`).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from pixelflow.data.datamodule import ImageDataModule
from pixelflow.data.mnist import MNIST

__all__ = ["NUMBER_WORDS", "TRAIN_TEMPLATES", "HELDOUT_TEMPLATES", "caption", "heldout_prompts", "template_choice",
           "MNISTCaptions",
           "MNISTCaptionDataModule"]

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# {word}: the number word ("seven"), {digit}: the numeral ("7").
TRAIN_TEMPLATES = (
    "a handwritten {word}",
    "the digit {digit}",
    "number {word}, written by hand",
    "{word}",
    "{digit}",
    "the number {word}",
    "a picture of the digit {word}",
    "handwritten digit {digit}",
    "an image of the number {digit}",
    "the numeral {word} in white",
    "digit {word} on black",
    "a {digit} written by hand",
    "a drawing of a {word}",
    "the number {digit}",
    "a handwritten {digit}",
    "digit {digit}",
    "a white {word}",
    "{word} written in ink",
    "my handwritten {word}",
    "please draw a {digit}",
    "the numeral {digit}",
    "an MNIST {word}",
    "{digit}, handwritten digit",
    "a sketch of number {word}",
    "a {word} on a dark page",
    "this is a {word}",
    "the figure {digit}",
    "{word}!",
    "number {digit}",
    "an image of a {word}",
)
HELDOUT_TEMPLATES = (
    "a photo of a handwritten {word}",
    "someone wrote the number {digit}",
    "{word}, drawn by hand",
    "a scan of the digit {word}",
)


def caption(template: str, digit: int) -> str:
    """``template`` filled with ``digit`` (0-9) as a word and as a numeral."""
    if not 0 <= digit <= 9:
        raise ValueError(f"MNIST digits are 0-9, got {digit}")
    return template.format(word=NUMBER_WORDS[digit], digit=digit)


def heldout_prompts(per_digit: int = 20) -> tuple[list[str], list[int]]:
    """``per_digit`` prompts for each digit, cycling through the held-out phrasings, and their digits."""
    prompts, digits = [], []
    for digit in range(10):
        for i in range(per_digit):
            prompts.append(caption(HELDOUT_TEMPLATES[i % len(HELDOUT_TEMPLATES)], digit))
            digits.append(digit)
    return prompts, digits


def template_choice(num_images: int, num_templates: int, seed: int) -> torch.Tensor:
    """Which template captions each image: uniform, fixed by ``seed``."""
    return torch.from_numpy(np.random.default_rng(seed).integers(0, num_templates, num_images))


class MNISTCaptions(Dataset):
    """MNIST images (as :class:`~pixelflow.data.mnist.MNIST`) with one template caption each."""

    def __init__(self, split: str = "train", image_size: int = 32, path: str | None = None,
                 templates: tuple[str, ...] = TRAIN_TEMPLATES, seed: int = 0):
        if not templates:
            raise ValueError("templates is empty: give at least one, e.g. '{word}' or 'the digit {digit}'")
        self.digits = MNIST(split, image_size, path)
        self.templates = tuple(templates)
        self.choice = template_choice(len(self.digits), len(self.templates), seed)

    def __len__(self) -> int:
        return len(self.digits)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        image, label = self.digits[index]
        return image, caption(self.templates[int(self.choice[index])], label)


class MNISTCaptionDataModule(ImageDataModule):
    """MNIST 32 px with template captions: batches are (images, captions: list[str])."""

    def __init__(self, batch_size: int = 64, image_size: int = 32, num_workers: int = 0, seed: int = 0,
                 path: str | None = None, split: str = "train", templates: list[str] | None = None):
        super().__init__(batch_size, image_size, 0, None, num_workers, seed)
        self.class_names = None  # captions, no classes
        self.path, self.split = path, split
        self.templates = tuple(templates) if templates else TRAIN_TEMPLATES

    def build_train_dataset(self) -> Dataset:
        return MNISTCaptions(self.split, self.image_size, self.path, self.templates, self.seed)
