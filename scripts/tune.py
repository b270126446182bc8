"""Tune the EMA and the sampler together: the sampler sweep for every post-hoc sigma_rel and export; see conf/tune.yaml.

    python scripts/tune.py run=runs/mnist_quickstart 'sigma_rel=[0.05,0.08,0.12]' \
        'exports=[runs/mnist_quickstart/export/model.pt]' out_dir=tune/quickstart ref=mnist_test num_samples=1000

writes DIR/results.csv, DIR/results.md, DIR/plots/*_vs_sigma_rel.png, DIR/best.json and DIR/sampler/tuned.yaml;
each EMA's own sweep (cells, tables, plots) lives in DIR/candidates/<EMA>; a rerun skips finished cells.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from pixelflow.checkpoint import CheckpointError
from pixelflow.host_memory import keep_freed_memory
from pixelflow.sampling.tune import tune_from_config


@hydra.main(config_path="../conf", config_name="tune", version_base="1.3")
def main(cfg: DictConfig) -> None:
    keep_freed_memory()  # CPU sampling: no page faults on every large tensor (pixelflow/host_memory.py)
    try:
        paths = tune_from_config(OmegaConf.to_container(cfg, resolve=True))
    except (ValueError, CheckpointError, FileNotFoundError) as err:  # SweepError, PosthocEMAError, EvaluationInputError
        sys.exit(f"error: {err}")
    print(paths[1].read_text())
    print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
