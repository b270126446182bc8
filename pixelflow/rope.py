"""2D rotary position embedding of the PixelFlow transformer.

Channel pairs of a head rotate by angles of the token's column (first half of the head) and row
(second half), with the published frequencies theta^(-4j / head_dim).
"""

from __future__ import annotations

from functools import lru_cache

import torch

from pixelflow.fused import cpu_inference
from pixelflow.precision import as_dtype

__all__ = ["rope_2d", "rope_pairs", "apply_rope"]


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


@lru_cache(maxsize=32)
@torch.inference_mode(False)
def _pair_tables(grid: int, head_dim: int, theta: float, device: torch.device) -> tuple[torch.Tensor, ...]:
    cos, sin = _rope_tables(grid, head_dim, theta, device)
    cos, sin = cos[:, ::2], sin[:, ::2]
    return cos, sin, torch.complex(cos, sin)


def rope_pairs(grid: int, head_dim: int, theta: float = 10000.0, device: torch.device | str = "cpu"):
    """:func:`rope_2d` once per pair of channels: (cos, sin, cos + i sin), each (grid*grid, head_dim / 2).

    The complex table is what the eager rotation multiplies by, built once here rather than in every layer.
    """
    return _pair_tables(grid, head_dim, theta, torch.device(device))


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotation: torch.Tensor | None = None, *, overwrite: bool = False,
) -> torch.Tensor:
    """Rotate interleaved pairs (a, b) -> (a cos - b sin, b cos + a sin); x is (B, S, H, D), tokens then heads,
    as the projections lay them out; cos/sin (S, D / 2), the same for every head.

    Eager: one complex product by ``rotation`` = cos + i sin (formed here when not given; the same formula to
    float rounding, 3-10x faster on CPU than the real-valued form), into ``x`` itself with ``overwrite`` where
    :func:`~pixelflow.fused.cpu_inference` holds (for a fresh float32 tensor the caller owns; use the return
    value). Under torch.compile: the real-valued form, which inductor fuses (it does not generate code for
    complex operators).
    """
    pairs = as_dtype(x, torch.float32).unflatten(-1, (-1, 2))
    if torch.compiler.is_compiling():
        a, b = pairs.unbind(-1)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2).to(x.dtype)
    aligned = pairs.storage_offset() % 2 == 0 and all(stride % 2 == 0 for stride in pairs.stride()[:-1])
    if not aligned:
        pairs = pairs.clone(memory_format=torch.contiguous_format)  # view_as_complex needs aligned (a, b) pairs
    rotation = (torch.complex(cos, sin) if rotation is None else rotation).unsqueeze(-2)
    if overwrite and aligned and cpu_inference(x):
        torch.view_as_complex(pairs).mul_(rotation)
        return x
    return as_dtype(torch.view_as_real(torch.view_as_complex(pairs) * rotation).flatten(-2), x.dtype)
