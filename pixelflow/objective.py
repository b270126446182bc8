"""The cascade flow-matching loss: balanced stages per batch, per-stage sub-batches, per-sample MSE."""

from __future__ import annotations

import torch

from pixelflow.cascade import CascadeSchedule

__all__ = ["cascade_loss"]


def cascade_loss(
    model: torch.nn.Module,
    schedule: CascadeSchedule,
    images: torch.Tensor,
    labels: torch.Tensor,
    generator: torch.Generator | None = None,
    label_dropout: float = 0.0,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Mean over samples of each sample's pixel-mean squared velocity error, and the per-stage means.

    Every sample gets one stage (balanced within the batch) and one index i ~ U{0..N-1}; each
    stage's samples run as one sub-batch at that stage's size, so no work is spent on padding.
    Labels are replaced by the null class with probability ``label_dropout``.
    """
    batch, device = images.shape[0], images.device
    stages = schedule.balanced_stages(batch, generator=_cpu(generator)).to(device)
    t_index = torch.randint(0, schedule.num_train_timesteps, (batch,), generator=generator, device=device)
    if label_dropout > 0:
        drop = torch.rand(batch, generator=generator, device=device) < label_dropout
        labels = torch.where(drop, torch.full_like(labels, model.null_class), labels)
    losses, per_stage = [], {}
    for k in range(schedule.num_stages):
        idx = (stages == k).nonzero(as_tuple=True)[0]
        if idx.numel() == 0:
            continue
        pair = schedule.training_pair(images[idx], k, t_index[idx], generator=generator)
        pred = model(pair.x_t, pair.timestep, labels[idx])
        sample_loss = (pred.float() - pair.target.float()).square().mean(dim=(1, 2, 3))
        losses.append(sample_loss)
        per_stage[k] = sample_loss.detach().mean()
    return torch.cat(losses).mean(), per_stage


def _cpu(generator: torch.Generator | None) -> torch.Generator | None:
    """randperm on CPU needs a CPU generator; derive one deterministically from a device generator."""
    if generator is None or generator.device.type == "cpu":
        return generator
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device)))
