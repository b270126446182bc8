import pytest
import torch

from pixelflow.golden.sensitivity import (
    PERTURBATIONS,
    SENSITIVITY_MULTIPLE,
    describe_bound,
    nudge_one_ulp,
    nudged_noise,
    rounding_sensitivity,
    sensitivity_bound,
)
from pixelflow.sampling.samplers import CascadeNoise


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nudge_moves_every_entry_to_a_neighbouring_float(dtype):
    x = torch.randn(4000, dtype=dtype)
    y = nudge_one_ulp(x, torch.Generator().manual_seed(0))
    up, down = torch.nextafter(x, torch.tensor(torch.inf, dtype=dtype)), torch.nextafter(x, torch.tensor(-torch.inf, dtype=dtype))
    assert y.dtype == dtype and ((y == up) | (y == down)).all()
    assert 0.4 < (y == up).double().mean() < 0.6  # both directions, about evenly


def test_nudges_are_reproducible_from_the_seed_and_cover_every_draw():
    noise = CascadeNoise(torch.randn(2, 3, 4, 4), [torch.randn(4, 3, 8, 8), torch.randn(4, 3, 16, 16)])
    a, b = (nudged_noise(noise, torch.Generator().manual_seed(7)) for _ in range(2))
    assert torch.equal(a.init, b.init) and all(torch.equal(x, y) for x, y in zip(a.transitions, b.transitions))
    assert (a.init != noise.init).all() and all((x != z).all() for x, z in zip(a.transitions, noise.transitions))


def test_sensitivity_is_the_largest_change_of_each_output():
    """A run that returns its noise scaled by 1000: the change is 1000 x one ulp of the largest-magnitude entries."""
    noise = CascadeNoise(torch.randn(2, 3, 4, 4), [torch.randn(4, 3, 8, 8)])

    def run(n: CascadeNoise) -> list[torch.Tensor]:
        return [1000 * n.init.double(), 1000 * n.transitions[0].double()]

    measured = rounding_sensitivity(run, noise, run(noise))
    for s, x in zip(measured, (noise.init, noise.transitions[0])):
        ulp = (torch.nextafter(x.abs(), torch.tensor(torch.inf)) - x.abs()).double()
        assert 1000 * ulp.min() <= s <= 1000 * ulp.max()
    assert measured == rounding_sensitivity(run, noise, run(noise))  # seeded: the same on every call


def test_sensitivity_needs_a_perturbation():
    noise = CascadeNoise(torch.randn(1, 3, 4, 4))
    with pytest.raises(ValueError, match="perturbations must be >= 1"):
        rounding_sensitivity(lambda n: [n.init], noise, [noise.init], perturbations=0)
    with pytest.raises(TypeError, match="only floating-point noise"):
        nudge_one_ulp(torch.arange(3), torch.Generator())


def test_the_bound_is_the_floor_or_the_multiple_of_the_sensitivity():
    assert sensitivity_bound(2e-3, 1e-4) == 2e-3
    assert sensitivity_bound(2e-3, 1e-3) == SENSITIVITY_MULTIPLE * 1e-3
    text = describe_bound(2e-3)
    assert "max(2.0e-03, 4 x sensitivity)" in text and f"{PERTURBATIONS} random nudges" in text
