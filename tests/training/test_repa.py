import shutil

import pytest
import timm
import torch
from torch import nn

from pixelflow.cascade import CascadeSchedule
from pixelflow.model import build_model
from pixelflow.training.launch import run_training
from pixelflow.training.objective import Objective, cascade_loss
from pixelflow.training.repa import RepaAlignment, TimmEncoder
from tests.hydra_utils import compose_config, tiny_train_overrides


class TinyEncoder:
    """A random frozen conv encoder (3 -> 8 channels at 1/4 size) standing in for DINOv2 or the MNIST classifier."""

    def __init__(self, channels: int = 3):
        torch.manual_seed(123)
        self.net = nn.Conv2d(channels, 8, kernel_size=4, stride=4)  # left trainable: REPA must not train it
        self.channels, self.dim = channels, 8

    def to(self, device):
        self.net.to(device)
        return self

    def features(self, images):
        return self.net(images)


ENCODER = "{_target_: tests.training.test_repa.TinyEncoder}"
REPA = [f"objective.repa={{encoder: {ENCODER}, block: 0, weight: 0.5, projector_dim: 16}}"]


def test_repa_trains_the_projector_and_the_network_and_never_the_encoder():
    torch.manual_seed(0)
    model = build_model("Test/2", num_classes=10).train()
    with torch.no_grad():  # the published init zeroes the gates: randomise so every block passes gradients
        for p in model.parameters():
            p.normal_(0, 0.05)
    encoder = TinyEncoder()
    alignment = RepaAlignment(encoder, model.hidden_size, block=0, weight=0.5, projector_dim=16)
    objective = Objective(repa={"encoder": {"_target_": "unused"}, "block": 0})
    objective.check_stages(4)
    images, labels = torch.rand(8, 3, 16, 16) * 2 - 1, torch.randint(0, 10, (8,))
    loss, logs = cascade_loss(model, CascadeSchedule(image_size=16), images, labels, torch.Generator().manual_seed(0),
                              objective=objective, alignment=alignment)
    loss.backward()
    assert -1.0 <= logs["repa"].item() <= 1.0
    assert all(p.grad is None for p in encoder.net.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in alignment.projector.parameters())
    # the term alone trains the blocks up to the aligned one, and nothing after it
    model.zero_grad(set_to_none=True)
    tokens = model([images[:4]], [torch.full((4,), 500.0)], class_labels=labels[:4], return_block=0)[1]
    alignment.loss(tokens, [8], images[:4]).backward()
    assert model.transformer_blocks[0].attn1.q_proj.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.transformer_blocks[1].parameters())
    assert all(p.grad is None for p in encoder.net.parameters())


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_repa_run_resumes_exactly_and_exports_without_the_projector(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_training(compose_config("train", tiny_train_overrides(straight, 4, REPA)))
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "checkpoints" / "step_0000002.ckpt", resumed / "checkpoints" / "last.ckpt")
    run_training(compose_config("train", tiny_train_overrides(resumed, 4, REPA)))
    a, b = _load(straight / "checkpoints" / "last.ckpt"), _load(resumed / "checkpoints" / "last.ckpt")
    projector = [k for k in a["state_dict"] if k.startswith("alignment.projector.")]
    assert projector and a["pixelflow"]["objective"]["repa"]["block"] == 0
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key
    exported = _load(straight / "export" / "model.pt")
    assert not any("projector" in k or "alignment" in k for k in exported)


@pytest.mark.parametrize(("override", "message"), [
    (f"objective.repa={{encoder: {ENCODER}, block: 2, weight: 0.5, projector_dim: 16}}", "block=2 but the model has 2 blocks"),
    ("objective.repa={encoder: {_target_: tests.training.test_repa.TinyEncoder, channels: 1}, block: 0}",
     "reads 1-channel images but the model's images have 3"),
])
def test_repa_conflicts_stop_the_run_at_start_up(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        run_training(compose_config("train", tiny_train_overrides(tmp_path / "run", 2, [override])))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_timm_encoder_loads_a_local_file_and_gives_a_feature_map(tmp_path):
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=56)
    weights = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), weights)
    encoder = TimmEncoder("vit_small_patch14_dinov2", str(weights), image_size=56)
    feats = encoder.features(torch.rand(2, 3, 32, 32) * 2 - 1)
    assert feats.shape == (2, 384, 4, 4) and encoder.dim == 384
    with pytest.raises(FileNotFoundError, match="never downloaded.*hf download timm/vit_small_patch14_dinov2.lvd142m"):
        TimmEncoder("vit_small_patch14_dinov2", str(tmp_path / "missing.safetensors"))
