"""The layers' small formulas (sinusoid, adaLN modulation, gated residual) and the CPU inference patch projection."""

import pytest
import torch
import torch.nn.functional as F

from pixelflow import layers
from pixelflow.layers import PatchEmbed, fp32_region, gated_residual, modulate, plain_layer_norm, sinusoid
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
    assert gated_residual(stream, gate, x.bfloat16()).dtype == torch.bfloat16


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize("op", ["modulate", "gated_residual"])
def test_overwrite_writes_in_place_only_on_the_cpu_inference_path(op, grad):
    torch.manual_seed(0)
    x, a, b = torch.randn(2, 5, 8), torch.randn(2, 1, 8), torch.randn(2, 1, 8)
    call, expected = {"modulate": (lambda t: modulate(t, a, b, overwrite=True), x * b + a),
                      "gated_residual": (lambda t: gated_residual(t, a, x, overwrite=True), x + a * x)}[op]
    given = x.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out = call(given)
    torch.testing.assert_close(out, expected)
    assert (out is given) == (not grad)  # with autograd on, a new tensor and the input as it was
    if grad:
        assert torch.equal(given.detach(), x)


def test_fp32_region_turns_autocast_off_only_where_it_is_on():
    with fp32_region(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with fp32_region(torch.device("cpu")):
            assert not torch.is_autocast_enabled("cpu")
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("patch", [2, 4])
def test_patch_embed_inference_matmul_equals_the_convolution(monkeypatch, patch):
    """Without autograd on the CPU the patch projection is one matmul over gathered patches; same values."""
    torch.manual_seed(0)
    embed = PatchEmbed(patch_size=patch, in_channels=3, hidden=24)
    x = torch.randn(2, 3, 16, 12)
    ref = embed(x).detach()  # autograd on: the Conv2d

    def no_conv(_):
        raise AssertionError("inference should not run the convolution")

    monkeypatch.setattr(embed.proj, "forward", no_conv)
    with torch.no_grad():
        out = embed(x)
    assert out.shape == (2, 16 * 12 // patch**2, 24)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_plain_layer_norm_is_layer_norm_without_parameters():
    x = torch.randn(3, 7, 16) * 3 + 1
    out = plain_layer_norm(x.bfloat16())
    assert out.dtype == torch.float32
    torch.testing.assert_close(plain_layer_norm(x), F.layer_norm(x, (16,), eps=1e-6), rtol=0, atol=0)
    torch.testing.assert_close(out, F.layer_norm(x.bfloat16().float(), (16,), eps=1e-6), rtol=0, atol=0)


def test_attention_rotates_the_normed_queries_and_keys_in_the_streams_dtype(monkeypatch):
    """Under bf16 autocast the published RMSNorm returns its input's dtype, so the rotation starts from
    bf16-rounded queries and keys; the fp32 path rotates in place."""
    seen = []

    def recording(x, *tables, overwrite=False):
        seen.append(x.dtype)
        return apply_rope(x, *tables, overwrite=overwrite)

    monkeypatch.setattr(layers, "apply_rope", recording)
    torch.manual_seed(0)
    attn = layers.Attention(32, 2, 16).eval()
    x, rope = torch.randn(2, 16, 32), rope_pairs(4, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = attn(x.bfloat16(), rope)
    assert seen == [torch.bfloat16, torch.bfloat16] and out.dtype == torch.bfloat16
