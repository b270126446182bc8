import pytest
import torch

from pixelflow.cascade import CascadeSchedule
from pixelflow.prediction import PREDICTIONS, SAMPLE_MIN_DIVISOR, TRAIN_MIN_DIVISOR, StageLine, check_prediction, coarse, convert

LINES = [CascadeSchedule(num_stages=4).line(k) for k in range(4)] + [CascadeSchedule(num_stages=1).line(0)]


def _point(line: StageLine, t: torch.Tensor):
    """Clean image c, noise n and the training point x_t = t x_end + (1 - t) x_start of ``line`` (float64)."""
    g, shape = torch.Generator().manual_seed(0), (len(t), 3, 8, 8)
    c, n = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    x_end, x_start = line.end * c + (1 - line.end) * n, line.start * coarse(c) + (1 - line.start) * n
    tt = t.view(-1, 1, 1, 1)
    return c, n, x_end - x_start, tt * x_end + (1 - tt) * x_start


@pytest.mark.parametrize("line", LINES, ids=lambda line: f"[{line.start:.3f},{line.end:.2f}]")
@pytest.mark.parametrize("source", PREDICTIONS)
@pytest.mark.parametrize("target", PREDICTIONS)
def test_every_conversion_gives_the_exact_quantity_away_from_the_clamps(line, source, target):
    """With a clamp far below every divisor (the training clamp is tested below)."""
    t = torch.tensor([0.1, 0.3, 0.7, 0.9], dtype=torch.float64)
    c, n, v, x_t = _point(line, t)
    truth = {"v": v, "x": c, "eps": n}
    out = convert(truth[source], x_t, t, line, source, target, 1e-9)
    torch.testing.assert_close(out, truth[target], rtol=1e-10, atol=1e-10)
    back = convert(out, x_t, t, line, target, source, 1e-9)  # round trip
    torch.testing.assert_close(back, truth[source], rtol=1e-10, atol=1e-10)


def test_same_space_returns_the_tensor_itself():
    x = torch.randn(2, 3, 4, 4)
    assert convert(x, x, 0.5, LINES[1], "x", "x", TRAIN_MIN_DIVISOR) is x


def test_the_noise_divisor_is_clamped_near_the_end_of_the_last_stage():
    """At the last stage x_t holds (1 - t)(1 - s) n: from a clean-image prediction the velocity divides by it."""
    line, t = LINES[3], torch.tensor([0.99, 0.5], dtype=torch.float64)
    c, n, v, x_t = _point(line, t)
    noise_level = (1 - t) * (1 - line.start)
    assert noise_level[0] < TRAIN_MIN_DIVISOR < noise_level[1]
    got = convert(c, x_t, t, line, "x", "v", TRAIN_MIN_DIVISOR)
    torch.testing.assert_close(got[1], v[1])
    # clamped: the implied noise is scaled by noise_level / 0.05, so the velocity's noise term shrinks with it
    shrunk = line.velocity(c[:1], n[:1] * noise_level[0] / TRAIN_MIN_DIVISOR)
    torch.testing.assert_close(got[:1], shrunk)
    # the sampling clamp only guards t = 1: at 0.99 the conversion is exact, at 1 it stays finite
    torch.testing.assert_close(convert(c, x_t, t, line, "x", "v", SAMPLE_MIN_DIVISOR), v)
    assert torch.isfinite(convert(c, c, 1.0, line, "x", "v", SAMPLE_MIN_DIVISOR)).all()


def test_coefficients_of_the_line_sum_to_one():
    for line in LINES:
        a, b, c = line.coefficients(torch.linspace(0, 1, 11, dtype=torch.float64))
        torch.testing.assert_close(a + b + c, torch.ones(11, dtype=torch.float64))


def test_unknown_prediction_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"objective.prediction must be one of \('v', 'x', 'eps'\)"):
        check_prediction("noise", "objective.prediction")
