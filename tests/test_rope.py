import torch

from pixelflow.rope import apply_rope, rope_2d, rope_pairs


def test_rope_layout_columns_then_rows():
    cos, sin = rope_2d(grid=3, head_dim=8)
    angle = torch.atan2(sin, cos)
    token = 1 * 3 + 2  # row 1, col 2
    assert torch.allclose(angle[token, :4], torch.tensor([2.0, 2.0, 0.02, 0.02]), atol=1e-6)
    assert torch.allclose(angle[token, 4:], torch.tensor([1.0, 1.0, 0.01, 0.01]), atol=1e-6)
    x = torch.zeros(1, 1, 9, 8)
    x[..., 0] = 1.0  # the pair (1, 0) rotates to (cos a, sin a)
    rotated = apply_rope(x, *rope_pairs(grid=3, head_dim=8))
    a = torch.tensor(2.0)
    assert torch.allclose(rotated[0, 0, token, :2], torch.stack([a.cos(), a.sin()]), atol=1e-6)


def test_complex_rope_is_the_real_formula_to_float_rounding_on_any_layout():
    cos, sin = rope_2d(grid=4, head_dim=8)
    x = torch.randn(3, 16, 2, 8).transpose(1, 2)  # (B, H, S, D) as the attention lays it out
    pairs = x.unflatten(-1, (-1, 2))
    real = x * cos + torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2) * sin
    half = rope_pairs(grid=4, head_dim=8)
    assert (apply_rope(x, *half) - real).abs().max() <= 4 * torch.finfo(torch.float32).eps * x.abs().max()
    odd = torch.randn(1, 2 * 16 * 8 + 1)[:, 1:].view(1, 2, 16, 8)  # pairs not aligned in memory
    assert torch.allclose(apply_rope(odd, *half), apply_rope(odd.clone(), *half), atol=0)


def test_the_cached_complex_table_is_cos_plus_i_sin_and_rotates_as_the_pair_tables():
    cos, sin, rotation = rope_pairs(grid=4, head_dim=8)
    assert torch.equal(rotation.real, cos) and torch.equal(rotation.imag, sin)
    assert rope_pairs(grid=4, head_dim=8)[2] is rotation  # built once, not per layer call
    x = torch.randn(3, 2, 16, 8)
    assert torch.equal(apply_rope(x, cos, sin, rotation), apply_rope(x, cos, sin))
