"""The layers' maths: sinusoid, norms, adaLN modulation, gated residual, patch projection and attention dtypes."""

import torch
import torch.nn.functional as F

from pixelflow import layers
from pixelflow.layers import (
    FeedForward,
    PatchEmbed,
    fp32_region,
    gated_residual,
    layer_norm,
    modulate,
    rms_norm,
    sinusoid,
)
from pixelflow.rope import apply_rope, rope_pairs


def test_sinusoid_is_cosine_first_with_divisor_127():
    emb = sinusoid(torch.tensor([3.0]))
    k = torch.arange(128)
    f = torch.exp(-torch.log(torch.tensor(10000.0)) * k / 127)
    assert torch.allclose(emb[0, :128], torch.cos(3 * f), atol=1e-6)
    assert torch.allclose(emb[0, 128:], torch.sin(3 * f), atol=1e-6)


def test_modulate_and_gated_residual_are_their_formulas():
    torch.manual_seed(0)
    x, shift, scale, gate = torch.randn(2, 5, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    torch.testing.assert_close(modulate(x, shift, 1 + scale), x * (1 + scale) + shift)
    torch.testing.assert_close(gated_residual(x, gate, x), x + gate * x)
    # autocast: a bf16 branch output meets an fp32 gate; the residual keeps the stream's dtype
    stream = x.bfloat16()
    out = gated_residual(stream, gate, x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, stream + (gate * x.bfloat16()).bfloat16(), rtol=0, atol=0)


def test_norms_have_no_learned_parameters_and_run_in_fp32():
    x = torch.randn(3, 7, 16) * 3 + 1
    for norm, reference in ((layer_norm, lambda t: F.layer_norm(t, (16,), eps=1e-6)),
                            (lambda t: rms_norm(t, 1e-6), lambda t: t * torch.rsqrt(t.square().mean(-1, keepdim=True) + 1e-6))):
        torch.testing.assert_close(norm(x), reference(x), rtol=1e-6, atol=1e-6)
        out = norm(x.bfloat16())
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, norm(x.bfloat16().float()), rtol=0, atol=0)
    assert layer_norm(x).mean(-1).abs().max() < 1e-5 and (layer_norm(x).std(-1, unbiased=False) - 1).abs().max() < 1e-3


def test_fp32_region_turns_autocast_off_only_where_it_is_on():
    with fp32_region(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with fp32_region(torch.device("cpu")):
            assert not torch.is_autocast_enabled("cpu")
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")


def test_patch_embed_projects_each_patch_in_row_major_order():
    torch.manual_seed(0)
    embed = PatchEmbed(patch_size=2, in_channels=3, hidden=24)
    x = torch.randn(2, 3, 8, 6)
    out = embed(x)
    assert out.shape == (2, 12, 24)
    token = 1 * 3 + 2  # patch row 1, column 2
    patch = x[:, :, 2:4, 4:6].flatten(1)
    torch.testing.assert_close(out[:, token], patch @ embed.proj.weight.flatten(1).T + embed.proj.bias, rtol=1e-5, atol=1e-6)


def test_feed_forward_is_linear_tanh_gelu_linear():
    torch.manual_seed(0)
    mlp, x = FeedForward(8), torch.randn(3, 8)
    hidden = mlp.fc1(x)
    expected = mlp.fc2(0.5 * hidden * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (hidden + 0.044715 * hidden**3))))
    torch.testing.assert_close(mlp(x), expected, rtol=1e-5, atol=1e-6)


def test_attention_rotates_the_normed_queries_and_keys_in_the_streams_dtype(monkeypatch):
    """Under bf16 autocast the published RMSNorm returns its input's dtype, so the rotation starts from
    bf16-rounded queries and keys."""
    seen = []

    def recording(x, rope):
        seen.append(x.dtype)
        return apply_rope(x, rope)

    monkeypatch.setattr(layers, "apply_rope", recording)
    torch.manual_seed(0)
    attn = layers.Attention(32, 2, 16).eval()
    x, rope = torch.randn(2, 16, 32), rope_pairs(4, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x.bfloat16(), rope)
    assert seen == [torch.bfloat16, torch.bfloat16] and out.dtype == torch.bfloat16


def test_attention_is_multi_head_attention_of_normed_rotated_heads():
    torch.manual_seed(0)
    attn = layers.Attention(32, 2, 16).eval()
    with torch.no_grad():
        attn.q_norm.weight.uniform_(0.5, 1.5)
    x, rope = torch.randn(2, 16, 32), rope_pairs(4, 16)

    def heads(t):  # (B, S, H * D) -> (B, H, S, D)
        return t.unflatten(-1, (2, 16)).transpose(1, 2)

    q = apply_rope(attn.q_norm(attn.q_proj(x)).unflatten(-1, (2, 16)), rope).transpose(1, 2)
    k = apply_rope(attn.k_norm(attn.k_proj(x)).unflatten(-1, (2, 16)), rope).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 16**0.5, dim=-1)
    expected = attn.o_proj((weights @ heads(attn.v_proj(x))).transpose(1, 2).flatten(2))
    torch.testing.assert_close(attn(x, rope), expected, rtol=1e-5, atol=1e-6)
