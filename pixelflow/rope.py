"""2D rotary position embedding of the PixelFlow transformer.

Channel pairs of a head rotate by angles of the token's column (first half of the head) and row
(second half), with the published frequencies theta^(-4j / head_dim). A pair (a, b) read as the
complex number a + ib rotates by one product with e^(i angle): (a cos - b sin, b cos + a sin), the
published real-valued formula, to float rounding; the complex product is one kernel where the real
form takes several, in training and sampling alike.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch

from pixelflow.precision import as_dtype

__all__ = ["RopeTables", "rope_2d", "rope_pairs", "apply_rope", "viewable_as_complex"]


@lru_cache(maxsize=32)
@torch.inference_mode(False)  # a cached table must stay usable by autograd after a sampling call
def _rope_tables(grid: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    half = head_dim // 2
    inv_freq = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float64) / half)
    coords = torch.arange(grid, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    angles = torch.cat([cols.reshape(-1, 1) * inv_freq, rows.reshape(-1, 1) * inv_freq], dim=1)
    angles = angles.repeat_interleave(2, dim=1)  # (g*g, head_dim): consecutive pairs share an angle
    return angles.cos().float().to(device), angles.sin().float().to(device)


def rope_2d(grid: int, head_dim: int, theta: float = 10000.0, device: torch.device | str = "cpu"):
    """(cos, sin) of shape (grid*grid, head_dim): first half follows the column, second the row."""
    return _rope_tables(grid, head_dim, theta, torch.device(device))


class RopeTables(NamedTuple):
    """:func:`rope_2d` once per channel pair, each (tokens, head_dim / 2): the angle's cos and sin, and the
    rotation e^(i angle) = cos + i sin as one complex table."""

    cos: torch.Tensor
    sin: torch.Tensor
    rotation: torch.Tensor


@lru_cache(maxsize=32)
@torch.inference_mode(False)
def _pair_tables(grid: int, head_dim: int, theta: float, device: torch.device) -> RopeTables:
    cos, sin = _rope_tables(grid, head_dim, theta, device)
    cos, sin = cos[:, ::2], sin[:, ::2]
    return RopeTables(cos, sin, torch.complex(cos, sin))


def rope_pairs(grid: int, head_dim: int, theta: float = 10000.0, device: torch.device | str = "cpu") -> RopeTables:
    """The :class:`RopeTables` of a token grid, built once per grid rather than in every layer."""
    return _pair_tables(grid, head_dim, theta, torch.device(device))


def viewable_as_complex(pairs: torch.Tensor) -> bool:
    """Whether ``view_as_complex`` can read these (..., 2) float pairs where they lie: each pair adjacent and
    aligned in memory, as in any fresh tensor."""
    return (pairs.stride(-1) == 1 and pairs.storage_offset() % 2 == 0
            and all(stride % 2 == 0 for stride in pairs.stride()[:-1]))


def apply_rope(x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
    """Rotate the interleaved channel pairs of ``x`` (B, S, H, D), tokens then heads as the projections lay them out,
    by the angles of ``rope`` (S, D / 2 each), the same for every head. In fp32, returned in x's dtype.

    A graph ``torch.compile`` traces takes the real-valued form, which inductor fuses with the q/k norm
    before it; it generates no code for complex operators, and reading a tensor's memory layout (the
    alignment ``view_as_complex`` needs) would break the graph.
    """
    pairs = as_dtype(x, torch.float32).unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():
        a, b = pairs.unbind(-1)
        cos, sin = rope.cos.unsqueeze(-2), rope.sin.unsqueeze(-2)
        return as_dtype(torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2), x.dtype)
    if not viewable_as_complex(pairs):
        pairs = pairs.clone(memory_format=torch.contiguous_format)
    rotated = torch.view_as_complex(pairs) * rope.rotation.unsqueeze(-2)
    return as_dtype(torch.view_as_real(rotated).flatten(-2), x.dtype)
