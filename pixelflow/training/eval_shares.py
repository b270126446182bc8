"""Sharing a numbered sampling job among the ranks of a training run: who draws which indices, in which batch, and
bringing the images to global rank 0 (for :class:`pixelflow.training.eval_callback.EvaluateSamples`).

The indices 0..N-1 are cut into chunks of the batch and chunk k goes to rank k mod world size, so the chunks
themselves do not depend on the number of ranks: with a given batch every image is computed in the same chunk,
and so bit for bit the same, on one process or many.
"""

from __future__ import annotations

import math

import torch
from lightning.pytorch.strategies import Strategy

__all__ = ["GATHER_BYTES", "free_device_bytes", "balanced_batch", "rank_chunks", "gather_to_rank_zero"]

GATHER_BYTES = 256 * 2**20  # device memory one gather call takes on every rank (all ranks' pieces together)


def free_device_bytes(device: torch.device) -> float | None:
    """Memory sampling can take on ``device`` now, with the training state resident: what the driver has free plus
    what torch's caching allocator holds without a tensor in it (freed activations; it reuses those first).
    None off CUDA, where there is no such figure."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return float(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def balanced_batch(fit: int, num_samples: int, world_size: int) -> int:
    """The batch, at most ``fit``, that draws ``num_samples`` on ``world_size`` ranks in the fewest rounds with the
    chunks as even as they can be (so no rank draws a last, nearly empty round while the others wait)."""
    if fit < 1 or num_samples < 1 or world_size < 1:
        raise ValueError(f"need fit, num_samples and world_size >= 1, got {fit}, {num_samples}, {world_size}")
    share = math.ceil(num_samples / world_size)
    rounds = math.ceil(share / fit)
    return math.ceil(share / rounds)


def rank_chunks(num_samples: int, batch: int, rank: int, world_size: int) -> list[torch.Tensor]:
    """The sample indices ``rank`` draws: 0..N-1 in chunks of ``batch``, chunk k to rank k mod ``world_size``."""
    return list(torch.arange(num_samples).split(batch))[rank::world_size]


def gather_to_rank_zero(strategy: Strategy, local: torch.Tensor, counts: list[int], rank: int) -> torch.Tensor | None:
    """The rows of every rank's ``local``, rank after rank, on global rank 0; None on the others (a collective:
    every rank calls it with its global ``rank``). Rank r holds ``counts[r]`` rows, all of one row shape and dtype. The rows travel in
    pieces of at most :data:`GATHER_BYTES` over all ranks, through the strategy's device (NCCL gathers device
    tensors), so the memory a gather takes stays bounded however many images there are."""
    world = len(counts)
    if len(local) != counts[rank]:
        raise ValueError(f"rank {rank} holds {len(local)} rows but the counts say {counts[rank]}")
    if world == 1:
        return local
    most = max(counts)
    padded = local.new_zeros((most, *local.shape[1:]))
    padded[:len(local)] = local
    row_bytes = max(1, math.prod(local.shape[1:]) * local.element_size())
    rows = max(1, GATHER_BYTES // (world * row_bytes))
    pieces = []
    for start in range(0, most, rows):
        piece = strategy.all_gather(padded[start:start + rows].to(strategy.root_device))  # (world, rows, ...)
        if strategy.is_global_zero:
            pieces.append(piece.cpu())
    if not strategy.is_global_zero:
        return None
    gathered = torch.cat(pieces, dim=1)
    return torch.cat([gathered[rank, :count] for rank, count in enumerate(counts)])
