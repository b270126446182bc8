import math

import pytest
import torch

from pixelflow.training.time_sampling import LogitNormal, Shifted, TimeSampling, Uniform, parse_time_sampler

N = 1000
DRAWS = 200_000


def _taus(sampling: TimeSampling, stages: torch.Tensor) -> torch.Tensor:
    return (sampling.indices(stages, N, torch.Generator().manual_seed(0)).double() + 0.5) / N


def test_uniform_draws_the_published_index():
    stages = torch.zeros(64, dtype=torch.long)
    got = TimeSampling.parse("uniform", 4).indices(stages, N, torch.Generator().manual_seed(3))
    assert torch.equal(got, torch.randint(0, N, (64,), generator=torch.Generator().manual_seed(3)))


def test_logit_normal_has_its_mean_and_std_in_logit_space():
    tau = _taus(TimeSampling.parse({"name": "logit_normal", "mean": -0.8, "std": 0.8}, 1), torch.zeros(DRAWS, dtype=torch.long))
    logit = torch.log(tau / (1 - tau))
    # the index floors tau to 1/1000: the logit's moments move by far less than the tolerance
    assert logit.mean().item() == pytest.approx(-0.8, abs=0.01)
    assert logit.std().item() == pytest.approx(0.8, abs=0.01)


def test_shifted_matches_its_distribution_function():
    shift = 3.0
    tau = _taus(TimeSampling.parse({"name": "shifted", "shift": shift}, 1), torch.zeros(DRAWS, dtype=torch.long))
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):  # tau = u / (s + (1 - s) u): P(tau <= q) = s q / (1 + (s - 1) q)
        expected = shift * q / (1 + (shift - 1) * q)
        assert (tau <= q).double().mean().item() == pytest.approx(expected, abs=0.005)
    assert tau.mean().item() < 0.5 - 0.1  # shift > 1: more draws near the noisy start


def test_one_sampler_per_stage_goes_to_that_stage_only():
    sampling = TimeSampling.parse(["uniform", {"name": "shifted", "shift": 20.0}], 2)
    stages = torch.arange(DRAWS) % 2
    tau = _taus(sampling, stages)
    assert tau[stages == 0].mean().item() == pytest.approx(0.5, abs=0.01)
    assert tau[stages == 1].mean().item() < 0.2
    assert sampling.describe() == [{"name": "uniform"}, {"name": "shifted", "shift": 20.0}]


def test_samplers_map_uniform_draws_into_the_unit_interval():
    u = torch.linspace(0, 1, 101, dtype=torch.float64)
    for sampler in (Uniform(), LogitNormal(0.0, 1.0), Shifted(3.0)):
        tau = sampler.times(u)
        assert tau.min() >= 0 and tau.max() <= 1 and torch.all(tau[1:] >= tau[:-1]), sampler
    assert LogitNormal(0.0, 1.0).times(torch.tensor([0.5], dtype=torch.float64)).item() == pytest.approx(0.5)
    assert math.isclose(Shifted(1.0).times(torch.tensor([0.3], dtype=torch.float64)).item(), 0.3)


@pytest.mark.parametrize(("value", "message"), [
    ("beta", "expected one of"),
    ({"name": "logit_normal", "std": 0.0}, "std > 0"),
    ({"name": "shifted", "scale": 2.0}, "it takes"),
])
def test_bad_time_sampling_is_refused(value, message):
    with pytest.raises(ValueError, match=message):
        parse_time_sampler(value)


def test_a_per_stage_list_must_have_one_entry_per_stage():
    with pytest.raises(ValueError, match="lists 2 samplers but the cascade has 4 stages"):
        TimeSampling.parse(["uniform", "uniform"], 4)
