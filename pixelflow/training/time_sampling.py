"""Where in each stage training samples its time: the published uniform index, logit-normal or shifted.

Every sampler maps one uniform draw u per sample to a stage-local time tau in [0, 1) (0: the stage's
noisy start), which becomes the index floor(tau N) into the stage's table of N training timesteps, so any
distribution reuses the published pairs and timestep embedding. The published ``uniform`` draws the
index directly (``torch.randint``), as before, so that recipe's draws are unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["Uniform", "LogitNormal", "Shifted", "TIME_SAMPLERS", "TimeSampling", "parse_time_sampler"]


@dataclass(frozen=True)
class Uniform:
    """tau ~ U[0, 1): every timestep index equally often (published)."""

    name = "uniform"

    def times(self, u: torch.Tensor) -> torch.Tensor:
        return u


@dataclass(frozen=True)
class LogitNormal:
    """tau = sigmoid(mean + std z), z ~ N(0, 1) (SD3's logit-normal; mean < 0 leans to the noisy start)."""

    mean: float = 0.0
    std: float = 1.0
    name = "logit_normal"

    def __post_init__(self) -> None:
        if not self.std > 0:
            raise ValueError(f"logit_normal needs std > 0, got {self.std}")

    def times(self, u: torch.Tensor) -> torch.Tensor:
        z = math.sqrt(2.0) * torch.erfinv((2 * u - 1).clamp(-1 + 1e-7, 1 - 1e-7))  # the normal quantile of u
        return torch.sigmoid(self.mean + self.std * z)


@dataclass(frozen=True)
class Shifted:
    """tau = u / (shift + (1 - shift) u): the sampler's ``shift`` time map applied to u (shift > 1: more time
    near the noisy start, as SD3's resolution shift)."""

    shift: float = 3.0
    name = "shifted"

    def __post_init__(self) -> None:
        if not self.shift > 0:
            raise ValueError(f"shifted needs shift > 0, got {self.shift}")

    def times(self, u: torch.Tensor) -> torch.Tensor:
        return u / (self.shift + (1 - self.shift) * u)


TIME_SAMPLERS = {cls.name: cls for cls in (Uniform, LogitNormal, Shifted)}
TimeSampler = Uniform | LogitNormal | Shifted


def parse_time_sampler(value: Any) -> TimeSampler:
    """A sampler from its name or a mapping ``{name: ..., <its parameters>}``."""
    if isinstance(value, (Uniform, LogitNormal, Shifted)):
        return value
    spec = {"name": value} if isinstance(value, str) else dict(value) if isinstance(value, Mapping) else None
    if spec is None or spec.get("name") not in TIME_SAMPLERS:
        raise ValueError(f"time_sampling: expected one of {sorted(TIME_SAMPLERS)} or a mapping such as "
                         f"{{name: logit_normal, mean: 0.0, std: 1.0}} (or a list, one per stage), got {value!r}")
    cls = TIME_SAMPLERS[spec.pop("name")]
    try:
        return cls(**{k: float(v) for k, v in spec.items()})
    except TypeError as err:
        raise ValueError(f"time_sampling {cls.name}: {err}; it takes {sorted(cls.__dataclass_fields__)}") from err


@dataclass(frozen=True)
class TimeSampling:
    """One sampler for every stage, or one per stage."""

    per_stage: tuple[TimeSampler, ...]

    @classmethod
    def parse(cls, value: Any, num_stages: int) -> TimeSampling:
        if isinstance(value, Sequence) and not isinstance(value, str):
            if len(value) != num_stages:
                raise ValueError(f"time_sampling lists {len(value)} samplers but the cascade has {num_stages} stages: "
                                 "give one per stage, or one for every stage")
            return cls(tuple(parse_time_sampler(v) for v in value))
        return cls((parse_time_sampler(value),) * num_stages)

    @property
    def published(self) -> bool:
        return all(isinstance(s, Uniform) for s in self.per_stage)

    def indices(self, stages: torch.Tensor, num_steps: int, generator: torch.Generator | None) -> torch.Tensor:
        """(B,) timestep indices in [0, num_steps) for samples of the given stages (B,)."""
        device = stages.device
        if self.published:
            return torch.randint(0, num_steps, stages.shape, generator=generator, device=device)
        u = torch.rand(stages.shape, generator=generator, device=device, dtype=torch.float64)
        distinct = list(dict.fromkeys(self.per_stage))
        taus = torch.stack([s.times(u) for s in distinct])  # (samplers, B)
        which = torch.tensor([distinct.index(s) for s in self.per_stage], device=device)[stages]
        tau = taus.gather(0, which[None])[0]
        return (tau * num_steps).floor().long().clamp_(0, num_steps - 1)

    def describe(self) -> Any:
        """The settings as plain data (one mapping, or a list of them per stage)."""
        specs = [{"name": s.name, **asdict(s)} for s in self.per_stage]
        return specs[0] if len(set(self.per_stage)) == 1 else specs
