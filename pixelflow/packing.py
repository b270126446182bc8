"""Several cascade stages in one token sequence, so a training step runs each layer once.

A training batch holds every stage, each at its own resolution (token grids 1x1 ... 8x8 for the
quickstart). Run stage by stage, each layer is called once per stage: at small sizes the step is
then mostly per-operator overhead. Packed, the tokens of every sample of every stage lie end to
end in one (1, N, D) row: the linear layers, norms and modulations see all N tokens at once and
only attention, which must stay within a sample, runs per stage. Each token's result is the
per-stage computation's to float rounding (``tests/test_packing.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Packing", "per_token"]


@dataclass(frozen=True)
class Packing:
    """Segment j holds ``batches[j]`` samples of ``lengths[j]`` tokens each, sample-major; segments follow
    each other in the token row and in the batch (sample) axis alike."""

    batches: tuple[int, ...]
    lengths: tuple[int, ...]
    tokens_per_sample: torch.Tensor  # (B,) int64 on the model's device: lengths[j] repeated batches[j] times

    @classmethod
    def of(cls, batches: tuple[int, ...], lengths: tuple[int, ...], device: torch.device | str = "cpu") -> Packing:
        counts = torch.tensor([s for s, b in zip(lengths, batches) for _ in range(b)], dtype=torch.long, device=device)
        return cls(tuple(batches), tuple(lengths), counts)

    def __post_init__(self) -> None:
        if len(self.batches) != len(self.lengths) or min(self.batches, default=0) < 1 or min(self.lengths, default=0) < 1:
            raise ValueError(f"need one positive batch size and token count per segment, got {self.batches} and {self.lengths}")

    @property
    def tokens(self) -> list[int]:
        """Tokens per segment."""
        return [b * s for b, s in zip(self.batches, self.lengths)]

    def per_token(self, per_sample: torch.Tensor) -> torch.Tensor:
        """(B, F) rows per sample -> (1, N, F) rows per token."""
        return per_sample.repeat_interleave(self.tokens_per_sample, dim=0, output_size=sum(self.tokens))[None]

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None,
                  cross: bool = False) -> torch.Tensor:
        """Scaled dot-product attention within each sample. ``q`` is (1, H, N, d); ``k``/``v`` are packed the
        same way (self-attention) or, with ``cross``, (B, H, L, d) per sample with ``bias`` (B, 1, 1, L)."""
        per_segment = self.batches if cross else self.tokens
        keys, values = k.split(per_segment, dim=0 if cross else 2), v.split(per_segment, dim=0 if cross else 2)
        masks = [None] * len(self.batches) if bias is None else bias.split(self.batches)
        outs = []
        for q_seg, k_seg, v_seg, mask, batch, length in zip(q.split(self.tokens, dim=2), keys, values, masks,
                                                             self.batches, self.lengths):
            if not cross:
                k_seg, v_seg = _per_sample(k_seg, batch, length), _per_sample(v_seg, batch, length)
            out = F.scaled_dot_product_attention(_per_sample(q_seg, batch, length), k_seg, v_seg, attn_mask=mask)
            outs.append(out.transpose(0, 1).flatten(1, 2))  # (H, b*s, d)
        return torch.cat(outs, dim=1)[None]


def per_token(per_sample: torch.Tensor, packing: Packing | None) -> torch.Tensor:
    """(B, F) vectors per sample, ready to broadcast over tokens: (B, 1, F), or (1, N, F) for a ``packing``."""
    return per_sample[:, None, :] if packing is None else packing.per_token(per_sample)


def _per_sample(t: torch.Tensor, batch: int, length: int) -> torch.Tensor:
    """One segment of a packed (1, H, b*s, d) tensor as (b, H, s, d)."""
    return t[0].unflatten(1, (batch, length)).transpose(0, 1)
