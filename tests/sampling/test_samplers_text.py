"""The cascade sampler on a text-to-image model: constant guidance, every method, guidance-skip where w = 1."""

import pytest
import torch

from pixelflow.cascade import CascadeSchedule
from pixelflow.model import build_model
from pixelflow.sampling.samplers import CascadeNoise, CascadeSampler, SamplerConfig
from pixelflow.text import TextCondition
from tests.sampling.test_samplers import check_guidance_skip_against_the_full_computation

SCHEDULE = CascadeSchedule(image_size=32, num_stages=4)


def _text(batch: int = 2, length: int = 5, seed: int = 0) -> TextCondition:
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(2 * batch, length, dtype=torch.long)
    mask[:batch, 1:] = 0  # empty prompt: one valid token
    return TextCondition(torch.randn(2 * batch, length, 24, generator=g), mask)


def _sample(model, text, seed=3, **kw):
    config = SamplerConfig(**{"steps": 2, "guidance_scale": 4.0, **kw})
    return CascadeSampler(model, SCHEDULE, config).sample(text, generator=torch.Generator().manual_seed(seed))


def test_guided_velocity_is_constant_guidance_over_uncond_and_cond_rows(t2i_model):
    text, x, t = _text(), torch.randn(2, 3, 8, 8), torch.tensor(400.0)
    sampler = CascadeSampler(t2i_model, SCHEDULE, SamplerConfig(steps=1))
    with torch.no_grad():
        v_u = t2i_model(x, t.expand(2), text_states=text.states[:2], text_mask=text.mask[:2])
        v_c = t2i_model(x, t.expand(2), text_states=text.states[2:], text_mask=text.mask[2:])
        assert torch.allclose(sampler.velocity(x, t, text, 3.0), v_u + 3.0 * (v_c - v_u), atol=1e-6)
        assert torch.equal(sampler.velocity(x, t, text, 1.0), v_c)
    assert [text.stage_weight(3.0, k, SCHEDULE) for k in range(4)] == [3.0] * 4


@pytest.mark.parametrize("method,calls", [("euler", [2, 2, 2, 2]), ("heun", [3, 3, 3, 3]), ("ab2", [2, 2, 2, 2])])
def test_every_fixed_grid_method_is_seeded_and_follows_the_text(t2i_model, method, calls):
    text = _text()
    a, b = _sample(t2i_model, text, method=method), _sample(t2i_model, text, method=method)
    assert torch.equal(a.images, b.images) and a.images.shape == (2, 3, 32, 32) and a.nfe == calls
    assert [x.shape[-1] for x in a.stage_finals] == [4, 8, 16, 32]
    other = TextCondition(torch.cat([text.states[:2], _text(seed=1).states[2:]]), text.mask)
    assert (_sample(t2i_model, other, method=method).images - a.images).abs().max() > 1e-3


def test_text_guidance_runs_both_branches_at_every_stage_and_skips_them_at_guidance_one(t2i_model):
    rows = []
    t2i_model.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    _sample(t2i_model, _text(batch=3), steps=1, guidance_scale=3.0)
    assert rows == [6, 6, 6, 6]  # no stage ramp for text: stage 0 is guided too
    rows.clear()
    _sample(t2i_model, _text(batch=3), steps=1, guidance_scale=1.0)
    assert rows == [3, 3, 3, 3]


@pytest.mark.parametrize("kw", [dict(guidance_scale=1.0), dict(guidance_scale=3.0, guidance_interval=(0.4, 0.8)),
                                dict(method="heun", guidance_scale=1.0),
                                dict(method="ab2", guidance_scale=3.0, guidance_interval=(0.0, 0.5))])
def test_guidance_skip_matches_the_full_computation_to_float_rounding(t2i_model, kw):
    check_guidance_skip_against_the_full_computation(t2i_model, SCHEDULE, _text(batch=3), 3, SamplerConfig(**{"steps": 3, **kw}))


def test_dopri5_samples_text_on_the_doubled_state(t2i_model):
    text = _text()
    noise = CascadeNoise.draw(SCHEDULE, 2, 3, doubled=True, generator=torch.Generator().manual_seed(0))
    out = CascadeSampler(t2i_model, SCHEDULE, SamplerConfig(method="dopri5", guidance_scale=3.0, atol=0.1, rtol=0.1)).sample(
        text, noise=noise)
    assert out.images.shape == (2, 3, 32, 32) and torch.isfinite(out.images).all()
    assert all(n >= 8 and (n - 2) % 6 == 0 for n in out.nfe)


def test_bad_conditions_are_clear_errors(t2i_model):
    c2i = build_model("Test/2", num_classes=10)
    with pytest.raises(ValueError, match="class-to-image model .* not text"):
        CascadeSampler(c2i, SCHEDULE, SamplerConfig(steps=1)).sample(_text())
    sampler = CascadeSampler(t2i_model, SCHEDULE, SamplerConfig(steps=1))
    with pytest.raises(ValueError, match="text-to-image model: condition it on prompts"):
        sampler.sample(torch.tensor([1, 2]))
    wide = TextCondition(torch.zeros(2, 5, 32), torch.ones(2, 5))
    with pytest.raises(ValueError, match="width 32 but the model's cross_attention_dim is 24"):
        sampler.sample(wide)
    noise = CascadeNoise.draw(SCHEDULE, 3, 3, False, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="noise is for 3 images but the condition for 2"):
        sampler.sample(_text(), noise=noise)
