import pytest
import torch

from pixelflow.cascade import CascadeSchedule
from pixelflow.conditioning import ClassCondition, Conditioning, as_conditioning
from pixelflow.text import TextCondition


def test_class_condition_rows_and_the_published_ramp(tiny_model):
    cond = ClassCondition(torch.tensor([3, 7]), null_class=10)
    assert isinstance(cond, Conditioning) and cond.batch == 2
    assert cond.cond_kwargs()["class_labels"].tolist() == [3, 7]
    assert cond.both_kwargs()["class_labels"].tolist() == [10, 10, 3, 7]
    schedule = CascadeSchedule(image_size=32, num_stages=4)
    assert [cond.stage_weight(3.0, k, schedule) for k in range(4)] == [schedule.stage_cfg(3.0, k) for k in range(4)]
    assert as_conditioning(tiny_model, torch.tensor([1])).both_kwargs()["class_labels"].tolist() == [10, 1]


def test_text_condition_rows():
    text = TextCondition(torch.arange(24.0).reshape(4, 3, 2), torch.tensor([[1, 0, 0]] * 2 + [[1, 1, 0]] * 2))
    assert isinstance(text, Conditioning)
    assert torch.equal(text.cond_kwargs()["text_states"], text.states[2:])
    assert text.cond_kwargs()["text_mask"].tolist() == [[1, 1, 0]] * 2
    assert torch.equal(text.both_kwargs()["text_states"], text.states)


def test_bad_conditions_are_clear_errors(tiny_model):
    with pytest.raises(ValueError, match="1-D integer tensor"):
        ClassCondition(torch.tensor([1.0]), 10)
    with pytest.raises(ValueError, match=r"class labels must lie in \[0, 9\]"):
        as_conditioning(tiny_model, torch.tensor([10]))
    with pytest.raises(TypeError, match="expected class labels or a Conditioning"):
        as_conditioning(tiny_model, [1, 2])
