import pytest
import torch

from pixelflow.prediction import PREDICTIONS, SAMPLE_MIN_DIVISOR, TRAIN_MIN_DIVISOR, check_prediction, convert


def _line(t: torch.Tensor):
    """A stage's straight line: start and end points and x_t = t x_end + (1 - t) x_start, t one per sample."""
    g, shape = torch.Generator().manual_seed(0), (len(t), 3, 8, 8)
    x_start, x_end = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    tt = t.view(-1, 1, 1, 1)
    return x_start, x_end, tt * x_end + (1 - tt) * x_start


@pytest.mark.parametrize("source", PREDICTIONS)
@pytest.mark.parametrize("target", PREDICTIONS)
def test_every_conversion_gives_the_exact_quantity_away_from_the_clamps(source, target):
    t = torch.tensor([0.06, 0.3, 0.7, 0.94], dtype=torch.float64)
    x_start, x_end, x_t = _line(t)
    truth = {"v": x_end - x_start, "x": x_end, "eps": x_start}
    out = convert(truth[source], x_t, t, source, target, TRAIN_MIN_DIVISOR)
    torch.testing.assert_close(out, truth[target], rtol=1e-12, atol=1e-12)
    back = convert(out, x_t, t, target, source, TRAIN_MIN_DIVISOR)  # round trip
    torch.testing.assert_close(back, truth[source], rtol=1e-12, atol=1e-12)


def test_same_space_returns_the_tensor_itself():
    x = torch.randn(2, 3, 4, 4)
    assert convert(x, x, 0.5, "x", "x", TRAIN_MIN_DIVISOR) is x


def test_x_to_v_divides_by_the_clamped_distance_to_the_end():
    t = torch.tensor([0.99, 0.5], dtype=torch.float64)
    x_start, x_end, x_t = _line(t)
    v = convert(x_end, x_t, t, "x", "v", TRAIN_MIN_DIVISOR)
    # at t = 0.99 the divisor 0.01 is clamped to 0.05: the velocity is a fifth of x_end - x_start
    torch.testing.assert_close(v[0], (x_end - x_start)[0] * 0.01 / TRAIN_MIN_DIVISOR)
    torch.testing.assert_close(v[1], (x_end - x_start)[1])
    # the sampling clamp only guards t = 1: at 0.99 the conversion is exact
    torch.testing.assert_close(convert(x_end, x_t, t, "x", "v", SAMPLE_MIN_DIVISOR), x_end - x_start)
    assert torch.isfinite(convert(x_end, x_end, 1.0, "x", "v", SAMPLE_MIN_DIVISOR)).all()


def test_unknown_prediction_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"objective.prediction must be one of \('v', 'x', 'eps'\)"):
        check_prediction("noise", "objective.prediction")
