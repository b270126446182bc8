"""Overlay several sampler sweeps (each a checkpoint) on one plot of a metric against model calls per image.

    python scripts/plot_sweeps.py teacher=docs/sweeps/quickstart_calls student=docs/sweeps/distilled_student \
        --metric classifier_fid --out docs/distillation_calls.png

Each LABEL=DIR reads DIR/results.csv (written by scripts/sweep_sampler.py); every method of a sweep is one
series, labelled "LABEL method". A log axis when the calls span a decade or more.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib.pyplot as plt

from pixelflow.atomic import atomic_save_figure
from pixelflow.sampling.sweep_report import decade_log_axis  # also selects matplotlib's file-only backend


def series(label: str, folder: Path, metric: str) -> dict[str, list[tuple[float, float]]]:
    """``{"LABEL method": [(model calls, metric), ...]}`` from one sweep's results.csv, sorted by calls."""
    path = folder / "results.csv"
    if not path.is_file():
        raise SystemExit(f"error: {path} does not exist: pass a folder written by scripts/sweep_sampler.py")
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    if rows and metric not in rows[0]:
        raise SystemExit(f"error: {path} has no column {metric!r}; its columns: {', '.join(rows[0])}")
    lines: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if row[metric]:
            lines.setdefault(f"{label} {row['method']}", []).append((float(row["model_calls_per_image"]), float(row[metric])))
    return {name: sorted(points) for name, points in lines.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweeps", nargs="+", help="LABEL=DIR, one per sweep")
    parser.add_argument("--metric", default="classifier_fid")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    lines: dict[str, list[tuple[float, float]]] = {}
    for item in args.sweeps:
        label, sep, folder = item.partition("=")
        if not sep:
            raise SystemExit(f"error: {item!r} is not LABEL=DIR (e.g. teacher=docs/sweeps/quickstart_calls)")
        lines |= series(label, Path(folder), args.metric)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, points in lines.items():
        ax.plot(*zip(*points), marker="o", label=name)
    decade_log_axis(ax, [x for points in lines.values() for x, _ in points])
    ax.set_xlabel("model calls (network rows) per image")
    ax.set_ylabel(args.metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_figure(fig, args.out)
    plt.close(fig)
    print(f"wrote {args.out}: {len(lines)} series")


if __name__ == "__main__":
    main()
