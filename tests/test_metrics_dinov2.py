"""FD-DINOv2 with a randomly initialised small timm DINOv2 ViT saved to a file (no download anywhere)."""

import numpy as np
import pytest
import safetensors.torch
import timm
import torch

from pixelflow.metrics import fid as M
from pixelflow.metrics.dinov2 import DINOv2Features, build_dinov2, load_dinov2_state
from pixelflow.metrics.evaluation import EvalOptions, evaluate
from pixelflow.metrics.io import EvaluationInputError, image_set_from_array


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    torch.manual_seed(0)
    net = timm.create_model("vit_small_patch14_dinov2", pretrained=False, depth=2, img_size=28, num_classes=0)
    path = tmp_path_factory.mktemp("dinov2") / "dinov2_small.pth"
    torch.save(net.state_dict(), path)
    return path, net.eval()


def _images(seed, n=8):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_the_file_rebuilds_the_same_network(weights, tmp_path):
    path, net = weights
    rebuilt = build_dinov2(load_dinov2_state(path))
    assert (rebuilt.embed_dim, len(rebuilt.blocks), rebuilt.patch_embed.patch_size) == (384, 2, (14, 14))
    x = torch.randn(2, 3, 28, 28)  # the saved network's own input size
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), net(x), rtol=0, atol=0)
    safetensors.torch.save_file(net.state_dict(), tmp_path / "model.safetensors")
    assert load_dinov2_state(tmp_path / "model.safetensors").keys() == net.state_dict().keys()


def test_features_are_class_tokens_of_224_px_normalised_images(weights):
    path, net = weights
    images = _images(1, 3)  # 32 px, resized to 224: 16 x 16 patches, position embeddings interpolated from 2 x 2
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bicubic", antialias=True).clamp(0, 1)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = build_dinov2(net.state_dict()).forward_features(x)[:, 0]  # the class token after the final norm
    np.testing.assert_allclose(DINOv2Features(path)(images), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_evaluate_reports_fd_dinov2_and_caches_the_reference(weights, tmp_path):
    path, _ = weights
    samples, ref = image_set_from_array(_images(2), "samples", "s" * 64), image_set_from_array(_images(3), "ref", "r" * 64)
    opts = EvalOptions(cache_dir=str(tmp_path / "cache"), inception=False, dinov2_weights=str(path), batch_size=4)
    result = evaluate(samples, ref, opts)
    encoder = DINOv2Features(path)
    gen, real = encoder(_images(2)), encoder(_images(3))
    expected = M.frechet_distance(M.feature_statistics(gen), M.feature_statistics(real))
    assert result["metrics"]["fd_dinov2"] == pytest.approx(expected, rel=1e-6)
    assert result["protocol"]["dinov2"]["weights_sha256"] == encoder.sha256 and result["protocol"]["dinov2"]["width"] == 384
    assert len(list((tmp_path / "cache" / "features").glob("*.npz"))) == 1
    assert evaluate(samples, ref, opts)["metrics"]["fd_dinov2"] == result["metrics"]["fd_dinov2"]  # from the cache


def test_missing_or_foreign_weights_say_how_to_get_them(tmp_path):
    with pytest.raises(EvaluationInputError, match=r"file not found; get timm's DINOv2 weights once .*hf download "
                                                   r"timm/vit_large_patch14_dinov2.lvd142m"):
        load_dinov2_state(tmp_path / "missing.pth")
    torch.save({"weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(EvaluationInputError, match=r"is not a timm DINOv2 ViT state dict \(missing \['cls_token'"):
        load_dinov2_state(tmp_path / "other.pth")
