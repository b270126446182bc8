"""The PixelFlow transformer's layers: conditioning embedders, patch embedding, attention, MLP and the adaLN block.

Module and parameter names follow the published layout, so :class:`pixelflow.model.PixelFlowTransformer`
built from them loads the released state_dicts key for key. The conditioning maths (embedders, adaLN
modulations), the norms and the rotation run in fp32 even under autocast, as in the published model.
These forwards are the method as written; :mod:`pixelflow.cpu_inference` runs the same maths with CPU
inference kernels where the model's forward chooses them.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from pixelflow.packing import Packing, per_token
from pixelflow.precision import as_dtype
from pixelflow.rope import RopeTables, apply_rope

__all__ = ["fp32_region", "sinusoid", "layer_norm", "rms_norm", "modulate", "gated_residual", "ScalarEmbedder",
           "ClassEmbedder", "PatchEmbed", "Attention", "FeedForward", "AdaLNModulation", "TransformerBlock"]


def fp32_region(device: torch.device):
    """Disable autocast so the enclosed conditioning maths runs in fp32 (no-op where autocast is off)."""
    if device.type in ("cuda", "cpu") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return nullcontext()


@lru_cache(maxsize=8)
@torch.inference_mode(False)  # a cached table must stay usable by autograd after a sampling call
def _frequencies(half: int, max_period: float, device: torch.device) -> torch.Tensor:
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=device)
    return torch.exp(exponent / (half - 1))


def sinusoid(values: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Cosine-first sinusoidal embedding with frequencies exp(-ln(P) k / (dim/2 - 1))."""
    angles = values.float()[:, None] * _frequencies(dim // 2, max_period, values.device)[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last dimension without learned parameters (eps 1e-6), in fp32."""
    x = as_dtype(x, torch.float32)
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension without a weight, in fp32 (the block folds the MLP norm's weight into
    its modulation factor)."""
    x = as_dtype(x, torch.float32)
    return F.rms_norm(x, x.shape[-1:], eps=eps)


def modulate(normed: torch.Tensor, shift: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """adaLN with its scale as a factor, ``factor`` = 1 + scale: normed * factor + shift, one fused multiply-add."""
    return torch.addcmul(shift, normed, factor)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x + gate * y in x's dtype: one fused multiply-add where the dtypes agree (under autocast a bf16 branch
    meets an fp32 gate, and the stream keeps its dtype)."""
    if x.dtype == gate.dtype == y.dtype:
        return torch.addcmul(x, gate, y)
    return x + (gate * y).to(x.dtype)


class ScalarEmbedder(nn.Module):
    """Sinusoid of a scalar (timestep or grid side) followed by Linear-SiLU-Linear."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.linear_1 = nn.Linear(freq_dim, hidden)
        self.linear_2 = nn.Linear(hidden, hidden)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        emb = sinusoid(values, self.freq_dim).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(emb)))


class ClassEmbedder(nn.Module):
    """Class table with one extra row (index ``num_classes``) for the null / unconditional class."""

    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels.long())


class PatchEmbed(nn.Module):
    """Non-overlapping patch projection; tokens in row-major order.

    ``bottleneck`` r (JiT's low-rank patch embedding): patch -> r values (``reduce``, no bias) -> hidden
    (``proj``, a 1 x 1 convolution), a rank-r linear map; None is the published full-rank ``proj``.
    """

    def __init__(self, patch_size: int, in_channels: int, hidden: int, bottleneck: int | None = None):
        super().__init__()
        if bottleneck is None:
            self.reduce = None
            self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch_size, stride=patch_size)
        else:
            self.reduce = nn.Conv2d(in_channels, bottleneck, kernel_size=patch_size, stride=patch_size, bias=False)
            self.proj = nn.Conv2d(bottleneck, hidden, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.reduce is not None:
            x = self.reduce(x)
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head attention with a whole-width RMS QK-norm and 2D RoPE (``rope``: :func:`~pixelflow.rope.rope_pairs`).

    Self-attention (``context=None``) rotates queries and keys; cross-attention to ``context``
    (B, L, ``context_dim``) rotates the queries only (keys are text positions) and adds
    ``context_bias`` (B, 1, 1, L) to the scores.
    """

    def __init__(self, hidden: int, num_heads: int, head_dim: int, bias: bool = True, context_dim: int | None = None):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(hidden, inner, bias=bias)
        self.k_proj = nn.Linear(context_dim or hidden, inner, bias=bias)
        self.v_proj = nn.Linear(context_dim or hidden, inner, bias=bias)
        self.o_proj = nn.Linear(inner, hidden, bias=bias)
        self.q_norm = nn.RMSNorm(inner, eps=1e-6)
        self.k_norm = nn.RMSNorm(inner, eps=1e-6)

    def forward(
        self, x: torch.Tensor, rope: RopeTables,
        context: torch.Tensor | None = None, context_bias: torch.Tensor | None = None, packing: Packing | None = None,
    ) -> torch.Tensor:
        def normed(t: torch.Tensor, norm: nn.RMSNorm) -> torch.Tensor:  # in fp32, returned in x's dtype (published)
            return as_dtype(norm(as_dtype(t, torch.float32)), x.dtype)

        kv = x if context is None else as_dtype(context, x.dtype)
        q = apply_rope(self.heads(normed(self.q_proj(x), self.q_norm)), rope)
        k = self.heads(normed(self.k_proj(kv), self.k_norm))
        if context is None:
            k = apply_rope(k, rope)
        return self.o_proj(self.attend(q, k, self.heads(self.v_proj(kv)), context_bias, packing, cross=context is not None))

    def heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, S, H * D) projections as (B, S, H, D) heads."""
        return t.unflatten(-1, (self.num_heads, self.head_dim))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_bias: torch.Tensor | None,
               packing: Packing | None, cross: bool) -> torch.Tensor:
        """Scaled dot-product attention of (B, S, H, D) heads (within each sample of a ``packing``), as (B, S, H * D)."""
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, S, D)
        bias = None if context_bias is None else context_bias.to(q.dtype)
        if packing is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            out = packing.attention(q, k, v, bias, cross=cross)
        return out.transpose(1, 2).flatten(2)


class FeedForward(nn.Module):
    def __init__(self, hidden: int, mult: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(hidden, hidden * mult)
        self.fc2 = nn.Linear(hidden * mult, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class AdaLNModulation(nn.Module):
    """SiLU -> Linear producing ``chunks`` per-channel modulation vectors, computed in fp32."""

    def __init__(self, hidden: int, chunks: int):
        super().__init__()
        self.chunks = chunks
        self.linear = nn.Linear(hidden, chunks * hidden)

    def forward(self, c: torch.Tensor, packing: Packing | None = None) -> tuple[torch.Tensor, ...]:
        """(B, 1, D) vectors per sample, or (1, N, D) per token of a ``packing``."""
        with fp32_region(c.device):
            out = F.linear(F.silu(c.float()), self.linear.weight.float(), self.linear.bias.float())
        return per_token(out, packing).chunk(self.chunks, dim=-1)


class TransformerBlock(nn.Module):
    """Pre-norm adaLN-Zero block: LayerNorm for attention, learned RMSNorm for the MLP.

    With ``cross_attention_dim`` it gains an ungated text cross-attention after the gated
    self-attention residual: ``x + attn2(norm2(x), text)`` with a learned RMSNorm ``norm2``.
    """

    def __init__(self, hidden: int, num_heads: int, head_dim: int, bias: bool = True, cross_attention_dim: int | None = None):
        super().__init__()
        self.norm1 = AdaLNModulation(hidden, 6)
        self.attn1 = Attention(hidden, num_heads, head_dim, bias)
        if cross_attention_dim:
            self.norm2 = nn.RMSNorm(hidden, eps=1e-6)
            self.attn2 = Attention(hidden, num_heads, head_dim, bias, context_dim=cross_attention_dim)
        self.norm3 = nn.RMSNorm(hidden, eps=1e-6)
        self.mlp = FeedForward(hidden)

    def factors(self, c: torch.Tensor, packing: Packing | None = None) -> tuple[torch.Tensor, ...]:
        """The six adaLN vectors with each scale as a factor, in fp32: shift, 1 + scale and gate for attention;
        shift, (1 + scale) * ``norm3.weight`` (the MLP norm's learned weight, folded in) and gate for the MLP."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(c, packing)
        return shift_msa, 1 + scale_msa, gate_msa, shift_mlp, (1 + scale_mlp) * self.norm3.weight.float(), gate_mlp

    def forward(
        self, x: torch.Tensor, c: torch.Tensor | None, rope: RopeTables,
        text: torch.Tensor | None = None, text_bias: torch.Tensor | None = None, packing: Packing | None = None,
        modulation: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        """``modulation``: this block's :meth:`factors` computed ahead from ``c`` (then ``c`` is not read)."""
        modulation = self.factors(c, packing) if modulation is None else modulation
        shift_msa, factor_msa, gate_msa, shift_mlp, factor_mlp, gate_mlp = modulation
        h = modulate(layer_norm(x), shift_msa, factor_msa)
        x = gated_residual(x, gate_msa, self.attn1(as_dtype(h, x.dtype), rope, packing=packing))
        if text is not None:
            x = x + self.attn2(as_dtype(self.norm2(as_dtype(x, torch.float32)), x.dtype), rope, text, text_bias, packing)
        h = modulate(rms_norm(x, self.norm3.eps), shift_mlp, factor_mlp)
        return gated_residual(x, gate_mlp, self.mlp(as_dtype(h, x.dtype)))
