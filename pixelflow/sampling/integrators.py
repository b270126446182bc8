"""Fixed-grid steppers for one cascade stage of the rectified-flow ODE dx/dt = v(x, t).

A stepper sees the model only through ``velocity(x, n)``: the guided velocity at grid point ``n``.
Step sizes arrive as Python floats computed once per stage, so the loops create no tensors from
Python numbers and never synchronise with the device.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["STEPPERS", "euler", "heun", "ab2", "model_calls"]

Velocity = Callable[[torch.Tensor, int], torch.Tensor]
OnStep = Callable[[int, int], None] | None


def euler(x: torch.Tensor, velocity: Velocity, dts: Sequence[float], on_step: OnStep = None) -> torch.Tensor:
    """x_{n+1} = x_n + h_n v_n: one model call per step (the published sampler)."""
    for n, dt in enumerate(dts):
        x = torch.add(x, velocity(x, n), alpha=dt)
        if on_step is not None:
            on_step(n + 1, len(dts))
    return x


def heun(x: torch.Tensor, velocity: Velocity, dts: Sequence[float], on_step: OnStep = None) -> torch.Tensor:
    """Trapezoidal predictor-corrector; the last step is Euler (grid point N is never evaluated)."""
    for n, dt in enumerate(dts):
        v = velocity(x, n)
        if n < len(dts) - 1:
            v = (v + velocity(x + dt * v, n + 1)) / 2
        x = x + dt * v
        if on_step is not None:
            on_step(n + 1, len(dts))
    return x


def ab2(x: torch.Tensor, velocity: Velocity, dts: Sequence[float], on_step: OnStep = None) -> torch.Tensor:
    """Second-order Adams-Bashforth on a variable grid: one model call per step, order 2.

    x_{n+1} = x_n + h_n ((1 + r/2) v_n - (r/2) v_{n-1}) with r = h_n / h_{n-1}; the first step is Euler.
    This is the velocity-space form of multistep solvers such as DPM-Solver++(2M) for flow models.
    """
    v_prev = None
    for n, dt in enumerate(dts):
        v = velocity(x, n)
        if v_prev is None:
            x = x + dt * v
        else:
            half_r = dt / (2 * dts[n - 1])
            x = x + (dt * (1 + half_r)) * v - (dt * half_r) * v_prev
        v_prev = v
        if on_step is not None:
            on_step(n + 1, len(dts))
    return x


STEPPERS: dict[str, Callable[..., torch.Tensor]] = {"euler": euler, "heun": heun, "ab2": ab2}


def model_calls(method: str, steps: int) -> int:
    """Model calls a fixed-grid stepper makes for ``steps`` steps (Heun: 2N - 1)."""
    return 2 * steps - 1 if method == "heun" else steps
