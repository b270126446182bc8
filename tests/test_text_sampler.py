import pytest
import torch

from pixelflow.cascade import CascadeSchedule
from pixelflow.model import build_model
from pixelflow.samplers import CascadeNoise
from pixelflow.text import TextCondition
from pixelflow.text_sampler import guided_velocity, sample_text_euler


def _text(batch: int = 2, length: int = 5) -> TextCondition:
    mask = torch.ones(2 * batch, length, dtype=torch.long)
    mask[:batch, 1:] = 0  # empty prompt: one valid token
    return TextCondition(torch.randn(2 * batch, length, 24), mask)


def test_guided_velocity_is_constant_guidance_over_uncond_and_cond_rows(t2i_model):
    text, x, t = _text(), torch.randn(2, 3, 8, 8), torch.tensor(400.0)
    with torch.no_grad():
        v_u = t2i_model(x, t.expand(2), text_states=text.states[:2], text_mask=text.mask[:2])
        v_c = t2i_model(x, t.expand(2), text_states=text.states[2:], text_mask=text.mask[2:])
        guided = guided_velocity(t2i_model, x, t, text, 3.0)
        assert torch.allclose(guided, v_u + 3.0 * (v_c - v_u), atol=1e-6)
        assert torch.equal(guided_velocity(t2i_model, x, t, text, 1.0), v_c)


def test_sampling_is_seeded_and_follows_the_text(t2i_model):
    schedule, text = CascadeSchedule(image_size=32, num_stages=4), _text()
    run = lambda cond: sample_text_euler(t2i_model, schedule, cond, steps=2, guidance=4.0,  # noqa: E731
                                         generator=torch.Generator().manual_seed(3))
    a, b = run(text), run(text)
    assert torch.equal(a.images, b.images) and a.images.shape == (2, 3, 32, 32) and a.nfe == [2, 2, 2, 2]
    assert [x.shape[-1] for x in a.stage_finals] == [4, 8, 16, 32]
    other = TextCondition(torch.cat([text.states[:2], torch.randn(2, 5, 24)]), text.mask)
    assert (run(other).images - a.images).abs().max() > 1e-3


def test_bad_inputs_are_clear_errors(t2i_model):
    schedule = CascadeSchedule(image_size=32, num_stages=4)
    with pytest.raises(ValueError, match="needs a text-to-image model"):
        sample_text_euler(build_model("Test/2", num_classes=10), schedule, _text())
    noise = CascadeNoise.draw(schedule, 3, 3, False, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="noise is for 3 images but the text condition for 2"):
        sample_text_euler(t2i_model, schedule, _text(), steps=1, noise=noise)
    with pytest.raises(ValueError, match="steps must be 4 positive integers"):
        sample_text_euler(t2i_model, schedule, _text(), steps=[1, 2])
