"""Seconds per optimizer step of each MNIST recipe-ablation row (conf/ablation), measured side by side.

    python scripts/time_recipe_steps.py published x_pred repa single_stage --steps 60 --rounds 3

Each round trains every named row for ``--steps`` optimizer steps in this process (the real Lightning loop:
data, loss, backward, clipping, AdamW, EMA; no logger, checkpoints or evaluation) and takes the median step
time after 10 warm-up steps; rows alternate within a round, so a slow spell of the machine hits them alike.
Prints each row's per-round medians and its ratio to the first row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from pixelflow.training.launch import build_training
from pixelflow.training.step_timer import StepTimer

CONF = Path(__file__).resolve().parents[1] / "conf"


def step_seconds(row: str, steps: int, run_dir: Path) -> float:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", return_hydra_config=True, overrides=[
            f"+ablation={row}", f"trainer.max_steps={steps}", "callbacks=none", "logger=none",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", f"paths.run_dir={run_dir}"])
    HydraConfig.instance().set_config(cfg)  # group choices (callbacks=none) are read from it
    with open_dict(cfg):
        del cfg["hydra"]
    trainer, module, datamodule = build_training(cfg)
    timer = StepTimer(warmup=10)
    trainer.callbacks.append(timer)
    trainer.fit(module, datamodule=datamodule)
    return timer.median()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", nargs="+", help="conf/ablation names; the first is the reference")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = parser.parse_args(argv)
    medians: dict[str, list[float]] = {row: [] for row in args.rows}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for row in args.rows:
                medians[row].append(step_seconds(row, args.steps, Path(tmp) / f"{row}_{r}"))
    reference = statistics.median(medians[args.rows[0]])
    result = {row: {"seconds_per_step": [round(s, 4) for s in values],
                    "ratio_to_" + args.rows[0]: round(statistics.median(values) / reference, 3)}
              for row, values in medians.items()}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
