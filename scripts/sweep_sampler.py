"""Sweep sampler settings: generate and score every combination; see conf/sweep_sampler.yaml.

    python scripts/sweep_sampler.py ckpt=runs/mnist_quickstart/export/model.pt out_dir=sweeps/a ref=mnist_test \
        sampler=quickstart 'axes.method=[euler,heun]' 'axes.steps=[4,8]' 'axes.guidance_scale=[1,5]' num_samples=100

writes DIR/results.csv, DIR/results.md and DIR/plots/*.png; each cell lives in DIR/cells/<settings> and a
rerun skips finished cells (pixelflow/sampling/sweep.py).
"""

from __future__ import annotations

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from pixelflow.checkpoint import CheckpointError
from pixelflow.host_memory import keep_freed_memory
from pixelflow.sampling.sweep import sweep_from_config


@hydra.main(config_path="../conf", config_name="sweep_sampler", version_base="1.3")
def main(cfg: DictConfig) -> None:
    keep_freed_memory()  # CPU sampling: no page faults on every large tensor (pixelflow/host_memory.py)
    try:
        paths = sweep_from_config(OmegaConf.to_container(cfg, resolve=True), sampler_overrides=HydraConfig.get().overrides.task)
    except (ValueError, CheckpointError, FileNotFoundError) as err:  # SweepError, EvaluationInputError, generate's checks
        sys.exit(f"error: {err}")
    print(paths[1].read_text())
    print(f"wrote {paths[0]}, {paths[1]} and {len(paths) - 2} plot(s) in {paths[0].parent / 'plots'}")


if __name__ == "__main__":
    main()
