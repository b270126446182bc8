"""2D RoPE: the layout of the angles, the complex rotation against the published real-valued formula."""

import torch

from pixelflow.rope import apply_rope, rope_2d, rope_pairs


def test_rope_layout_columns_then_rows():
    cos, sin = rope_2d(grid=3, head_dim=8)
    angle = torch.atan2(sin, cos)
    token = 1 * 3 + 2  # row 1, col 2
    assert torch.allclose(angle[token, :4], torch.tensor([2.0, 2.0, 0.02, 0.02]), atol=1e-6)
    assert torch.allclose(angle[token, 4:], torch.tensor([1.0, 1.0, 0.01, 0.01]), atol=1e-6)
    x = torch.zeros(1, 9, 2, 8)  # (B, S, H, D): every head of a token rotates by the token's angles
    x[..., 0] = 1.0  # the pair (1, 0) rotates to (cos a, sin a)
    rotated = apply_rope(x, rope_pairs(grid=3, head_dim=8))
    a = torch.tensor(2.0)
    for head in range(2):
        assert torch.allclose(rotated[0, token, head, :2], torch.stack([a.cos(), a.sin()]), atol=1e-6)


def real_rotation(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The published real-valued formula on (B, S, H, D) with (S, D) tables."""
    pairs = x.unflatten(-1, (-1, 2))
    swapped = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return x * cos[:, None] + swapped * sin[:, None]


def test_complex_rope_is_the_real_formula_to_float_rounding_on_any_layout():
    cos, sin = rope_2d(grid=4, head_dim=8)
    rope = rope_pairs(grid=4, head_dim=8)
    for x in (torch.randn(3, 16, 2, 8), torch.randn(3, 2, 16, 8).transpose(1, 2), torch.randn(3, 16, 2, 16)[..., ::2]):
        assert (apply_rope(x, rope) - real_rotation(x, cos, sin)).abs().max() <= 4 * torch.finfo(torch.float32).eps * x.abs().max()
    odd = torch.randn(1, 2 * 16 * 8 + 1)[:, 1:].view(1, 16, 2, 8)  # pairs not aligned in memory
    assert torch.allclose(apply_rope(odd, rope), apply_rope(odd.clone(), rope), atol=0)


def test_the_compiled_form_is_the_real_formula(monkeypatch):
    """Traced by torch.compile the rotation is real-valued (inductor has no complex codegen); checked here eagerly."""
    cos, sin = rope_2d(grid=4, head_dim=8)
    x = torch.randn(3, 16, 2, 8)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(apply_rope(x, rope_pairs(grid=4, head_dim=8)), real_rotation(x, cos, sin))


def test_the_cached_tables_are_each_pairs_angle_built_once():
    cos, sin = rope_2d(grid=4, head_dim=8)
    tables = rope_pairs(grid=4, head_dim=8)
    assert tables.rotation.dtype == torch.complex64 and tables.rotation.shape == tables.cos.shape == (16, 4)
    assert torch.equal(tables.cos, cos[:, ::2]) and torch.equal(tables.sin, sin[:, ::2])
    assert torch.equal(cos[:, ::2], cos[:, 1::2])  # the two channels of a pair share an angle
    assert torch.equal(tables.rotation.real, tables.cos) and torch.equal(tables.rotation.imag, tables.sin)
    assert rope_pairs(grid=4, head_dim=8) is tables  # built once, not per layer call


def test_rotation_leaves_its_input_and_returns_the_inputs_dtype():
    x = torch.randn(3, 16, 2, 8)
    given = x.clone()
    out = apply_rope(x.bfloat16(), rope_pairs(grid=4, head_dim=8))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, apply_rope(x.bfloat16().float(), rope_pairs(grid=4, head_dim=8)).bfloat16(), rtol=0, atol=0)
    apply_rope(x, rope_pairs(grid=4, head_dim=8))
    assert torch.equal(x, given)
