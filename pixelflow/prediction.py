"""What the network predicts within a stage, and the exact conversions between the three choices.

Within stage k the flow runs on the straight line x_t = t x_end + (1 - t) x_start, stage-local time t in
[0, 1] (t = 1 at the stage's end), so one network output and the point x_t fix the other two:

- ``v``: the velocity x_end - x_start (the published target);
- ``x``: the stage's end point x_end (at the last stage the clean image: JiT's x-prediction);
- ``eps``: the stage's start point x_start (pure noise at stage 0, the renoised upsampled previous stage
  after it): v = (x_t - x_start) / t.

x -> v divides by 1 - t and eps -> v by t. Where that divisor is small the conversion amplifies the
network's error without bound, so it is clamped from below, and differently for the two uses:

- **training** (:data:`TRAIN_MIN_DIVISOR`, JiT's 0.05): the loss of an x-predicting network taken on v is
  ||x_hat - x_end||^2 / max(1 - t, 0.05)^2; the clamp caps that weight near the stage's end;
- **sampling** (:data:`SAMPLE_MIN_DIVISOR`): only a guard for time points on the boundary (Dopri5 evaluates
  t = 1): a clamp as wide as training's would slow every stage's last 5% of time, and the state would stop
  short of the predicted end point.
"""

from __future__ import annotations

import torch

__all__ = ["PREDICTIONS", "TRAIN_MIN_DIVISOR", "SAMPLE_MIN_DIVISOR", "check_prediction", "convert"]

PREDICTIONS = ("v", "x", "eps")
TRAIN_MIN_DIVISOR = 0.05
SAMPLE_MIN_DIVISOR = 1e-3


def check_prediction(value: str, what: str = "prediction") -> str:
    """``value`` if it names one of :data:`PREDICTIONS`, else a ValueError naming the setting."""
    if value not in PREDICTIONS:
        raise ValueError(f"{what} must be one of {PREDICTIONS} (v: velocity x_end - x_start, x: the stage's end point, "
                         f"eps: its start point), got {value!r}")
    return value


def _time(t: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    """Stage-local time as a tensor broadcastable over ``like`` (a scalar, or one per sample)."""
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(-1, *([1] * (like.ndim - 1))) if t.ndim else t


def convert(value: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor | float, source: str, target: str,
            min_divisor: float) -> torch.Tensor:
    """``value``, a ``source`` quantity at the point ``x_t`` and stage-local time ``t``, as the ``target`` one.

    Exact (to float rounding) where the divisor 1 - t (from x) or t (from eps) is at least ``min_divisor``;
    ``source == target`` returns ``value`` itself.
    """
    check_prediction(source, "source")
    check_prediction(target, "target")
    if source == target:
        return value
    t = _time(t, x_t)
    if source == "v":
        v = value
    elif source == "x":
        v = (value - x_t) / (1 - t).clamp_min(min_divisor)
    else:
        v = (x_t - value) / t.clamp_min(min_divisor)
    if target == "v":
        return v
    return x_t + (1 - t) * v if target == "x" else x_t - t * v
