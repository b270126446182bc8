"""The sweep report's plots (the tables are checked with the sweep itself, in test_sweep.py)."""

import matplotlib.pyplot as plt

from pixelflow.sampling.sweep_report import metric_figure


def _row(method: str, steps: int, calls: float, fid: float) -> dict:
    return dict(method=method, steps=steps, guidance_scale=5.0, shift=1.0, guidance_interval=None, num_samples=1000,
                model_calls_per_image=calls, seconds_per_image=0.1, classifier_fid=fid)


def test_a_log_axis_over_model_calls_has_plain_labels_that_do_not_overlap():
    # the quickstart sweep's span: 14 to 430 model calls per image
    rows = [_row("euler", n, 14 * n / 4, 60 / n) for n in (4, 6, 8, 12, 16, 24, 32)]
    rows += [_row("heun", n, 27 * n / 4, 100 / n) for n in (4, 8, 16, 40)] + [_row("dopri5", 0, 430.0, 21.0)]
    fig = metric_figure(rows, "classifier_fid", "model_calls_per_image", "steps", "method", "model calls per image")
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    renderer = fig.canvas.get_renderer()
    fig.draw(renderer)
    lo, hi = ax.get_xlim()
    labels = [t for t in ax.xaxis.get_majorticklabels() + ax.xaxis.get_minorticklabels()
              if t.get_visible() and t.get_text() and lo <= t.get_position()[0] <= hi]
    assert [t.get_text() for t in labels] == ["20", "50", "100", "200", "500"]
    boxes = sorted((t.get_window_extent(renderer) for t in labels), key=lambda b: b.x0)
    assert all(left.x1 < right.x0 for left, right in zip(boxes, boxes[1:]))
    plt.close(fig)


def test_no_figure_where_no_cell_has_the_metric():
    rows = [_row("euler", 4, 14.0, 1.0) | {"classifier_fid": None}]
    assert metric_figure(rows, "classifier_fid", "model_calls_per_image", "steps", "method", "model calls") is None
