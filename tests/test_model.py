import json

import pytest
import torch

from pixelflow.model import PIXELFLOW_CONFIGS, PixelFlowTransformer, apply_rope, build_model, rope_2d, sinusoid
from tests.conftest import MANIFEST


def test_xl4_matches_released_manifest_key_for_key():
    manifest = json.loads(MANIFEST.read_text())
    with torch.device("meta"):
        model = build_model("XL/4")
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    theirs = {e["name"]: list(e["shape"]) for e in manifest["keys"]}
    assert ours == theirs
    assert {e["dtype"] for e in manifest["keys"]} == {"float32"}
    assert {str(v.dtype) for v in model.state_dict().values()} == {"torch.float32"}
    assert model.hidden_size == 1152 and model.null_class == 1000
    assert sum(p.numel() for p in model.parameters()) == manifest["params"] == 676_611_120
    assert len(ours) == manifest["num_state_dict_entries"] == 491


@pytest.mark.parametrize("name", sorted(PIXELFLOW_CONFIGS))
def test_every_named_size_builds_and_runs(name):
    kw = PIXELFLOW_CONFIGS[name]
    with torch.device("meta"):
        model = build_model(name, num_classes=10)
    assert model.hidden_size == kw["num_attention_heads"] * kw["attention_head_dim"]
    p = kw["patch_size"]
    x = torch.randn(2, 3, 4 * p, 4 * p, device="meta")
    out = model(x, torch.tensor([10.0, 500.0], device="meta"), torch.tensor([1, 10], device="meta"))
    assert out.shape == x.shape


def test_unknown_size_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown model size"):
        build_model("XXL/1")


def test_published_init_gives_zero_output():
    model = build_model("Test/2", num_classes=10)
    out = model(torch.randn(1, 3, 8, 8), 100.0, torch.tensor([3]))
    assert torch.count_nonzero(out) == 0


def test_per_row_timesteps_condition_each_row(tiny_model):
    x = torch.randn(1, 3, 8, 8).expand(2, -1, -1, -1)
    labels = torch.tensor([3, 3])
    both = tiny_model(x, torch.tensor([10.0, 900.0]), labels)
    assert torch.allclose(both[0], tiny_model(x[:1], 10.0, labels[:1])[0], atol=1e-6)
    assert torch.allclose(both[1], tiny_model(x[:1], 900.0, labels[:1])[0], atol=1e-6)
    assert not torch.allclose(both[0], both[1], atol=1e-3)


def test_sinusoid_is_cosine_first_with_divisor_127():
    emb = sinusoid(torch.tensor([3.0]))
    k = torch.arange(128)
    f = torch.exp(-torch.log(torch.tensor(10000.0)) * k / 127)
    assert torch.allclose(emb[0, :128], torch.cos(3 * f), atol=1e-6)
    assert torch.allclose(emb[0, 128:], torch.sin(3 * f), atol=1e-6)


def test_rope_layout_columns_then_rows():
    cos, sin = rope_2d(grid=3, head_dim=8)
    angle = torch.atan2(sin, cos)
    token = 1 * 3 + 2  # row 1, col 2
    assert torch.allclose(angle[token, :4], torch.tensor([2.0, 2.0, 0.02, 0.02]), atol=1e-6)
    assert torch.allclose(angle[token, 4:], torch.tensor([1.0, 1.0, 0.01, 0.01]), atol=1e-6)
    x = torch.zeros(1, 1, 9, 8)
    x[..., 0] = 1.0  # the pair (1, 0) rotates to (cos a, sin a)
    rotated = apply_rope(x, cos, sin)
    a = torch.tensor(2.0)
    assert torch.allclose(rotated[0, 0, token, :2], torch.stack([a.cos(), a.sin()]), atol=1e-6)


def test_rejects_non_square_or_unpatchable_input(tiny_model):
    with pytest.raises(ValueError, match="square"):
        tiny_model(torch.randn(1, 3, 8, 6), 1.0, torch.tensor([0]))


def test_gradient_checkpointing_gives_same_gradients(tiny_model):
    x, t, y = torch.randn(2, 3, 8, 8), torch.tensor([5.0, 50.0]), torch.tensor([1, 2])
    tiny_model.train()
    tiny_model(x, t, y).square().mean().backward()
    ref = [p.grad.clone() for p in tiny_model.parameters()]
    tiny_model.zero_grad()
    tiny_model.gradient_checkpointing = True
    tiny_model(x, t, y).square().mean().backward()
    for a, p in zip(ref, tiny_model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)


def test_constructor_validates_head_dim():
    with pytest.raises(ValueError, match="divisible by 4"):
        PixelFlowTransformer(num_attention_heads=2, attention_head_dim=6, depth=1, num_classes=2, patch_size=2)
