"""The MNIST evaluation classifier: trained once (fast, accurate), cached, a damaged cache retrained; its FID."""

import hashlib

import numpy as np
import pytest
import scipy.linalg
import torch

from pixelflow.metrics import fid as M
from pixelflow.metrics.mnist_classifier import classify, load_or_train_classifier
from pixelflow.metrics.references import mnist_images

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("pixelflow-cache")


@pytest.fixture(scope="module")
def trained(cache):
    return load_or_train_classifier(cache)


def _batches(images, size=1000):
    return (images[i:i + size] for i in range(0, len(images), size))


def test_trains_quickly_and_accurately(trained):
    assert trained.trained_now
    assert trained.test_accuracy > 0.98
    assert trained.train_seconds < 60
    images, labels = mnist_images("test")
    _, pred = classify(trained.model, _batches(images[:2000]))
    assert (pred == labels[:2000]).mean() > 0.98


def test_cache_is_reused(cache, trained):
    again = load_or_train_classifier(cache)
    assert not again.trained_now and again.sha256 == trained.sha256
    for key, value in trained.model.state_dict().items():
        assert torch.equal(value, again.model.state_dict()[key])


@pytest.mark.parametrize("damage", ["flip_byte", "garbage"])
def test_damaged_cache_is_retrained(trained, tmp_path, damage):
    data = bytearray(trained.path.read_bytes())
    if damage == "flip_byte":
        data[len(data) // 2] ^= 0xFF  # silent bit rot inside a weight tensor: caught by the SHA-256 sidecar
    else:
        data = bytearray(b"this is not a torch file")
    (tmp_path / trained.path.name).write_bytes(bytes(data))
    # flip_byte keeps the old sidecar (the hash catches it); garbage gets a matching one (torch.load must catch it)
    sidecar = trained.sha256 if damage == "flip_byte" else hashlib.sha256(data).hexdigest()
    (tmp_path / (trained.path.name + ".sha256")).write_text(sidecar)
    redone = load_or_train_classifier(tmp_path)
    assert redone.trained_now and redone.test_accuracy > 0.98
    assert load_or_train_classifier(tmp_path).trained_now is False


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # a few 128-d ReLU features are never active on MNIST
def test_classifier_fid_train_vs_test_small_vs_noise_large(trained):
    n = 2000
    train_f, _ = classify(trained.model, _batches(mnist_images("train")[0][:n]))
    test_f, _ = classify(trained.model, _batches(mnist_images("test")[0][:n]))
    noise_f, _ = classify(trained.model, _batches(np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)))
    assert train_f.shape == (n, 128)
    st_train, st_test, st_noise = (M.feature_statistics(f) for f in (train_f, test_f, noise_f))
    same, noise = M.frechet_distance(st_train, st_test), M.frechet_distance(st_train, st_noise)
    assert same < 15 and noise > 200, (same, noise)  # measured: 5.6 and 443 (N=10,000: 0.85 and 458)
    diff = st_train["mu"] - st_test["mu"]  # independent check: ADM's scipy.linalg.sqrtm formula
    covmean = scipy.linalg.sqrtm(st_train["sigma"] @ st_test["sigma"]).real
    expected = diff @ diff + np.trace(st_train["sigma"]) + np.trace(st_test["sigma"]) - 2 * np.trace(covmean)
    assert same == pytest.approx(expected, rel=1e-6)
