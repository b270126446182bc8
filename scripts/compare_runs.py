"""Compare training runs: a table of each run's overrides and final metrics, and every metric against the step.

    python scripts/compare_runs.py runs/mnist_quickstart_multirun/* --out docs/ablation

reads each RUN_DIR's ``.hydra/overrides.yaml`` (the command-line overrides) and ``metrics.jsonl`` (evaluations
during training, pixelflow.training.eval_callback) and writes OUT/runs.csv, OUT/runs.md (one row per run and EMA rate:
overrides, last evaluated step, its metrics) and OUT/<metric>.png (one line per run and EMA rate).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from pixelflow.training.eval_callback import read_metrics  # noqa: E402

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


def load_runs(run_dirs: list[Path]) -> list[dict]:
    """One entry per run: directory, overrides, label (the overrides it does not share with all others), records."""
    runs = []
    for run_dir in run_dirs:
        records = read_metrics(run_dir / "metrics.jsonl")
        if not records:
            raise SystemExit(f"error: {run_dir / 'metrics.jsonl'} is missing or empty: train with evaluation on "
                             "(e.g. callbacks/evaluate=mnist_classifier) or pass another run directory")
        runs.append({"dir": run_dir, "overrides": run_overrides(run_dir), "records": records})
    common = set.intersection(*(set(r["overrides"]) for r in runs)) if len(runs) > 1 else set()
    for run in runs:
        run["label"] = _label(run["dir"], run["overrides"], common)
    return runs


def _series(run: dict) -> dict[float | None, list[dict]]:
    """The run's records per EMA rate, by step."""
    by_rate: dict[float | None, list[dict]] = {}
    for record in sorted(run["records"], key=lambda r: r["step"]):
        by_rate.setdefault(record["ema_decay"], []).append(record)
    return by_rate


def final_rows(runs: list[dict]) -> tuple[list[str], list[dict]]:
    """Metric names and one row per (run, EMA rate): its last evaluation."""
    metrics = sorted({m for run in runs for r in run["records"] for m in r["metrics"]})
    rows = []
    for run in runs:
        for rate, records in _series(run).items():
            last = records[-1]
            rows.append({"run": run["label"], "overrides": " ".join(run["overrides"]), "ema": rate, "step": last["step"],
                         **{m: last["metrics"].get(m) for m in metrics}})
    return metrics, rows


def write_tables(out: Path, metrics: list[str], rows: list[dict]) -> None:
    columns = ["run", "overrides", "ema", "step", *metrics]
    with open(out / "runs.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row[c]) for c in columns) + " |" for row in rows]
    (out / "runs.md").write_text("\n".join(lines) + "\n")


def plot_metrics(out: Path, runs: list[dict], metrics: list[str]) -> list[Path]:
    paths = []
    for metric in metrics:
        fig, ax = plt.subplots(figsize=(6, 4))
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
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories (each with metrics.jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="folder for runs.csv, runs.md and <metric>.png")
    args = parser.parse_args(argv)
    runs = load_runs(args.run_dirs)
    args.out.mkdir(parents=True, exist_ok=True)
    metrics, rows = final_rows(runs)
    write_tables(args.out, metrics, rows)
    plots = plot_metrics(args.out, runs, metrics)
    print((args.out / "runs.md").read_text())
    print(f"wrote {args.out / 'runs.csv'}, {args.out / 'runs.md'} and {len(plots)} plot(s) in {args.out}")
    return args.out


if __name__ == "__main__":
    main(sys.argv[1:])
