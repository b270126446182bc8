"""The network's maths with CPU inference kernels, for the forwards :func:`applies` picks.

:class:`~pixelflow.model.PixelFlowTransformer` asks :func:`applies` once per forward; where it holds
(float32 on the CPU, autograd and autocast off, not while ``torch.compile`` traces) the patch embedding,
the blocks and the head's norm run through :func:`patch_embed`, :func:`block` and :func:`final_norm`
here instead of the layers' own forwards. Each kernel is the plain form's maths to float rounding
(``tests/test_cpu_inference.py`` holds the two together, op by op and for whole forwards); they differ in
how they get there:

- Fresh tensors a forward owns are overwritten in place (modulation, residual stream, q/k norms,
  rotation) instead of allocating new ones: without autograd nothing else reads them.
- Every projection through oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``, what inductor's CPU
  backend emits), and linear + tanh-GELU as one such kernel: ATen's tanh-GELU is slow on x86 CPUs, the
  post-op applies it while each output tile is still in cache, and oneDNN's own matmul beats the BLAS
  that ``F.linear`` calls on some CPUs (AMD's among them). Only without autograd (no backward here).
- RMSNorm from one read: ATen's CPU ``rms_norm`` is composite (a squared copy, its mean, two
  products); here one ``vector_norm`` pass gives the sums of squares and one pass scales.
- LayerNorm with a weight of ones (exact: x * 1): ATen's CPU kernel with a weight is the faster one.
- The patch projection as one matmul over patches gathered by ``pixel_unshuffle`` (fewer, faster kernels
  than the convolution on the CPU).
- The rotation as one in-place complex product.

Training, autocast, other devices and compiled graphs (inductor fuses on its own) run the layers' forwards.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from pixelflow.layers import Attention, PatchEmbed, TransformerBlock
from pixelflow.packing import Packing
from pixelflow.precision import as_dtype
from pixelflow.rope import RopeTables, apply_rope, viewable_as_complex

__all__ = ["applies", "patch_embed", "block", "final_norm", "attention",
           "layer_norm", "rms_norm", "modulate_", "rotate_", "linear", "linear_gelu_tanh"]


def applies(x: torch.Tensor) -> bool:
    """Whether a forward on ``x`` takes this module's kernels: float32 on the CPU with autograd and autocast off,
    outside ``torch.compile``."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())


def _linear_pointwise():
    """oneDNN's linear with a fused pointwise post-op, or None where this PyTorch has none."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._linear_pointwise.default
    except (AttributeError, RuntimeError):
        return None


_LINEAR_POINTWISE = _linear_pointwise()


@lru_cache(maxsize=8)
@torch.inference_mode(False)  # a cached table must stay usable outside inference mode
def _ones(width: int, device: torch.device) -> torch.Tensor:
    return torch.ones(width, device=device)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """:func:`pixelflow.layers.layer_norm` (no learned parameters), through ATen's kernel with a weight of ones."""
    return F.layer_norm(x, x.shape[-1:], _ones(x.shape[-1], x.device), eps=1e-6)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, *, in_place: bool) -> torch.Tensor:
    """``F.rms_norm`` over the last dimension: the sums of squares from one ``vector_norm`` read (its root,
    squared), then one scaling pass, written into ``x`` itself with ``in_place`` (use the return value)."""
    mean_square = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1])
    out = torch.mul(x, mean_square.add_(eps).rsqrt_(), out=x if in_place else None)
    return out if weight is None else out.mul_(weight)


