"""Samplers integrate the velocity an x- or eps-predicting network implies, for every method and condition."""

import pytest
import torch
from torch import nn

from pixelflow.cascade import CascadeSchedule
from pixelflow.conditioning import ClassCondition
from pixelflow.model import build_model
from pixelflow.prediction import SAMPLE_MIN_DIVISOR
from pixelflow.sampling.samplers import METHODS, CascadeSampler, SamplerConfig
from pixelflow.text import TextCondition

SCHEDULE = CascadeSchedule(image_size=16, num_stages=4)


def _random(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


@pytest.mark.parametrize("prediction", ["x", "eps"])
def test_guided_velocity_of_an_x_or_eps_network_is_the_formula(prediction):
    model = _random(build_model("Test/2", num_classes=10, prediction=prediction))
    sampler = CascadeSampler(model, SCHEDULE, SamplerConfig(steps=2))
    x, timestep, t, w = torch.randn(3, 3, 8, 8), torch.tensor(400.0), 0.3, 3.0
    labels = torch.tensor([1, 2, 3])
    with torch.no_grad():
        out_u = model(x, timestep.expand(3), class_labels=torch.full((3,), 10))
        out_c = model(x, timestep.expand(3), class_labels=labels)
        guided = out_u + w * (out_c - out_u)
        expected = (guided - x) / (1 - t) if prediction == "x" else (x - guided) / t
        got = sampler.velocity(x, timestep, ClassCondition(labels, 10), w, t=t)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs the stage-local time t"):
        sampler.velocity(x, timestep, ClassCondition(labels, 10), w)


def test_text_to_image_velocity_is_converted_too():
    model = _random(build_model("T2I-Test/2", prediction="x"))
    mask = torch.ones(4, 5, dtype=torch.long)
    text = TextCondition(torch.randn(4, 5, 24, generator=torch.Generator().manual_seed(1)), mask)
    x, timestep = torch.randn(2, 3, 8, 8), torch.tensor(700.0)
    with torch.no_grad():
        out_u = model(x, timestep.expand(2), text_states=text.states[:2], text_mask=mask[:2])
        out_c = model(x, timestep.expand(2), text_states=text.states[2:], text_mask=mask[2:])
        got = CascadeSampler(model, SCHEDULE, SamplerConfig(steps=1)).velocity(x, timestep, text, 2.0, t=0.6)
    torch.testing.assert_close(got, (out_u + 2.0 * (out_c - out_u) - x) / 0.4, rtol=1e-5, atol=1e-5)


class ConstantImageFlow(nn.Module):
    """The exact network of one-stage data that is always the image ``c``: from x_t = t c + (1 - t) n it predicts
    c (``x``), n (``eps``) or c - n (``v``). Its "modulation" is the timestep itself, which gives t."""

    patch_size, in_channels, num_classes, null_class, cross_attention_dim = 2, 3, 2, 2, None

    def __init__(self, c: torch.Tensor, prediction: str, t_max: float):
        super().__init__()
        self.c, self.prediction, self.t_max = c, prediction, t_max
        self.anchor = nn.Parameter(torch.zeros(()))  # the sampler reads the device from the parameters

    def modulations(self, timesteps, grid, class_labels=None, **_):
        return list(timesteps.reshape(-1, 1))

    def forward(self, x, timestep, class_labels=None, modulation=None):
        T = modulation if modulation is not None else timestep
        t = (T.reshape(-1)[0].double() / 999.0 * self.t_max).item()  # one stage: T = 999 t / t_max
        if self.prediction == "x":
            return self.c.expand_as(x)
        noise = (x - t * self.c) / max(1 - t, 1e-3)
        return noise if self.prediction == "eps" else self.c - noise


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("prediction", ["v", "x", "eps"])
def test_every_method_integrates_a_known_flow_to_its_end_point(method, prediction):
    """Each method reaches c from any noise n, whatever the network predicts (Euler's time grid ends at 0.999 and maps
    it to the last timestep: t_max 0.999; the others 1). Dopri5 also evaluates t in (0.999, 1], where the divisor
    1 - t is clamped to SAMPLE_MIN_DIVISOR (and the test network's own): the state moves slower there and stops at
    most SAMPLE_MIN_DIVISOR / 2 |c - n| short of c."""
    schedule = CascadeSchedule(image_size=8, num_stages=1)
    c = torch.linspace(-1, 1, 3 * 64).reshape(1, 3, 8, 8)
    t_max = 0.999 if method in ("euler", "heun") else 1.0
    sampler = CascadeSampler(ConstantImageFlow(c, prediction, t_max), schedule,
                             SamplerConfig(method=method, steps=8, guidance_scale=1.0))
    noise = sampler.draw_noise(2, generator=torch.Generator().manual_seed(0))
    images = sampler.sample(torch.tensor([0, 1]), noise=noise).images
    bound = 1e-4 + (SAMPLE_MIN_DIVISOR / 2 * (c - noise.init).abs().max().item() if method == "dopri5" else 0.0)
    assert (images - c).abs().max().item() <= bound
