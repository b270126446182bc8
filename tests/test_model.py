import json

import pytest
import torch

from pixelflow.model import PIXELFLOW_CONFIGS, PixelFlowTransformer, build_model
from tests.conftest import GOLDEN_T2I, MANIFEST


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


C2I_SIZES = sorted(n for n, kw in PIXELFLOW_CONFIGS.items() if not kw.get("cross_attention_dim"))
T2I_SIZES = sorted(n for n, kw in PIXELFLOW_CONFIGS.items() if kw.get("cross_attention_dim"))


@pytest.mark.parametrize("name", C2I_SIZES)
def test_every_named_size_builds_and_runs(name):
    kw = PIXELFLOW_CONFIGS[name]
    with torch.device("meta"):
        model = build_model(name, num_classes=10)
    assert model.hidden_size == kw["num_attention_heads"] * kw["attention_head_dim"]
    p = kw["patch_size"]
    x = torch.randn(2, 3, 4 * p, 4 * p, device="meta")
    out = model(x, torch.tensor([10.0, 500.0], device="meta"), torch.tensor([1, 10], device="meta"))
    assert out.shape == x.shape


@pytest.mark.parametrize("name", T2I_SIZES)
def test_every_t2i_size_builds_and_runs(name):
    kw = PIXELFLOW_CONFIGS[name]
    with torch.device("meta"):
        model = build_model(name)
        x = torch.randn(2, 3, 4 * kw["patch_size"], 4 * kw["patch_size"])
        out = model(x, torch.tensor([10.0, 500.0]), text_states=torch.randn(2, 7, kw["cross_attention_dim"]),
                    text_mask=torch.ones(2, 7))
    assert out.shape == x.shape and not hasattr(model, "class_embedder")
    with pytest.raises(ValueError, match="no class table"):
        _ = model.null_class


def _published_t2i_keys(depth: int, hidden: int, d_text: int, patch: int) -> dict[str, list[int]]:
    """The published T2I key names (from the golden model's listing, depth 2) at another size."""
    golden = json.loads((GOLDEN_T2I / "model_config.json").read_text())["keys"]
    shapes = {32: hidden, 24: d_text, 192: 6 * hidden, 128: 4 * hidden, 64: 2 * hidden, 12: patch * patch * 3}
    keys = {}
    for name, shape in golden.items():
        if name == "patch_embed.proj.weight":
            shape = [hidden, 3, patch, patch]
        elif name.endswith(("linear_1.weight",)):
            shape = [hidden, 256]
        else:
            shape = [shapes[d] for d in shape]
        if name.startswith("transformer_blocks.0."):
            keys.update({name.replace(".0.", f".{i}.", 1): shape for i in range(depth)})
        elif not name.startswith("transformer_blocks."):
            keys[name] = shape
    return keys


def test_t2i_test_size_matches_the_golden_key_listing():
    config = json.loads((GOLDEN_T2I / "model_config.json").read_text())
    with torch.device("meta"):
        model = PixelFlowTransformer(**config["constructor"])
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == config["keys"]


def test_t2i_released_size_loads_a_published_state_dict_strictly():
    """Meta build of the guessed released layout (D_text = 2048) against synthetic published keys."""
    with torch.device("meta"):
        model = build_model("T2I-XL/4")
    keys = _published_t2i_keys(depth=28, hidden=1152, d_text=2048, patch=4)
    assert "transformer_blocks.27.attn2.k_proj.weight" in keys and "transformer_blocks.5.norm2.weight" in keys
    state = {k: torch.empty(shape, device="meta") for k, shape in keys.items()}
    model.load_state_dict(state, strict=True, assign=True)
    assert model.transformer_blocks[27].attn2.k_proj.weight.shape == (1152, 2048)
    assert round(sum(p.numel() for p in model.parameters()) / 1e6) == 882  # the published 882M
    bad = dict(state, **{"transformer_blocks.0.attn2.k_proj.weight": torch.empty(1152, 4096, device="meta")})
    with pytest.raises(RuntimeError, match="size mismatch"):
        model.load_state_dict(bad, strict=True, assign=True)


