"""Sampling numbered images: sample i of a run with seed s draws its noise from its own seed, ``s * 10**7 + i``.

So an image never depends on the batch or chunk it was sampled in, and the entrypoints agree: sample i of
``sample.py seed=s``, image i of the training grid or evaluation callback with ``seed: s`` and image #i of a demo
request with seed s start from the same noise (for the same condition and sampler settings, the same image;
Dopri5's step control is batch-wide, so its trajectories also depend on the batch).
:func:`sample_uint8` is the one chunked loop they all run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pixelflow.conditioning import Conditioning
from pixelflow.precision import sampling_precision
from pixelflow.sampling.samplers import CascadeSampler, SampleOutput, to_uint8

__all__ = ["SEED_STRIDE", "sample_seed", "balanced_labels", "sample_indexed", "sample_uint8"]

SEED_STRIDE = 10_000_000  # runs with different seeds draw different noise for indices below this

ConditionOf = Callable[[torch.Tensor], Conditioning | torch.Tensor]  # sample indices -> their condition (one row each)


def sample_seed(seed: int, index: int) -> int:
    """The noise seed of sample ``index`` in a run with seed ``seed``."""
    return int(seed) * SEED_STRIDE + int(index)


def balanced_labels(num_samples: int, classes: list[int]) -> torch.Tensor:
    """Label of every sample index: classes cycled, so counts differ by at most one."""
    return torch.tensor(classes)[torch.arange(num_samples) % len(classes)]


def sample_indexed(sampler: CascadeSampler, condition: Conditioning | torch.Tensor, indices: Sequence[int] | torch.Tensor,
                   seed: int, precision: str = "fp32", on_step: Callable[[int, int, int], None] | None = None) -> SampleOutput:
    """One batch: samples ``indices`` of the run with seed ``seed`` for ``condition`` (a row per index), in
    ``precision`` (:mod:`pixelflow.precision`)."""
    seeds = [sample_seed(seed, i) for i in torch.as_tensor(indices).tolist()]
    with sampling_precision(precision, sampler.device):
        return sampler.sample(condition, seeds=seeds, on_step=on_step)


def sample_uint8(sampler: CascadeSampler, condition_of: ConditionOf, indices: Sequence[int] | torch.Tensor, seed: int,
                 chunk_size: int, precision: str = "fp32") -> torch.Tensor:
    """uint8 NHWC images (on the CPU) of samples ``indices``, ``chunk_size`` at a time; ``condition_of(chunk)`` gives a
    chunk's condition. The chunk size bounds the memory sampling takes and never changes an image."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, got {chunk_size!r}")
    indices = torch.as_tensor(indices, dtype=torch.long)
    if indices.ndim != 1 or not len(indices):
        raise ValueError(f"indices must be a non-empty list of sample indices, got {indices.tolist()!r}")
    return torch.cat([to_uint8(sample_indexed(sampler, condition_of(chunk), chunk, seed, precision).images)
                      for chunk in indices.split(chunk_size)])
