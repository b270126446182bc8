"""Cascade maths: stage sizes, rectified windows, timestep tables, training pairs, transitions.

Conventions: stage-local time t in [0, 1], t = 0 noisy, t = 1 data; images in [-1, 1].
Stage k = 0..K-1 works at side ``image_size / 2**(K-1-k)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

from pixelflow.prediction import StageLine

__all__ = ["CascadeSchedule", "TrainingPair", "downsample", "upsample"]

# Published stage-wise guidance ramp for four stages: w_k = 1 + (cfg - 1) * factor_k.
_FOUR_STAGE_CFG_FACTORS = (0.0, 1.0 / 6.0, 2.0 / 3.0, 1.0)


def downsample(x: torch.Tensor, times: int = 1) -> torch.Tensor:
    """Halve the side ``times`` times with bilinear (align_corners=False), i.e. exact 2x2 means."""
    for _ in range(times):
        x = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
    return x


def upsample(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour x2."""
    return F.interpolate(x, scale_factor=2, mode="nearest")


@dataclass
class TrainingPair:
    """One batch of flow-matching training inputs for a single stage."""

    x_t: torch.Tensor  # (B, C, s, s) interpolated input
    target: torch.Tensor  # (B, C, s, s) velocity x_end - x_start
    timestep: torch.Tensor  # (B,) float32 global T
    stage: int
    clean: torch.Tensor  # (B, C, s, s) the clean image at the stage's size
    noise: torch.Tensor  # (B, C, s, s) the noise both ends of the stage share
    t: torch.Tensor  # (B,) stage-local time of x_t, in the images' dtype
    line: StageLine  # the stage's window, for converting between predictions

    def truth(self, prediction: str) -> torch.Tensor:
        """The exact value of what a ``prediction`` network outputs here (:mod:`pixelflow.prediction`)."""
        return {"v": self.target, "x": self.clean, "eps": self.noise}[prediction]