def modulate_(normed: torch.Tensor, shift: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """:func:`pixelflow.layers.modulate` written into ``normed``."""
    return torch.addcmul(shift, normed, factor, out=normed)


def rotate_(x: torch.Tensor, rope: RopeTables) -> torch.Tensor:
    """:func:`pixelflow.rope.apply_rope` of float32 ``x``, written into ``x`` itself where its pairs lie aligned
    (any fresh tensor; elsewhere a rotated copy). Use the return value."""
    pairs = x.unflatten(-1, (-1, 2))
    if not viewable_as_complex(pairs):
        return apply_rope(x, rope)
    rotation = rope.rotation.unsqueeze(-2)  # one rotation per token, broadcast over the heads
    torch.view_as_complex(pairs).mul_(rotation)
    return x


def linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``layer(x)`` through oneDNN's linear (``layer`` itself where PyTorch lacks it)."""
    if _LINEAR_POINTWISE is None:
        return layer(x)
    return _LINEAR_POINTWISE(x, layer.weight, layer.bias, "none", [], "")


def linear_gelu_tanh(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    """``gelu(layer(x), approximate="tanh")`` in one oneDNN kernel (the two ATen calls where PyTorch lacks it)."""
    if _LINEAR_POINTWISE is None:
        return F.gelu(layer(x), approximate="tanh")
    return _LINEAR_POINTWISE(x, layer.weight, layer.bias, "gelu", [], "tanh")


def patch_embed(embed: PatchEmbed, x: torch.Tensor) -> torch.Tensor:
    """:class:`~pixelflow.layers.PatchEmbed`'s convolution as one matmul over the gathered patches."""
    # pixel_unshuffle orders a patch's values (channel, row, column), as the flattened kernel is
    first = embed.proj if embed.reduce is None else embed.reduce
    patches = F.pixel_unshuffle(x, first.kernel_size[0]).flatten(2).transpose(1, 2)
    if embed.reduce is not None:
        patches = F.linear(patches, embed.reduce.weight.flatten(1))
    return F.linear(patches, embed.proj.weight.flatten(1), embed.proj.bias)


def attention(
    attn: Attention, x: torch.Tensor, rope: RopeTables,
    context: torch.Tensor | None = None, context_bias: torch.Tensor | None = None, packing: Packing | None = None,
) -> torch.Tensor:
    """:class:`~pixelflow.layers.Attention`'s forward; the q/k norms and the rotation overwrite the fresh projections."""
    kv = x if context is None else as_dtype(context, x.dtype)
    q = rotate_(attn.heads(rms_norm(linear(x, attn.q_proj), attn.q_norm.weight, attn.q_norm.eps, in_place=True)), rope)
    k = attn.heads(rms_norm(linear(kv, attn.k_proj), attn.k_norm.weight, attn.k_norm.eps, in_place=True))
    if context is None:
        k = rotate_(k, rope)
    out = attn.attend(q, k, attn.heads(linear(kv, attn.v_proj)), context_bias, packing, cross=context is not None)
    return linear(out, attn.o_proj)


def block(
    layer: TransformerBlock, x: torch.Tensor, c: torch.Tensor | None, rope: RopeTables,
    text: torch.Tensor | None = None, text_bias: torch.Tensor | None = None, packing: Packing | None = None,
    modulation: tuple[torch.Tensor, ...] | None = None, *, own_stream: bool,
) -> torch.Tensor:
    """:class:`~pixelflow.layers.TransformerBlock`'s forward. ``own_stream``: ``x`` is the caller's to overwrite
    (the residual stream is then updated in it; use the return value). The block's own temporaries are
    overwritten either way, never ``x`` without ``own_stream``."""
    modulation = layer.factors(c, packing) if modulation is None else modulation
    shift_msa, factor_msa, gate_msa, shift_mlp, factor_mlp, gate_mlp = modulation
    y = attention(layer.attn1, modulate_(layer_norm(x), shift_msa, factor_msa), rope, packing=packing)
    x = x.addcmul_(gate_msa, y) if own_stream else torch.addcmul(x, gate_msa, y)
    if text is not None:
        x = x + attention(layer.attn2, layer.norm2(x), rope, text, text_bias, packing)
    h = modulate_(rms_norm(x, None, layer.norm3.eps, in_place=False), shift_mlp, factor_mlp)
    return x.addcmul_(gate_mlp, linear(linear_gelu_tanh(h, layer.mlp.fc1), layer.mlp.fc2))


def final_norm(h: torch.Tensor, shift: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """The head's ``modulate(layer_norm(h), shift, factor)``."""
    return modulate_(layer_norm(h), shift, factor)
