import pytest
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
    rotated = apply_rope(x, *rope_pairs(grid=3, head_dim=8))
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
    half = rope_pairs(grid=4, head_dim=8)
    for x in (torch.randn(3, 16, 2, 8), torch.randn(3, 2, 16, 8).transpose(1, 2)):
        assert (apply_rope(x, *half) - real_rotation(x, cos, sin)).abs().max() <= 4 * torch.finfo(torch.float32).eps * x.abs().max()
    odd = torch.randn(1, 2 * 16 * 8 + 1)[:, 1:].view(1, 16, 2, 8)  # pairs not aligned in memory
    assert torch.allclose(apply_rope(odd, *half), apply_rope(odd.clone(), *half), atol=0)


def test_the_compiled_form_is_the_real_formula(monkeypatch):
    """Under torch.compile the rotation is real-valued (inductor has no complex codegen); checked here eagerly."""
    cos, sin = rope_2d(grid=4, head_dim=8)
    x = torch.randn(3, 16, 2, 8)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    torch.testing.assert_close(apply_rope(x, *rope_pairs(grid=4, head_dim=8)), real_rotation(x, cos, sin))


def test_the_cached_complex_table_is_cos_plus_i_sin_and_rotates_as_the_pair_tables():
    cos, sin, rotation = rope_pairs(grid=4, head_dim=8)
    assert torch.equal(rotation.real, cos) and torch.equal(rotation.imag, sin)
    assert rope_pairs(grid=4, head_dim=8)[2] is rotation  # built once, not per layer call
    x = torch.randn(3, 16, 2, 8)
    assert torch.equal(apply_rope(x, cos, sin, rotation), apply_rope(x, cos, sin))


@pytest.mark.parametrize("grad", [False, True])
def test_overwrite_rotates_in_place_only_on_the_cpu_inference_path(grad):
    table = rope_pairs(grid=4, head_dim=8)
    x = torch.randn(3, 16, 2, 8)
    expected = apply_rope(x, *table)
    given = x.clone().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        out = apply_rope(given, *table, overwrite=True)
    assert torch.equal(out, expected)
    assert (out is given) == (not grad)  # with autograd on, the input is left as it was
    if grad:
        assert torch.equal(given.detach(), x)
    odd = torch.randn(1, 3 * 16 * 2 * 8 + 1)[:, 1:].view(3, 16, 2, 8)
    before = odd.clone()
    with torch.no_grad():
        out = apply_rope(odd, *table, overwrite=True)  # unaligned pairs: a rotated copy, the input untouched
    assert out is not odd and torch.equal(odd, before) and torch.equal(out, apply_rope(before, *table))
