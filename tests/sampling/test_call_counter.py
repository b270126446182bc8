"""pixelflow.sampling.call_counter: counted network rows agree with the rows the network saw."""

import pytest
import torch

from pixelflow.sampling.call_counter import CallCounter
from pixelflow.sampling.integrators import model_calls
from pixelflow.sampling.samplers import CascadeSampler, SamplerConfig


@pytest.mark.parametrize("config", [SamplerConfig(method="euler", steps=3, guidance_scale=4.0),
                                    SamplerConfig(method="heun", steps=2, guidance_scale=1.0),
                                    SamplerConfig(method="ab2", steps=3, guidance_scale=3.0, guidance_interval=(0.3, 0.7)),
                                    SamplerConfig(method="dopri5", guidance_scale=4.0, rtol=1e-2, atol=1e-3)])
def test_counted_rows_match_the_rows_the_network_saw(tiny_model, tiny_schedule, config):
    seen = []
    tiny_model.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    counter = CallCounter(tiny_model)
    out = CascadeSampler(counter, tiny_schedule, config).sample(torch.tensor([1, 2]), generator=torch.Generator().manual_seed(0))
    assert counter.rows == sum(seen) > 0 and counter.calls == len(seen) == sum(out.nfe)
    if config.method == "euler":  # stage 0 (w = 1) conditional-only: 1 row an image a step; the guided stages 2
        assert counter.rows == 2 * model_calls("euler", 3) * (1 + 3 * 2)


def test_the_wrapper_is_used_in_the_networks_place(tiny_model):
    counter = CallCounter(tiny_model)
    assert (counter.num_classes, counter.null_class, counter.in_channels) == (10, 10, tiny_model.in_channels)
    x = torch.randn(3, 3, 8, 8)
    assert torch.equal(counter(x, torch.full((3,), 10.0), torch.tensor([0, 1, 2])),
                       tiny_model(x, torch.full((3,), 10.0), torch.tensor([0, 1, 2])))
    assert (counter.calls, counter.rows) == (1, 3)  # the direct call above is not counted
    counter.reset()
    assert (counter.calls, counter.rows) == (0, 0)