def test_t2i_masked_text_positions_do_not_matter_and_valid_ones_do(t2i_model):
    model, x = t2i_model, torch.randn(2, 3, 8, 8)
    states, mask = torch.randn(2, 5, 24), torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 0]])
    with torch.no_grad():
        out = model(x, 300.0, text_states=states, text_mask=mask)
        masked = states.clone()
        masked[0, 2:], masked[1, 4] = 7.0, -3.0
        assert torch.equal(model(x, 300.0, text_states=masked, text_mask=mask), out)
        changed = states.clone()
        changed[0, 1] += 1.0
        out2 = model(x, 300.0, text_states=changed, text_mask=mask)
    assert (out2[0] - out[0]).abs().max() > 1e-3 and torch.equal(out2[1], out[1])


def test_conditioning_mismatches_are_clear_errors(t2i_model):
    t2i, x, t = t2i_model, torch.randn(1, 3, 8, 8), torch.tensor([1.0])
    with pytest.raises(ValueError, match="text-to-image model: pass text_states"):
        t2i(x, t, torch.tensor([1]))
    with pytest.raises(ValueError, match=r"text_states must be \(1, L, 24\)"):
        t2i(x, t, text_states=torch.randn(1, 4, 16), text_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="text_mask must be"):
        t2i(x, t, text_states=torch.randn(1, 4, 24), text_mask=torch.ones(1, 5))
    c2i = build_model("Test/2", num_classes=10)
    with pytest.raises(ValueError, match="no cross-attention"):
        c2i(x, t, torch.tensor([1]), text_states=torch.randn(1, 4, 24), text_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="class-to-image model: pass class_labels"):
        c2i(x, t)
    with pytest.raises(ValueError, match="choose class conditioning"):
        build_model("Test/2", num_classes=10, cross_attention_dim=24)


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


def test_modulations_computed_ahead_give_the_same_velocity(tiny_model, t2i_model):
    timesteps = torch.tensor([30.0, 400.0, 999.0])
    labels, x = torch.tensor([10, 10, 2, 7]), torch.randn(4, 3, 16, 16)  # [null, null; class rows]
    with torch.no_grad():
        ahead = tiny_model.modulations(timesteps, 8, class_labels=labels)
        for t, modulation in zip(timesteps, ahead):
            plain = tiny_model(x, t.expand(4), labels)
            torch.testing.assert_close(tiny_model(x, None, labels, modulation=modulation), plain, rtol=0, atol=1e-6)
            # The conditional half of a guided step's vectors serves a conditional-only call.
            torch.testing.assert_close(tiny_model(x[2:], None, labels[2:], modulation=modulation.last(2)), plain[2:],
                                       rtol=0, atol=1e-6)
        text, mask = torch.randn(2, 12, 24), torch.ones(2, 12)
        (modulation,) = t2i_model.modulations(timesteps[1:2], 8, text_states=text, text_mask=mask)
        torch.testing.assert_close(t2i_model(x[:2], None, text_states=text, text_mask=mask, modulation=modulation),
                                   t2i_model(x[:2], timesteps[1:2], text_states=text, text_mask=mask), rtol=0, atol=1e-6)


def test_modulation_misuse_is_a_clear_error(tiny_model):
    labels, x = torch.tensor([1, 2]), torch.randn(2, 3, 16, 16)
    (modulation,) = tiny_model.modulations(torch.tensor([500.0]), 8, class_labels=labels)
    with pytest.raises(ValueError, match="timestep=None"):
        tiny_model(x, torch.tensor([500.0]), labels, modulation=modulation)
    with pytest.raises(ValueError, match="modulation is for 2 rows"):
        tiny_model(torch.randn(3, 3, 16, 16), None, torch.tensor([1, 2, 3]), modulation=modulation)
    with pytest.raises(ValueError, match="condition arguments"):
        tiny_model.modulations(torch.tensor([500.0]), 8)
    with pytest.raises(ValueError, match="single stage input"):
        tiny_model([x], None, labels, modulation=modulation)
