"""Cascade samplers: Euler (published default), Heun, and adaptive Dopri5 via torchdiffeq.

All randomness is drawn up front into a :class:`CascadeNoise` (from a ``torch.Generator``)
or supplied by the caller, so a seed fully determines the images and golden checks can
inject the published draws.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torchdiffeq import odeint

from pixelflow.cascade import CascadeSchedule

__all__ = ["SamplerConfig", "CascadeNoise", "CascadeSampler", "euler_grid", "to_uint8"]

METHODS = ("euler", "heun", "dopri5")
# The Euler grid stops short of 1 and maps its end to the table's last entry.
_EULER_T_MAX = 0.999


@dataclass
class SamplerConfig:
    """Sampler options. ``steps`` is per stage (an int means the same for every stage).

    ``guidance_interval`` (lo, hi) limits guidance to global progress T / (N - 1) in [lo, hi];
    outside it only the conditional branch runs (w = 1). ``None`` (published) guides everywhere.
    """

    method: str = "euler"
    steps: Sequence[int] | int = 30
    shift: float = 1.0
    cfg: float = 4.0
    guidance_interval: tuple[float, float] | None = None
    atol: float = 1e-6
    rtol: float = 1e-3

    def validate(self, num_stages: int) -> list[int]:
        """Check every value; return the per-stage step counts."""
        if self.method not in METHODS:
            raise ValueError(f"sampler method must be one of {METHODS}, got {self.method!r}")
        steps = [self.steps] * num_stages if isinstance(self.steps, int) else [int(s) for s in self.steps]
        if len(steps) != num_stages or min(steps) < 1:
            raise ValueError(f"steps must be {num_stages} positive integers (one per stage), got {self.steps!r}")
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")
        if not self.cfg >= 1:
            raise ValueError(f"cfg must be >= 1 (1 = no guidance), got {self.cfg}")
        if self.guidance_interval is not None:
            lo, hi = self.guidance_interval
            if not 0 <= lo <= hi <= 1:
                raise ValueError(f"guidance_interval must satisfy 0 <= lo <= hi <= 1, got {self.guidance_interval}")
        return steps


@dataclass
class CascadeNoise:
    """Every random draw of one sampling run: the stage-0 latent and each transition's block noise.

    For Dopri5 the transition noise covers the CFG-doubled state (2B rows), as in the published code.
    """

    init: torch.Tensor
    transitions: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def draw(
        cls, schedule: CascadeSchedule, batch: int, channels: int, doubled: bool,
        generator: torch.Generator | None = None, device: torch.device | str = "cpu",
    ) -> CascadeNoise:
        sides = schedule.stage_sides
        init = torch.randn((batch, channels, sides[0], sides[0]), generator=generator, device=device)
        rows = 2 * batch if doubled else batch
        transitions = [schedule.block_noise((rows, channels, s, s), generator, device) for s in sides[1:]]
        return cls(init, transitions)


    @classmethod
    def per_sample(
        cls, schedule: CascadeSchedule, seeds: Sequence[int], channels: int, doubled: bool,
        device: torch.device | str = "cpu",
    ) -> CascadeNoise:
        """Each sample's draws from its own seed, so an image does not depend on its batch."""
        draws = [cls.draw(schedule, 1, channels, doubled, torch.Generator(device).manual_seed(int(s)), device) for s in seeds]
        init = torch.cat([d.init for d in draws])
        # Doubled transition noise is laid out [rows for x; rows for x'] over the whole batch.
        halves = range(2 if doubled else 1)
        transitions = [torch.cat([d.transitions[k][h:h + 1] for h in halves for d in draws]) for k in range(len(draws[0].transitions))]
        return cls(init, transitions)


