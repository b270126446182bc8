"""A sampler sweep's report: ``results.csv``, ``results.md`` and plots of every metric.

Plots (``plots/``): ``<metric>_vs_model_calls.png`` (one line per method and any other setting that varies,
points along the step counts) and, where the sweep has more than one guidance scale,
``<metric>_vs_guidance_scale.png`` (one line per step count and any other varying setting).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter  # noqa: E402

from pixelflow.atomic import atomic_save_figure, atomic_write, atomic_write_text

__all__ = ["SETTINGS", "MEASURES", "result_rows", "write_tables", "metric_figure", "plot_results", "write_report"]

SETTINGS = ("method", "steps", "guidance_scale", "shift", "guidance_interval", "num_samples")
MEASURES = ("model_calls_per_image", "seconds_per_image")


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return "[" + ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def result_rows(results: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Metric names (sorted) and one flat row per cell: settings, measures, every metric (None where unavailable)."""
    metrics = sorted({m for r in results for m in r["metrics"]})
    rows = [{**r["settings"], **{k: r[k] for k in MEASURES}, **{m: r["metrics"].get(m) for m in metrics}} for r in results]
    return metrics, rows


def write_tables(out_dir: Path, results: list[dict[str, Any]]) -> tuple[Path, Path]:
    """``results.csv`` and ``results.md``: one row per cell (guidance_interval empty = guidance everywhere)."""
    metrics, rows = result_rows(results)
    columns = [*SETTINGS, *MEASURES, *metrics]
    with atomic_write(out_dir / "results.csv", "w") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        writer.writerows({c: _text(row[c]) if c in SETTINGS else row[c] for c in columns} for row in rows)
    fmt = lambda v: "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_text(row[c]) if c in SETTINGS else fmt(row[c]) for c in columns) + " |" for row in rows]
    atomic_write_text(out_dir / "results.md", "\n".join(lines) + "\n")
    return out_dir / "results.csv", out_dir / "results.md"


def decade_log_axis(ax: Any, values: list[float]) -> None:
    """A log x axis ticked at 1, 2 and 5 times powers of ten, in plain numbers, where ``values`` span a decade."""
    if min(values) > 0 and max(values) >= 10 * min(values):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())


def metric_figure(rows: list[dict[str, Any]], metric: str, x: str, along: str, first: str, xlabel: str) -> Figure | None:
    """``metric`` against ``x``; one line per value of the settings other than ``along`` that vary (``first`` leads).

    An ``x`` spanning a decade or more gets a log axis ticked at 1, 2 and 5 times powers of ten, in plain numbers.
    None where no cell has the metric."""
    varying = [k for k in SETTINGS if k != along and len({_text(r[k]) for r in rows}) > 1]
    keys = [first, *[k for k in varying if k != first]]
    lines: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if row[metric] is not None:
            label = " ".join(f"{k}={_text(row[k]) or 'all'}" if k != "method" else row[k] for k in keys)
            lines.setdefault(label, []).append((float(row[x]), float(row[metric])))
    if not lines:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in lines.items():
        ax.plot(*zip(*sorted(points)), marker="o", label=label)
    decade_log_axis(ax, [float(r[x]) for r in rows])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _plot(rows: list[dict[str, Any]], metric: str, x: str, along: str, first: str, xlabel: str, path: Path) -> Path | None:
    """:func:`metric_figure` saved to ``path``; None (no file) where no cell has the metric."""
    fig = metric_figure(rows, metric, x, along, first, xlabel)
    if fig is None:
        return None
    atomic_save_figure(fig, path)
    plt.close(fig)
    return path


def plot_results(out_dir: Path, results: list[dict[str, Any]]) -> list[Path]:
    """Every metric against model calls per image, and against the guidance scale when the sweep has several."""
    metrics, rows = result_rows(results)
    plots = out_dir / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    paths = []
    several_scales = len({r["guidance_scale"] for r in rows}) > 1
    for metric in metrics:
        paths.append(_plot(rows, metric, "model_calls_per_image", "steps", "method", "model calls per image",
                           plots / f"{metric}_vs_model_calls.png"))
        if several_scales:
            paths.append(_plot(rows, metric, "guidance_scale", "guidance_scale", "steps", "guidance scale",
                               plots / f"{metric}_vs_guidance_scale.png"))
    return [p for p in paths if p is not None]


def write_report(out_dir: str | Path, results: list[dict[str, Any]]) -> list[Path]:
    """Tables and plots of ``results`` in ``out_dir``; returns the paths written."""
    out_dir = Path(out_dir)
    return [*write_tables(out_dir, results), *plot_results(out_dir, results)]
