"""What the network predicts within a stage, and the exact conversions between the three choices.

Stage k trains on the straight line x_t = t x_end + (1 - t) x_start (stage-local time t in [0, 1], t = 1 at
the stage's end) between x_end = e c + (1 - e) n and x_start = s U c + (1 - s) n, where c is the clean image
at the stage's size, U = up(down(.)) its coarse copy, n the noise both ends share, and [s, e] the stage's
rectified window (:class:`pixelflow.cascade.CascadeSchedule`; s = 0 at stage 0). Collecting terms,

    x_t = A c + B U c + C n,  A = t e,  B = (1 - t) s,  C = t (1 - e) + (1 - t) (1 - s)   (A + B + C = 1),
    v   = x_end - x_start = e c - s U c - (e - s) n.

The network predicts one of

- ``v``: the velocity (the published target);
- ``x``: the clean image c (JiT's x-prediction, per stage: at the last stage x_end itself);
- ``eps``: the noise n;

and given x_t any one fixes the others. U is a projection (U U = U), so the algebra splits into the block
means (U) and what is left (I - U); from v both c and n follow without any singular divisor. From c the
noise is n = (x_t - A c - B U c) / C, singular where x_t holds no noise (C -> 0: the end of the last stage);
from n the image is c = (I - U) y / A + U y / (A + B) with y = x_t - C n, singular where it holds no signal
(t -> 0). Those divisors are clamped from below, differently for the two uses:

- **training** (:data:`TRAIN_MIN_DIVISOR`, JiT's 0.05): it caps the weight that a v-loss puts on an x- or
  eps-prediction's error where the divisor is small;
- **sampling** (:data:`SAMPLE_MIN_DIVISOR`): only a guard for time points on the boundary (Dopri5 evaluates
  t = 1); a clamp as wide as training's would slow the last steps and stop short of the predicted image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["PREDICTIONS", "TRAIN_MIN_DIVISOR", "SAMPLE_MIN_DIVISOR", "StageLine", "check_prediction", "convert"]

PREDICTIONS = ("v", "x", "eps")
TRAIN_MIN_DIVISOR = 0.05
SAMPLE_MIN_DIVISOR = 1e-3


def check_prediction(value: str, what: str = "prediction") -> str:
    """``value`` if it names one of :data:`PREDICTIONS`, else a ValueError naming the setting."""
    if value not in PREDICTIONS:
        raise ValueError(f"{what} must be one of {PREDICTIONS} (v: the stage's velocity, x: the clean image at the "
                         f"stage's size, eps: the noise), got {value!r}")
    return value


def coarse(x: torch.Tensor) -> torch.Tensor:
    """U x: each 2 x 2 block replaced by its mean (the cascade's down- then nearest up-sampling; a projection)."""
    return F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="nearest")


@dataclass(frozen=True)
class StageLine:
    """One stage's window [start, end] (the rectified s and e; start 0 at stage 0)."""

    start: float
    end: float

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(A, B, C) of x_t = A c + B U c + C n at time ``t``."""
        s, e = self.start, self.end
        return t * e, (1 - t) * s, t * (1 - e) + (1 - t) * (1 - s)

    def velocity(self, clean: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        s, e = self.start, self.end
        v = e * clean - (e - s) * noise
        return v - s * coarse(clean) if s else v

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(U x, (I - U) x); at stage 0 (no coarse term) everything counts as the second part."""
        if not self.start:
            return torch.zeros_like(x), x
        blocks = coarse(x)
        return blocks, x - blocks

    def from_velocity(self, v: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c, n) from the velocity: per part a 2 x 2 system whose determinant is never 0 (-(e - s) and -e (1 - s))."""
        s, e = self.start, self.end
        a, b, c_ = self.coefficients(t)
        (x_r, x_p), (v_r, v_p) = self.split(x_t), self.split(v)
        clean = x_r + c_ * v_r / (e - s) + ((e - s) * x_p + c_ * v_p) / (e * (1 - s))
        noise = x_r - (a + b) * v_r / (e - s) + (e * x_p - a * v_p) / (e * (1 - s))
        return clean, noise

    def noise_from_clean(self, clean: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, min_divisor: float) -> torch.Tensor:
        a, b, c_ = self.coefficients(t)
        signal = a * clean + (b * coarse(clean) if self.start else 0.0)
        return (x_t - signal) / c_.clamp_min(min_divisor)

    def clean_from_noise(self, noise: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, min_divisor: float) -> torch.Tensor:
        a, b, c_ = self.coefficients(t)
        y_r, y_p = self.split(x_t - c_ * noise)
        return y_p / a.clamp_min(min_divisor) + y_r / (a + b).clamp_min(min_divisor)


def _time(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Stage-local time as a tensor broadcastable over ``like`` (a scalar, or one per sample)."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(-1, *([1] * (like.ndim - 1))) if t.ndim else t


def convert(value: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | float, line: StageLine, source: str, target: str,
            min_divisor: float) -> torch.Tensor:
    """``value``, a ``source`` quantity at the point ``x_t`` and stage-local time ``t`` of stage ``line``, as the
    ``target`` one. Exact (to float rounding) where no clamp applies; ``source == target`` returns ``value``."""
    check_prediction(source, "source")
    check_prediction(target, "target")
    if source == target:
        return value
    t = _time(t, x_t)
    if source == "v":
        clean, noise = line.from_velocity(value, x_t, t)
        return clean if target == "x" else noise
    if source == "x":
        clean, noise = value, line.noise_from_clean(value, x_t, t, min_divisor)
    else:
        clean, noise = line.clean_from_noise(value, x_t, t, min_divisor), value
    return line.velocity(clean, noise) if target == "v" else clean if target == "x" else noise
