"""A small MNIST classifier for fast sample metrics: class accuracy of conditional samples and FID in its
128-dim penultimate feature space. Trained once on CPU (two epochs) and cached.

The cache file holds tensors and plain numbers only (``torch.load(weights_only=True)``) and has a
``.sha256`` sidecar; a missing, corrupt or outdated file is rebuilt by training again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pixelflow.atomic import atomic_torch_save, atomic_write_text
from pixelflow.metrics.inception import default_cache_dir
from pixelflow.metrics.io import sha256_file
from pixelflow.metrics.references import mnist_images

__all__ = ["MNISTClassifier", "LoadedClassifier", "load_or_train_classifier", "train_classifier", "preprocess", "classify"]

RECIPE = "mnist-cnn-v2"  # bump when the architecture, preprocessing or training recipe changes
FEATURE_DIM = 128
logger = logging.getLogger(__name__)


class MNISTClassifier(nn.Module):
    """Three stride-2 conv-BN-ReLU layers (32 -> 4 px), a 128-unit feature layer and a 10-way head."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out, k in ((1, 16, 5), (16, 32, 3), (32, 64, 3)):
            layers += [nn.Conv2d(c_in, c_out, k, stride=2, padding=k // 2), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.features = nn.Sequential(*layers, nn.Flatten(), nn.Linear(64 * 4 * 4, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, 10)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features (B, 128), logits (B, 10)) of preprocessed (B, 1, 32, 32) images."""
        feats = self.features(x)
        return feats, self.head(feats)


def preprocess(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, C) -> grayscale float (B, 1, 32, 32) in [-1, 1] (resized if not 32 px)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().mean(dim=-1)[:, None] / 127.5 - 1.0
    if x.shape[-2:] != (32, 32):
        x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
    return x


@contextmanager
def _one_thread() -> Iterator[None]:
    # The net is too small for intra-op parallelism to pay; on shared 2-core machines it costs several x.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class LoadedClassifier:
    model: MNISTClassifier
    test_accuracy: float
    train_seconds: float
    path: Path
    sha256: str
    trained_now: bool


@torch.no_grad()
def classify(model: MNISTClassifier, batches: Iterable[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, 128) float32, predicted labels (N,) int64) of uint8 NHWC batches."""
    model.eval()
    feats, preds = [], []
    with _one_thread():
        for batch in batches:
            f, logits = model(preprocess(batch))
            feats.append(f.numpy())
            preds.append(logits.argmax(dim=1).numpy())
    return np.concatenate(feats), np.concatenate(preds)


def train_classifier(seed: int = 0, epochs: int = 2, batch_size: int = 128, lr: float = 3e-3) -> tuple[MNISTClassifier, float, float]:
    """Train on the MNIST train split; returns (model, test accuracy, training seconds)."""
    images, labels = mnist_images("train")
    x, y = preprocess(images), torch.from_numpy(labels)
    steps = epochs * (len(x) // batch_size)
    with torch.random.fork_rng(), _one_thread():
        torch.manual_seed(seed)
        model = MNISTClassifier()
        opt = torch.optim.Adam(model.parameters(), lr=lr / 3)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        order = torch.cat([torch.randperm(len(x)) for _ in range(epochs)])
        start = time.perf_counter()
        model.train()
        for step in range(steps):
            idx = order[step * batch_size:(step + 1) * batch_size]
            loss = F.cross_entropy(model(x[idx])[1], y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        seconds = time.perf_counter() - start
    test_images, test_labels = mnist_images("test")
    _, pred = classify(model, (test_images[i:i + 1000] for i in range(0, len(test_images), 1000)))
    return model.eval(), float((pred == test_labels).mean()), seconds


def _read_cache(path: Path) -> LoadedClassifier:
    sidecar = path.with_name(path.name + ".sha256")
    digest = sha256_file(path)
    if not sidecar.is_file() or sidecar.read_text().strip() != digest:
        raise ValueError("SHA-256 does not match its .sha256 sidecar")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if blob.get("recipe") != RECIPE:
        raise ValueError(f"recipe {blob.get('recipe')!r} is not {RECIPE!r}")
    model = MNISTClassifier()
    model.load_state_dict(blob["state_dict"], strict=True)
    return LoadedClassifier(model.eval(), float(blob["test_accuracy"]), float(blob["train_seconds"]), path, digest, False)


def load_or_train_classifier(cache_dir: str | Path | None = None, seed: int = 0) -> LoadedClassifier:
    """The cached classifier from ``cache_dir``, or a freshly trained one (then cached) if absent or corrupt.

    ``seed`` 0 is the evaluation classifier; another seed is an independently trained copy (e.g. a training
    signal that must not be the network the samples are scored with)."""
    name = RECIPE if seed == 0 else f"{RECIPE}-seed{seed}"
    path = (Path(cache_dir) if cache_dir else default_cache_dir()) / f"{name}.pt"
    if path.is_file():
        try:
            return _read_cache(path)
        except Exception as err:  # torch.load / load_state_dict raise many types for damaged files
            logger.warning("MNIST classifier cache %s is unusable (%s: %s); retraining", path, type(err).__name__, str(err)[:200])
    logger.info("training the MNIST evaluation classifier (once; cached in %s)", path.parent)
    model, accuracy, seconds = train_classifier(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_torch_save({"recipe": RECIPE, "state_dict": model.state_dict(), "test_accuracy": accuracy, "train_seconds": seconds}, path)
    digest = sha256_file(path)
    atomic_write_text(path.with_name(path.name + ".sha256"), digest + "\n")
    return LoadedClassifier(model, accuracy, seconds, path, digest, True)
