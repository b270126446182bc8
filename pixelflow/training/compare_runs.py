"""Comparing training runs: a table of each run's overrides and final metrics, and every metric against the step.

A run is a run directory: its ``.hydra/overrides.yaml`` (the command-line overrides it was started
with) and ``metrics.jsonl`` (evaluations during training, :mod:`pixelflow.training.eval_callback`).
Runs are labelled by the overrides they do not share with all the others, so a sweep's table and
legends show only what was swept. :func:`seed_summary` folds runs that differ only in ``seed=`` into one
row: the mean and spread (max - min) of each metric over the seeds, and whether the difference from a
baseline row exceeds the larger of the two rows' spreads; :func:`plot_seed_summary` draws those rows with
every seed's value, so an ablation that scores each run once still has a picture.
"""

from __future__ import annotations

import csv
import re
import statistics
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from omegaconf import OmegaConf

from pixelflow.atomic import atomic_save_figure
from pixelflow.training.eval_callback import read_metrics

__all__ = ["run_overrides", "load_runs", "final_rows", "write_tables", "plot_metrics", "compare_runs", "seed_summary",
           "write_seed_summary", "plot_seed_summary"]

IGNORED = ("paths.", "trainer.enable_progress_bar", "trainer.enable_model_summary")  # where, not what, a run trains


def run_overrides(run_dir: Path) -> list[str]:
    """The overrides a run was started with (Hydra's ``.hydra/overrides.yaml``), without path settings."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    return [o for o in OmegaConf.to_container(OmegaConf.load(path)) if not o.lstrip("+~").startswith(IGNORED)]


def _label(run_dir: Path, overrides: list[str], common: set[str]) -> str:
    distinct = [o for o in overrides if o not in common]
    return " ".join(distinct) if distinct else run_dir.name


def load_runs(run_dirs: list[Path]) -> list[dict[str, Any]]:
    """One entry per run: directory, overrides, label (the overrides it does not share with all others), records."""
    runs = []
    for run_dir in map(Path, run_dirs):
        records = read_metrics(run_dir / "metrics.jsonl")
        if not records:
            raise ValueError(f"{run_dir / 'metrics.jsonl'} is missing or empty: train with evaluation on "
                             "(e.g. callbacks/evaluate=mnist_classifier) or pass another run directory")
        runs.append({"dir": run_dir, "overrides": run_overrides(run_dir), "records": records})
    common = set.intersection(*(set(r["overrides"]) for r in runs)) if len(runs) > 1 else set()
    for run in runs:
        run["label"] = _label(run["dir"], run["overrides"], common)
    return runs


def _series(run: dict[str, Any]) -> dict[float | None, list[dict]]:
    """The run's records per EMA rate, by step."""
    by_rate: dict[float | None, list[dict]] = {}
    for record in sorted(run["records"], key=lambda r: r["step"]):
        by_rate.setdefault(record["ema_decay"], []).append(record)
    return by_rate


