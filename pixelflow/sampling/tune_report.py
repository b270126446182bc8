"""A tuning pass's report: every cell of every EMA, the unguided-vs-best-guided summary, metric vs sigma_rel,
and the best settings as a ``conf/sampler``-style preset.

``OUT/results.csv`` / ``OUT/results.md``: one row per (EMA, cell); results.md starts with the summary, one row
per EMA with its cfg = 1 (unguided) cell beside its best guided one, so guidance never hides a worse EMA.
``OUT/plots/<metric>_vs_sigma_rel.png``: one line per guidance scale (and any other setting that varies); the
exports without a sigma_rel appear as dashed horizontal lines. ``OUT/sampler/tuned.yaml``: the best cell's sampler
settings, loadable as ``python sample.py --config-dir OUT sampler=tuned ckpt=<its EMA>`` (the EMA is named in the
file's header and in ``OUT/best.json``).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from pixelflow.atomic import atomic_save_figure, atomic_write, atomic_write_text  # noqa: E402
from pixelflow.metrics.evaluation import write_metrics  # noqa: E402
from pixelflow.sampling.sweep import SweepError  # noqa: E402
from pixelflow.sampling.sweep_report import MEASURES, SETTINGS, metric_figure, result_rows  # noqa: E402

__all__ = ["HIGHER_IS_BETTER", "choose_metric", "best_row", "summary_rows", "write_tune_report", "PRESET_NAME"]

PRESET_NAME = "tuned"
HIGHER_IS_BETTER = ("classifier_accuracy", "inception_score", "precision", "recall")
_PRESET_FIELDS = ("method", "steps", "shift", "guidance_scale", "guidance_interval")


def choose_metric(metric: str, metrics: list[str]) -> str:
    """``auto``: classifier_fid where present (MNIST), else fid; otherwise ``metric``, which must have been scored."""
    if metric == "auto":
        metric = "classifier_fid" if "classifier_fid" in metrics else "fid"
    if metric not in metrics:
        raise SweepError(f"metric={metric!r} was not scored; the cells have {metrics}")
    return metric


def _key(row: dict[str, Any], metric: str) -> float:
    value = row[metric]
    if value is None:
        return float("inf")
    return -value if metric in HIGHER_IS_BETTER else value


def best_row(rows: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    return min(rows, key=lambda r: _key(r, metric))


def summary_rows(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """Per EMA: the best unguided (cfg = 1) cell and the best guided one (None where the sweep has none)."""
    out = []
    for label in dict.fromkeys(r["candidate"] for r in rows):
        mine = [r for r in rows if r["candidate"] == label]
        unguided = [r for r in mine if r["guidance_scale"] == 1]
        guided = [r for r in mine if r["guidance_scale"] != 1]
        out.append({"candidate": label, "sigma_rel": mine[0]["sigma_rel"],
                    "unguided": best_row(unguided, metric) if unguided else None,
                    "guided": best_row(guided, metric) if guided else None})
    return out


def _flat(results: list[dict[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    metrics, rows = result_rows(results)
    for row, result in zip(rows, results, strict=True):
        row.update(candidate=result["candidate"], sigma_rel=result["sigma_rel"], checkpoint=result["checkpoint"])
    return metrics, rows


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ",".join(_cell(v) for v in value) + "]"
    return str(value)


def _write_tables(out: Path, metrics: list[str], rows: list[dict[str, Any]], metric: str) -> tuple[Path, Path]:
    columns = ["candidate", "sigma_rel", *SETTINGS, *MEASURES, *metrics]
    with atomic_write(out / "results.csv", "w") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        writer.writerows({c: _cell(row[c]) for c in columns} for row in rows)
    settings = ("guidance_scale", "guidance_interval", "method", "steps")
    head = ["EMA", "sigma_rel", f"cfg=1 {metric}", *(f"best guided {s}" for s in settings), f"best guided {metric}"]
    others = [m for m in metrics if m != metric]
    lines = [f"Selection metric: {metric} ({'higher' if metric in HIGHER_IS_BETTER else 'lower'} is better); "
             f"other metrics of the same cells in the full table below.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summary_rows(rows, metric):
        unguided, guided = s["unguided"], s["guided"]
        lines.append("| " + " | ".join([s["candidate"], _cell(s["sigma_rel"]), _cell(unguided and unguided[metric]),
                                        *(_cell(guided and guided[k]) for k in settings), _cell(guided and guided[metric])]) + " |")
    full = ["candidate", "sigma_rel", *[k for k in SETTINGS if len({_cell(r[k]) for r in rows}) > 1 or k == "guidance_scale"],
            metric, *others]
    lines += ["", "| " + " | ".join(full) + " |", "|" + "---|" * len(full)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in full) + " |" for row in rows]
    atomic_write_text(out / "results.md", "\n".join(lines) + "\n")
    return out / "results.csv", out / "results.md"


def _plot_sigma_rel(out: Path, metrics: list[str], rows: list[dict[str, Any]]) -> list[Path]:
    tracked = [r for r in rows if r["sigma_rel"] is not None]
    if len({r["sigma_rel"] for r in tracked}) < 2:
        return []
    (out / "plots").mkdir(parents=True, exist_ok=True)
    paths = []
    for metric in metrics:
        fig = metric_figure(tracked, metric, "sigma_rel", "num_samples", "guidance_scale", "sigma_rel (post-hoc EMA)")
        if fig is None:
            continue
        ax = fig.axes[0]
        for row in rows:
            if row["sigma_rel"] is None and row[metric] is not None:
                ax.axhline(row[metric], linestyle="--", linewidth=1, color="gray")
                ax.annotate(f"{row['candidate']} cfg={_cell(row['guidance_scale'])}", (ax.get_xlim()[0], row[metric]),
                            fontsize=7, color="gray", va="bottom")
        path = out / "plots" / f"{metric}_vs_sigma_rel.png"
        atomic_save_figure(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths


def _write_preset(out: Path, best: dict[str, Any], sampler: dict[str, Any], metric: str) -> Path:
    """``OUT/sampler/tuned.yaml``: the best cell's sampler (its swept settings over the base preset's others)."""
    preset = {**sampler, **{k: best[k] for k in _PRESET_FIELDS}}
    header = (f"# Tuned sampler preset: best {metric} = {best[metric]:.6g} over every EMA and cell of this tuning pass,\n"
              f"# with the EMA {best['checkpoint']}\n"
              f"# (sigma_rel {best['sigma_rel']}). Use: python sample.py --config-dir {out.resolve()} sampler={PRESET_NAME} "
              f"ckpt={best['checkpoint']}\n")
    path = out / "sampler" / f"{PRESET_NAME}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, header + OmegaConf.to_yaml(OmegaConf.create(preset)))
    return path


def write_tune_report(out_dir: str | Path, results: list[dict[str, Any]], base_sampler: dict[str, Any],
                      metric: str = "auto") -> list[Path]:
    """Tables, plots, ``sampler/tuned.yaml`` (the best cell's settings over ``base_sampler``'s others) and
    ``best.json`` of a tuning pass; returns the paths written."""
    out = Path(out_dir)
    metrics, rows = _flat(results)
    metric = choose_metric(metric, metrics)
    tables = _write_tables(out, metrics, rows, metric)
    plots = _plot_sigma_rel(out, metrics, rows)
    best = best_row(rows, metric)
    preset = _write_preset(out, best, base_sampler, metric)
    best_json = write_metrics({"metric": metric, "value": best[metric], "checkpoint": best["checkpoint"],
                               "candidate": best["candidate"], "sigma_rel": best["sigma_rel"],
                               "sampler": {k: best[k] for k in _PRESET_FIELDS}, "preset": str(preset)}, out / "best.json")
    return [*tables, *plots, preset, best_json]
