"""Compare training runs: a table of each run's overrides and final metrics, and every metric against the step.

    python scripts/compare_runs.py runs/mnist_quickstart_multirun/* --out docs/ablation

reads each RUN_DIR's ``.hydra/overrides.yaml`` and ``metrics.jsonl`` and writes OUT/runs.csv, OUT/runs.md (one row
per run and EMA rate: overrides, last evaluated step, its metrics) and OUT/<metric>.png (one line per run and EMA
rate); runs that differ only in ``seed=`` are also folded into OUT/seeds.md (mean, spread over seeds, difference
from --baseline and whether it exceeds the spread); pixelflow/training/compare_runs.py does the work.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pixelflow.training.compare_runs import compare_runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, help="run directories (each with metrics.jsonl)")
    parser.add_argument("--out", type=Path, required=True, help="folder for runs.csv, runs.md and <metric>.png")
    parser.add_argument("--baseline", help="the label (overrides without seed=) the seed summary compares against; "
                                           "default the first run's")
    args = parser.parse_args(argv)
    try:
        (csv_path, table), plots = compare_runs(args.run_dirs, args.out, args.baseline)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from err
    print(table.read_text())
    print(f"wrote {csv_path}, {table} and {len(plots)} plot(s) in {args.out}")


if __name__ == "__main__":
    main()