def final_rows(runs: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Metric names and one row per (run, EMA rate): its last evaluation."""
    metrics = sorted({m for run in runs for r in run["records"] for m in r["metrics"]})
    rows = []
    for run in runs:
        for rate, records in _series(run).items():
            last = records[-1]
            rows.append({"run": run["label"], "overrides": " ".join(run["overrides"]), "ema": rate, "step": last["step"],
                         **{m: last["metrics"].get(m) for m in metrics}})
    return metrics, rows


def _cell(value: Any) -> str:
    return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def write_tables(out: Path, metrics: list[str], rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    """``out/runs.csv`` and ``out/runs.md`` (a Markdown table) of ``rows``; returns both paths."""
    columns = ["run", "overrides", "ema", "step", *metrics]
    with open(out / "runs.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    (out / "runs.md").write_text("\n".join(lines) + "\n")
    return out / "runs.csv", out / "runs.md"


def plot_metrics(out: Path, runs: list[dict[str, Any]], metrics: list[str]) -> list[Path]:
    """``out/<metric>.png`` per metric: one line per run and EMA rate against the optimizer step."""
    paths = []
    for metric in metrics:
        fig = Figure(figsize=(6, 4))  # no pyplot: nothing global, no display needed
        ax = fig.subplots()
        for run in runs:
            series = _series(run)
            for rate, records in series.items():
                points = [(r["step"], r["metrics"][metric]) for r in records if metric in r["metrics"]]
                if points:
                    label = run["label"] if len(series) == 1 else f"{run['label']} (EMA {rate})"
                    ax.plot(*zip(*points), marker="o", label=label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / f"{metric}.png")
        atomic_save_figure(fig, paths[-1])
    return paths


_SEED = re.compile(r"(^| )seed=\S+")


def _baseline_entry(summary: list[dict[str, Any]], baseline: str | None) -> dict[str, Any] | None:
    """The summary row labelled ``baseline`` (default the first row; None when there are no rows)."""
    if not baseline:
        return summary[0] if summary else None
    base = next((e for e in summary if e["run"] == baseline), None)
    if base is None:
        raise ValueError(f"baseline {baseline!r} is none of the runs: {sorted({e['run'] for e in summary})}")
    return base


def seed_summary(metrics: list[str], rows: list[dict[str, Any]], baseline: str | None = None) -> list[dict[str, Any]]:
    """One row per group of runs equal but for their ``seed=`` override (and EMA rate): seeds, and per metric the
    mean, the spread max - min, and against the ``baseline`` group (its label; default the first group) the
    difference of means and whether it exceeds the larger spread of the two groups."""
    groups: dict[tuple[str, Any], list[dict[str, Any]]] = {}
    for row in rows:
        label = _SEED.sub("", row["run"]).strip() or "(seed only)"
        groups.setdefault((label, row["ema"]), []).append(row)
    summary = []
    for (label, ema), members in groups.items():
        entry: dict[str, Any] = {"run": label, "ema": ema, "seeds": len(members), "step": min(m["step"] for m in members)}
        for metric in metrics:
            values = [m[metric] for m in members if m.get(metric) is not None]
            entry[f"{metric}_values"] = values
            entry[f"{metric}_mean"] = statistics.fmean(values) if values else None
            entry[f"{metric}_spread"] = max(values) - min(values) if values else None
        summary.append(entry)
    base = _baseline_entry(summary, baseline)
    for entry in summary:
        for metric in metrics:
            mean, spread = entry[f"{metric}_mean"], entry[f"{metric}_spread"]
            if base is None or mean is None or base[f"{metric}_mean"] is None:
                continue
            entry[f"{metric}_diff"] = mean - base[f"{metric}_mean"]
            entry[f"{metric}_beyond_spread"] = abs(entry[f"{metric}_diff"]) > max(spread, base[f"{metric}_spread"])
    return summary


def write_seed_summary(out: Path, metrics: list[str], summary: list[dict[str, Any]]) -> Path:
    """``out/seeds.md``: one row per group of seeds, mean +- half the spread, difference from the baseline."""
    columns = ["run", "seeds", "step", *[f"{m} (mean +- spread/2)" for m in metrics], *[f"{m} vs baseline" for m in metrics]]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for e in summary:
        cells = [e["run"], str(e["seeds"]), str(e["step"])]
        cells += [f"{_cell(e[f'{m}_mean'])} +- {_cell(e[f'{m}_spread'] / 2)}" if e[f"{m}_mean"] is not None else "" for m in metrics]
        cells += [f"{e[f'{m}_diff']:+.4g}{' (beyond spread)' if e[f'{m}_beyond_spread'] else ''}" if f"{m}_diff" in e else ""
                  for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    (out / "seeds.md").write_text("\n".join(lines) + "\n")
    return out / "seeds.md"


def plot_seed_summary(out: Path, metrics: list[str], summary: list[dict[str, Any]], baseline: str | None = None) -> list[Path]:
    """``out/seeds_<metric>.png`` per metric: one line per group of seeds, a dot per seed and a bar at the mean;
    the ``baseline`` group's range (default the first group's) shaded across, so "beyond spread" can be seen."""
    base = _baseline_entry(summary, baseline)
    paths = []
    for metric in metrics:
        entries = [e for e in summary if e[f"{metric}_values"]]
        if not entries:
            continue
        fig = Figure(figsize=(6.5, 0.9 + 0.35 * len(entries)))
        ax = fig.subplots()
        if base is not None and base[f"{metric}_values"]:
            ax.axvspan(min(base[f"{metric}_values"]), max(base[f"{metric}_values"]), color="gray", alpha=0.2,
                       label=f"{base['run']}: seed range")
        for row, entry in enumerate(entries):
            values = entry[f"{metric}_values"]
            ax.plot(values, [row] * len(values), "o", color="tab:blue")
            ax.plot([entry[f"{metric}_mean"]] * 2, [row - 0.3, row + 0.3], color="tab:red")
        ax.set_yticks(range(len(entries)), [e["run"] if len(e["run"]) < 40 else e["run"][:37] + "..." for e in entries],
                      fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(f"{metric} (dots: seeds; bar: mean)")
        ax.grid(alpha=0.3, axis="x")
        if base is not None:
            ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        paths.append(out / f"seeds_{metric}.png")
        atomic_save_figure(fig, paths[-1])
    return paths


def compare_runs(run_dirs: list[Path], out: Path, baseline: str | None = None) -> tuple[tuple[Path, Path], list[Path]]:
    """Write ``out/runs.csv``, ``out/runs.md`` and one plot per metric for ``run_dirs``, and where some runs differ only
    in their seed ``out/seeds.md`` (:func:`seed_summary`) and its plots; returns (tables, plots)."""
    runs = load_runs(run_dirs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics, rows = final_rows(runs)
    summary = seed_summary(metrics, rows, baseline)
    tables = write_tables(out, metrics, rows)
    plots = plot_metrics(out, runs, metrics)
    if any(entry["seeds"] > 1 for entry in summary):
        write_seed_summary(out, metrics, summary)
        plots += plot_seed_summary(out, metrics, summary, baseline)
    return tables, plots