def euler_grid(num_steps: int, shift: float) -> torch.Tensor:
    """Stage-local times (N+1,) float64: shifted linspace(0, 0.999, N), then 1.0 appended."""
    u = torch.linspace(0, _EULER_T_MAX, num_steps, dtype=torch.float64)
    t = u / (shift + (1 - shift) * u)
    return torch.cat([t, torch.ones(1, dtype=torch.float64)])


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] NCHW float -> [0, 255] NHWC uint8."""
    return (x / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


@dataclass
class SampleOutput:
    images: torch.Tensor  # (B, C, H, W) float in [-1, 1] (unclamped)
    stage_finals: list[torch.Tensor]  # each stage's final latent (first B rows)
    nfe: list[int]  # batched model calls per stage


class CascadeSampler:
    """Runs the whole cascade for a batch of class labels with stage-wise guidance."""

    def __init__(self, model: torch.nn.Module, schedule: CascadeSchedule, config: SamplerConfig):
        self.model, self.schedule, self.config = model, schedule, config
        self.steps = config.validate(schedule.num_stages)

    # ---- velocity with guidance -------------------------------------------------------
    def _guidance_active(self, timestep: torch.Tensor) -> bool:
        if self.config.guidance_interval is None:
            return True
        lo, hi = self.config.guidance_interval
        progress = float(timestep) / (self.schedule.num_train_timesteps - 1)
        return lo <= progress <= hi

    def velocity(self, x: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor, weight: float) -> torch.Tensor:
        """v_u + w (v_c - v_u) from one batched forward over [null; class]."""
        batch = x.shape[0]
        if not self._guidance_active(timestep):
            return self.model(x, timestep.expand(batch), labels)
        null = torch.full_like(labels, self.model.null_class)
        both = self.model(torch.cat([x, x]), timestep.expand(2 * batch), torch.cat([null, labels]))
        v_uncond, v_cond = both.chunk(2)
        return v_uncond + weight * (v_cond - v_uncond)

    # ---- per-stage integrators ------------------------------------------------------
    def _euler_stage(self, x, stage, labels, weight, on_step):
        t = euler_grid(self.steps[stage], self.config.shift)
        timesteps = self.schedule.stage_timestep(stage, t[:-1], _EULER_T_MAX).float().to(x.device)
        t32 = t.float()
        heun = self.config.method == "heun"
        nfe = 0
        for n in range(len(timesteps)):
            dt = (t32[n + 1] - t32[n]).item()
            v = self.velocity(x, timesteps[n], labels, weight)
            nfe += 1
            last = n == len(timesteps) - 1
            if heun and not last:
                v_next = self.velocity(x + dt * v, timesteps[n + 1], labels, weight)
                nfe += 1
                v = (v + v_next) / 2
            x = x + dt * v
            if on_step is not None:
                on_step(stage, n + 1, len(timesteps))
        return x, nfe

    def _dopri5_stage(self, state, stage, labels, weight, on_step):
        table = self.schedule.timestep_tables[stage]
        t0, t_last = float(table[0]), float(table[-1])
        batch, nfe = labels.shape[0], 0

        def rhs(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            nonlocal nfe
            nfe += 1
            timestep = (t0 + t * (t_last - t0)).float().reshape(1)
            v = self.velocity(y[:batch], timestep, labels, weight)
            return torch.cat([v, v])

        grid = torch.tensor([0.0, 1.0], device=state.device)
        out = odeint(rhs, state, grid, method="dopri5", atol=self.config.atol, rtol=self.config.rtol)[-1]
        if on_step is not None:
            on_step(stage, 1, 1)
        return out, nfe

    # ---- the cascade ----------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        class_labels: torch.Tensor,
        generator: torch.Generator | None = None,
        noise: CascadeNoise | None = None,
        on_stage_end: Callable[[int, torch.Tensor], None] | None = None,
        on_step: Callable[[int, int, int], None] | None = None,
    ) -> SampleOutput:
        """Generate images for ``class_labels`` (B,); draws come from ``noise`` or ``generator``."""
        device = next(self.model.parameters()).device
        labels = class_labels.to(device)
        if labels.numel() and (labels.min() < 0 or labels.max() >= self.model.num_classes):
            raise ValueError(f"class labels must lie in [0, {self.model.num_classes - 1}], got {labels.tolist()}")
        doubled = self.config.method == "dopri5"
        batch = labels.shape[0]
        if noise is None:
            noise = CascadeNoise.draw(self.schedule, batch, self.model.in_channels, doubled, generator, device)
        x = noise.init.to(device)
        if doubled:
            x = torch.cat([x, x])
        finals, nfes = [], []
        for stage in range(self.schedule.num_stages):
            if stage:
                x = self.schedule.transition(x, stage, noise.transitions[stage - 1].to(device))
            weight = self.schedule.stage_cfg(self.config.cfg, stage)
            integrate = self._dopri5_stage if doubled else self._euler_stage
            x, nfe = integrate(x, stage, labels, weight, on_step)
            finals.append(x[:batch])
            nfes.append(nfe)
            if on_stage_end is not None:
                on_stage_end(stage, x[:batch])
        return SampleOutput(images=x[:batch], stage_finals=finals, nfe=nfes)
