"""Samplers integrate the velocity an x- or eps-predicting network implies, for every method and condition."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pixelflow.cascade import CascadeSchedule
from pixelflow.conditioning import ClassCondition
from pixelflow.model import build_model
from pixelflow.prediction import SAMPLE_MIN_DIVISOR, convert
from pixelflow.sampling.samplers import METHODS, CascadeSampler, SamplerConfig
from pixelflow.text import TextCondition

SCHEDULE = CascadeSchedule(image_size=16, num_stages=4)


def _random(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return model.eval()


class Oracle(nn.Module):
    """Returns a fixed tensor for every row (the conditional and unconditional branches alike)."""

    prediction, patch_size, in_channels, num_classes, null_class, cross_attention_dim = "v", 2, 3, 10, 10, None

    def __init__(self, out: torch.Tensor, prediction: str):
        super().__init__()
        self.out, self.prediction = out, prediction
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, x, timestep, class_labels=None, modulation=None, **_):
        return self.out.repeat(x.shape[0] // self.out.shape[0], 1, 1, 1)


@pytest.mark.parametrize("stage", range(4))
@pytest.mark.parametrize("prediction", ["x", "eps"])
@pytest.mark.parametrize("weight", [1.0, 3.0])
def test_a_network_that_predicts_the_truth_gives_the_true_velocity(stage, prediction, weight):
    """At a point x_t = t x_end + (1 - t) x_start of stage k, a network that outputs the true clean image (or noise)
    makes the sampler integrate the true velocity x_end - x_start, guided or not."""
    g = torch.Generator().manual_seed(stage)
    side = SCHEDULE.stage_sides[stage]
    c, n = torch.randn(2, 3, side, side, generator=g), torch.randn(2, 3, side, side, generator=g)
    s, e, t = SCHEDULE.starts[stage], SCHEDULE.ends[stage], 0.4
    x_end = e * c + (1 - e) * n
    x_start = s * F.interpolate(F.avg_pool2d(c, 2), scale_factor=2, mode="nearest") + (1 - s) * n if stage else n
    x_t = t * x_end + (1 - t) * x_start
    sampler = CascadeSampler(Oracle(c if prediction == "x" else n, prediction), SCHEDULE, SamplerConfig(steps=2))
    got = sampler.velocity(x_t, torch.tensor(400.0), ClassCondition(torch.tensor([1, 2]), 10), weight, t=t, stage=stage)
    torch.testing.assert_close(got, x_end - x_start, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs the stage and the stage-local time"):
        sampler.velocity(x_t, torch.tensor(400.0), ClassCondition(torch.tensor([1, 2]), 10), weight)


@pytest.mark.parametrize("prediction", ["x", "eps"])
def test_guidance_of_a_converted_prediction_is_guidance_of_its_velocities(prediction):
    """The conversion is affine in the output: guiding the output then converting equals guiding the velocities."""
    model = _random(build_model("Test/2", num_classes=10, prediction=prediction))
    sampler = CascadeSampler(model, SCHEDULE, SamplerConfig(steps=2))
    x, timestep, labels = torch.randn(3, 3, 8, 8), torch.tensor(400.0), torch.tensor([1, 2, 3])
    cond = ClassCondition(labels, 10)
    with torch.no_grad():
        guided = sampler.velocity(x, timestep, cond, 3.0, t=0.3, stage=1)
        v_c = sampler.velocity(x, timestep, cond, 1.0, t=0.3, stage=1)
        model_u = CascadeSampler(model, SCHEDULE, SamplerConfig(steps=2))
        v_u = model_u.velocity(x, timestep, ClassCondition(torch.full((3,), 10), 10), 1.0, t=0.3, stage=1)
    torch.testing.assert_close(guided, v_u + 3.0 * (v_c - v_u), rtol=1e-4, atol=1e-4)


def test_text_to_image_velocity_is_converted_too():
    model = _random(build_model("T2I-Test/2", prediction="x"))
    mask = torch.ones(4, 5, dtype=torch.long)
    text = TextCondition(torch.randn(4, 5, 24, generator=torch.Generator().manual_seed(1)), mask)
    x, timestep = torch.randn(2, 3, 8, 8), torch.tensor(700.0)
    line = SCHEDULE.line(1)
    with torch.no_grad():
        out_u = model(x, timestep.expand(2), text_states=text.states[:2], text_mask=mask[:2])
        out_c = model(x, timestep.expand(2), text_states=text.states[2:], text_mask=mask[2:])
        got = CascadeSampler(model, SCHEDULE, SamplerConfig(steps=1)).velocity(x, timestep, text, 2.0, t=0.6, stage=1)
    expected = convert(out_u + 2.0 * (out_c - out_u), x, 0.6, line, "x", "v", SAMPLE_MIN_DIVISOR)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


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
