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


def gather_to_rank_zero(strategy: Strategy, local: torch.Tensor, positions: list[torch.Tensor],
                        rank: int) -> torch.Tensor | None:
    """One tensor on global rank 0 whose row ``positions[r][i]`` is row i of rank r's ``local``; None on the other
    ranks (a collective: every rank calls it with its global ``rank``). The positions cover 0..total-1 once; all
    rows share one shape and dtype. Rows travel in pieces of at most :data:`GATHER_BYTES` over all ranks, through
    the strategy's device (NCCL gathers device tensors), and land in place: rank 0 holds the result and one piece,
    however many rows there are."""
    counts = [len(p) for p in positions]
    if len(local) != counts[rank]:
        raise ValueError(f"rank {rank} holds {len(local)} rows but its positions name {counts[rank]}")
    world, total, row = len(counts), sum(counts), local.shape[1:]
    if world == 1 and torch.equal(positions[0], torch.arange(total)):
        return local
    out = local.new_empty((total, *row)) if strategy.is_global_zero else None
    if world == 1:  # nothing to gather (and a single-device strategy's all_gather adds no rank dimension)
        out[positions[0]] = local
        return out
    most = max(counts)
    step = min(most, max(1, GATHER_BYTES // (world * max(1, math.prod(row) * local.element_size()))))
    for start in range(0, most, step):
        mine = local[start:start + step]
        padded = local.new_zeros((step, *row))  # every rank sends the same shape
        padded[:len(mine)] = mine
        piece = strategy.all_gather(padded.to(strategy.root_device))  # (world, step, *row)
        if out is None:
            continue
        piece = piece.cpu()
        for source, where in enumerate(positions):
            rows = where[start:start + step]
            out[rows] = piece[source, :len(rows)]
    return out
