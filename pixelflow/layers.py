"""The PixelFlow transformer's layers: conditioning embedders, patch embedding, attention, MLP and the adaLN block.

Module and parameter names follow the published layout, so :class:`pixelflow.model.PixelFlowTransformer`
built from them loads the released state_dicts key for key. The conditioning maths (embedders, adaLN
modulations) runs in fp32 even under autocast.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from pixelflow.fused import cpu_inference, linear_gelu_tanh, rms_norm
from pixelflow.packing import Packing, per_token
from pixelflow.precision import as_dtype
from pixelflow.rope import apply_rope

__all__ = ["fp32_region", "sinusoid", "plain_layer_norm", "modulate", "gated_residual", "ScalarEmbedder", "ClassEmbedder", "PatchEmbed",
           "Attention", "FeedForward", "AdaLNModulation", "TransformerBlock"]


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


@lru_cache(maxsize=8)
@torch.inference_mode(False)
def _ones(width: int, device: torch.device) -> torch.Tensor:
    return torch.ones(width, device=device)


def plain_layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last dimension without learned parameters (eps 1e-6), in fp32.

    On the CPU it passes a weight of ones (exact: x * 1): ATen's CPU kernel with a weight runs in about 60%
    of the time of the one without, on this model's shapes.
    """
    x = as_dtype(x, torch.float32)
    weight = _ones(x.shape[-1], x.device) if x.device.type == "cpu" else None
    return F.layer_norm(x, x.shape[-1:], weight, eps=1e-6)


def modulate(normed: torch.Tensor, shift: torch.Tensor, factor: torch.Tensor, *, overwrite: bool = False) -> torch.Tensor:
    """adaLN with its scale as a factor, ``factor`` = 1 + scale: normed * factor + shift, as one fused multiply-add;
    written into ``normed`` with ``overwrite`` where :func:`~pixelflow.fused.cpu_inference` holds (for a fresh
    tensor the caller owns; use the return value)."""
    out = normed if overwrite and cpu_inference(normed) else None
    return torch.addcmul(shift, normed, factor, out=out)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, *, overwrite: bool = False) -> torch.Tensor:
    """x + gate * y in x's dtype: one fused multiply-add where the dtypes agree (no autocast); added into ``x``
    itself with ``overwrite`` where :func:`~pixelflow.fused.cpu_inference` holds (use the return value)."""
    if x.dtype == gate.dtype == y.dtype:
        return x.addcmul_(gate, y) if overwrite and cpu_inference(x) else torch.addcmul(x, gate, y)
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
    """Non-overlapping patch projection; tokens in row-major order."""

    def __init__(self, patch_size: int, in_channels: int, hidden: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if cpu_inference(x):  # the same sums as one matmul over the patches: fewer, faster kernels on the CPU
            # pixel_unshuffle orders a patch's values (channel, row, column), as the flattened kernel is
            patches = F.pixel_unshuffle(x, self.proj.kernel_size[0]).flatten(2).transpose(1, 2)
            return F.linear(patches, self.proj.weight.flatten(1), self.proj.bias)
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
        self, x: torch.Tensor, rope: tuple[torch.Tensor, ...],
        context: torch.Tensor | None = None, context_bias: torch.Tensor | None = None, packing: Packing | None = None,
    ) -> torch.Tensor:
        """The q/k norms take the modules' weights and eps (through :func:`~pixelflow.fused.rms_norm`); on the
        CPU inference path they and the rotation overwrite the fresh projection outputs."""
        def normed(t: torch.Tensor, norm: nn.RMSNorm) -> torch.Tensor:  # in fp32, returned in x's dtype (published)
            return as_dtype(rms_norm(as_dtype(t, torch.float32), norm.weight, norm.eps, overwrite=True), x.dtype)

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(-1, (self.num_heads, self.head_dim))  # (B, S, H, D)

        kv = x if context is None else as_dtype(context, x.dtype)
        q = apply_rope(heads(normed(self.q_proj(x), self.q_norm)), *rope, overwrite=True)
        k = heads(normed(self.k_proj(kv), self.k_norm))
        if context is None:
            k = apply_rope(k, *rope, overwrite=True)
        q, k, v = (t.transpose(1, 2) for t in (q, k, heads(self.v_proj(kv))))  # (B, H, S, D)
        bias = None if context_bias is None else context_bias.to(q.dtype)
        if packing is None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            out = packing.attention(q, k, v, bias, cross=context is not None)
        return self.o_proj(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    def __init__(self, hidden: int, mult: int = 4):
        super().__init__()
        self.fc1 = nn.Linear(hidden, hidden * mult)
        self.fc2 = nn.Linear(hidden * mult, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(linear_gelu_tanh(x, self.fc1))


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
        self, x: torch.Tensor, c: torch.Tensor, rope: tuple[torch.Tensor, ...],
        text: torch.Tensor | None = None, text_bias: torch.Tensor | None = None, packing: Packing | None = None,
        modulation: tuple[torch.Tensor, ...] | None = None, overwrite: bool = False,
    ) -> torch.Tensor:
        """``modulation``: this block's :meth:`factors` computed ahead from ``c`` (then ``c`` is not read).
        ``overwrite``: the residual stream is updated in ``x`` itself on the CPU inference path (for an ``x`` the
        caller no longer needs; use the return value). The block's own temporaries are overwritten there either way."""
        modulation = self.factors(c, packing) if modulation is None else modulation
        shift_msa, factor_msa, gate_msa, shift_mlp, factor_mlp, gate_mlp = modulation
        h = modulate(plain_layer_norm(x), shift_msa, factor_msa, overwrite=True)
        x = gated_residual(x, gate_msa, self.attn1(as_dtype(h, x.dtype), rope, packing=packing), overwrite=overwrite)
        if text is not None:
            x = x + self.attn2(as_dtype(self.norm2(as_dtype(x, torch.float32)), x.dtype), rope, text, text_bias, packing)
        h = modulate(rms_norm(as_dtype(x, torch.float32), None, self.norm3.eps), shift_mlp, factor_mlp, overwrite=True)
        return gated_residual(x, gate_mlp, self.mlp(as_dtype(h, x.dtype)), overwrite=True)
