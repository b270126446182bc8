import math

import pytest
import torch
from torchdiffeq import odeint

from pixelflow.sampling.integrators import STEPPERS, model_calls


def _tiny_field():
    """A smooth nonlinear velocity field v(x, t) = tanh(W x + t b) (a one-layer 'model'), float64."""
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(6, 6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    return lambda t, x: torch.tanh(x @ w.T + t * b)


def _solve(method: str, steps: int, field, x0: torch.Tensor) -> torch.Tensor:
    t = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    calls = []

    def velocity(x, n):
        calls.append(n)
        return field(float(t[n]), x)

    out = STEPPERS[method](x0, velocity, (t[1:] - t[:-1]).tolist())
    assert len(calls) == model_calls(method, steps)
    return out


@pytest.mark.parametrize("method,order", [("ab2", 2), ("euler", 1)])
def test_stepper_converges_at_its_order_against_fine_dopri5(method, order):
    field, x0 = _tiny_field(), torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = odeint(field, x0, torch.tensor([0.0, 1.0], dtype=torch.float64), method="dopri5", rtol=1e-12, atol=1e-12)[-1]
    errors = [(_solve(method, n, field, x0) - ref).abs().max().item() for n in (16, 32, 64, 128)]
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(abs(r - order) < 0.25 for r in rates), (errors, rates)


def test_ab2_on_a_nonuniform_grid_is_exact_for_quadratic_time_dependence():
    """v = t: AB2 with the variable-step coefficients integrates it exactly (x(1) = 1/2) after its Euler start."""
    t = torch.tensor([0.0, 0.1, 0.3, 0.6, 1.0], dtype=torch.float64)
    dts = (t[1:] - t[:-1]).tolist()
    x = STEPPERS["ab2"](torch.zeros(1, dtype=torch.float64), lambda x, n: torch.full_like(x, float(t[n])), dts)
    # Euler over [0, 0.1] misses 0.1^2 / 2; every later AB2 step is exact for a linear-in-t velocity.
    assert x.item() == pytest.approx(0.5 - 0.005, abs=1e-12)