@dataclass(frozen=True)
class CascadeSchedule:
    """Everything about the multi-resolution flow that is not the network."""

    image_size: int = 256
    num_stages: int = 4
    num_train_timesteps: int = 1000
    gamma: float = -1.0 / 3.0

    def __post_init__(self) -> None:
        if self.num_stages < 1:
            raise ValueError(f"num_stages must be >= 1, got {self.num_stages}")
        if self.image_size % 2 ** (self.num_stages - 1):
            raise ValueError(
                f"image_size {self.image_size} is not divisible by 2**(num_stages-1) = {2 ** (self.num_stages - 1)}"
            )
        if not self.gamma < 0:
            raise ValueError(f"gamma must be negative (published: -1/3), got {self.gamma}")

    # ---- geometry and windows ---------------------------------------------------------
    @property
    def stage_sides(self) -> list[int]:
        return [self.image_size // 2 ** (self.num_stages - 1 - k) for k in range(self.num_stages)]

    def rectify_ratio(self, s: float) -> float:
        """1 / (sqrt(1 - 1/gamma) (1 - s) + s): maps the original start to the rectified one."""
        return 1.0 / (math.sqrt(1.0 - 1.0 / self.gamma) * (1.0 - s) + s)

    @property
    def original_starts(self) -> list[float]:
        return [k / self.num_stages for k in range(self.num_stages)]

    @property
    def ends(self) -> list[float]:
        return [(k + 1) / self.num_stages for k in range(self.num_stages)]

    @property
    def starts(self) -> list[float]:
        """Rectified window starts s'_k (s'_0 = 0)."""
        return [s * self.rectify_ratio(s) if k else 0.0 for k, s in enumerate(self.original_starts)]

    def line(self, stage: int) -> StageLine:
        """Stage ``stage``'s window [s'_k, e_k], which relates its velocity, clean image and noise."""
        return StageLine(self.starts[stage], self.ends[stage])

    # ---- global timesteps ---------------------------------------------------------------
    @cached_property
    def boundaries(self) -> list[int]:
        """First global timestep of each stage, plus the final timestep (num_train - 1)."""
        lengths = [e - s for s, e in zip(self.starts, self.ends)]
        total, n = sum(lengths), self.num_train_timesteps
        inner = [math.floor(n * sum(lengths[:j]) / total) for j in range(1, self.num_stages)]
        return [0, *inner, n - 1]

    @cached_property
    @torch.inference_mode(False)  # cached tables stay usable by training after a sampling call
    def timestep_tables(self) -> torch.Tensor:
        """(K, N) float64: global T for stage k and within-stage index i."""
        n, b = self.num_train_timesteps, self.boundaries
        rows = [b[k] + torch.arange(n, dtype=torch.float64) * (b[k + 1] - b[k]) / n for k in range(self.num_stages - 1)]
        rows.append(torch.linspace(b[-2], b[-1], n, dtype=torch.float64))
        return torch.stack(rows)

    def stage_timestep(self, stage: int, t: torch.Tensor | float, t_max: float = 1.0) -> torch.Tensor:
        """Global T at stage-local time t: T_k[0] + t (T_k[-1] - T_k[0]) / t_max."""
        table = self.timestep_tables[stage]
        return table[0] + torch.as_tensor(t, dtype=torch.float64) * (table[-1] - table[0]) / t_max

    # ---- guidance ---------------------------------------------------------------------------
    @property
    def cfg_stage_factors(self) -> list[float]:
        """Published ramp (0, 1/6, 2/3, 1) for four stages; a linear ramp otherwise."""
        if self.num_stages == 4:
            return list(_FOUR_STAGE_CFG_FACTORS)
        if self.num_stages == 1:
            return [1.0]
        return [k / (self.num_stages - 1) for k in range(self.num_stages)]

    def stage_cfg(self, cfg: float, stage: int) -> float:
        """Stage-wise guidance weight w_k = 1 + (cfg - 1) factor_k."""
        return 1.0 + (cfg - 1.0) * self.cfg_stage_factors[stage]

    # ---- training pairs -------------------------------------------------------------------
    def training_pair(
        self, images: torch.Tensor, stage: int, t_index: torch.Tensor, noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> TrainingPair:
        """Flow-matching pair at ``stage`` for full-size ``images`` and per-sample indices ``t_index``."""
        k, down = stage, self.num_stages - 1 - stage
        clean_end = downsample(images, down)
        clean_start = upsample(downsample(clean_end, 1))
        if noise is None:
            noise = torch.randn(clean_end.shape, generator=generator, device=images.device, dtype=images.dtype)
        start, end = self.starts[k], self.ends[k]
        x_end = end * clean_end + (1 - end) * noise
        x_start = start * clean_start + (1 - start) * noise
        tau = (t_index.double() / self.num_train_timesteps).to(images.dtype).view(-1, 1, 1, 1)
        x_t = tau * x_end + (1 - tau) * x_start
        timestep = self.timestep_tables[k].to(images.device)[t_index.long()].float()
        return TrainingPair(x_t=x_t, target=x_end - x_start, timestep=timestep, stage=k, clean=clean_end, noise=noise,
                            t=tau.view(-1), line=self.line(k))

    def balanced_stages(self, batch: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """One stage per sample, every stage equally often (the remainder's stages rotate randomly)."""
        offset = torch.randint(self.num_stages, (1,), generator=generator)
        stages = (torch.arange(batch) + offset) % self.num_stages
        return stages[torch.randperm(batch, generator=generator)]

    # ---- sampling-time transition ---------------------------------------------------------
    def renoise_coefficients(self, stage: int) -> tuple[float, float]:
        """(alpha, beta) for entering ``stage`` >= 1 from the end of stage - 1."""
        s = self.original_starts[stage]
        alpha = self.rectify_ratio(s)
        return alpha, alpha * (1 - s) / math.sqrt(-self.gamma)

    @cached_property
    @torch.inference_mode(False)
    def block_noise_covariance(self) -> torch.Tensor:
        """(4, 4) float32 covariance of one 2x2 block, with the published +1e-6 diagonal jitter."""
        cov = (1 - self.gamma) * torch.eye(4, dtype=torch.float64) + self.gamma * torch.ones(4, 4, dtype=torch.float64)
        return (cov + 1e-6 * torch.eye(4, dtype=torch.float64)).float()

    @cached_property
    @torch.inference_mode(False)
    def block_noise_scale_tril(self) -> torch.Tensor:
        return torch.linalg.cholesky(self.block_noise_covariance)

    def block_noise(
        self, shape: tuple[int, ...], generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Correlated noise (B, C, H, W): independent 2x2 blocks, vector index 2p + q -> pixel (2h+p, 2w+q)."""
        b, c, h, w = shape
        return self.correlate_blocks(torch.randn((b, c, h // 2, w // 2, 4), generator=generator, device=device))

    def correlate_blocks(self, z: torch.Tensor) -> torch.Tensor:
        """Standard normals (B, C, H/2, W/2, 4) -> block-correlated noise (B, C, H, W); see :meth:`block_noise`."""
        b, c, h2, w2, _ = z.shape
        blocks = z @ self.block_noise_scale_tril.to(z.device).T
        return blocks.view(b, c, h2, w2, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(b, c, 2 * h2, 2 * w2)

    def transition(self, x: torch.Tensor, stage: int, noise: torch.Tensor) -> torch.Tensor:
        """Enter ``stage`` from the previous stage's final latent: alpha Up(x) + beta n."""
        alpha, beta = self.renoise_coefficients(stage)
        return alpha * upsample(x) + beta * noise
