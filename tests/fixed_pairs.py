"""Training losses whose randomness is a function of the sample, not of the batch it lands in.

``cascade_loss`` draws stages, timesteps and noise from one generator per micro-batch, so two
ways of cutting the same global batch (accumulation, DDP) draw differently. Here sample ``i``
always gets stage ``i % K``, the same timestep and the same noise, so per-sample losses and
hence the global-batch gradient are comparable across micro-batch / accumulation / world size.
"""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from pixelflow.cascade import CascadeSchedule
from pixelflow.data.datamodule import ImageDataModule
from pixelflow.training.lit_module import PixelFlowLitModule


def fixed_pair_loss(model: torch.nn.Module, schedule: CascadeSchedule, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean over samples of the cascade MSE, each sample's draws seeded by its id (labels = ids)."""
    losses = []
    for image, i in zip(images, ids.tolist()):
        generator = torch.Generator().manual_seed(1000 + i)
        stage = i % schedule.num_stages
        side = schedule.stage_sides[stage]
        t_index = torch.randint(0, schedule.num_train_timesteps, (1,), generator=generator)
        noise = torch.randn(1, image.shape[0], side, side, generator=generator)
        pair = schedule.training_pair(image[None], stage, t_index, noise=noise)
        pred = model(pair.x_t, pair.timestep, torch.tensor([i]))
        losses.append((pred.float() - pair.target).square().mean())
    return torch.stack(losses).mean()


class FixedPairModule(PixelFlowLitModule):
    """The real module (optimizer, clipping, EMA, accumulation) with :func:`fixed_pair_loss`."""

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return fixed_pair_loss(self.model, self.schedule, images, labels)


class TensorDataModule(ImageDataModule):
    """``n`` random images with labels 0..n-1 (so a label is also the sample id)."""

    def __init__(self, n: int, batch_size: int, image_size: int = 16, seed: int = 0):
        super().__init__(batch_size, image_size, num_classes=n, seed=seed)
        self.n = n

    def build_train_dataset(self) -> TensorDataset:
        images = torch.rand(self.n, 3, self.image_size, self.image_size, generator=torch.Generator().manual_seed(7)) * 2 - 1
        return TensorDataset(images, torch.arange(self.n))


def random_test_model(num_classes: int) -> torch.nn.Module:
    """Test/2 with every weight random (the published init zeroes the output layers)."""
    from pixelflow.model import build_model

    torch.manual_seed(0)
    model = build_model("Test/2", num_classes=num_classes)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model
