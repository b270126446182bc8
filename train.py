"""Train PixelFlow. `python train.py` runs the CPU MNIST quickstart; see conf/train.yaml.

Sweeps: `python train.py -m module.lr=1e-3,3e-3 model=tiny,tiny2` trains every combination, each job in its
own run directory ${paths.runs_dir}/${run_name}_multirun/<its overrides> (resumed per job when rerun).
Run notes (resuming, skipped steps, retention) come through Python logging: Hydra's default job logging prints
them and keeps them in the run directory's train.log.
"""

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pixelflow.training.launch import run_training


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode == RunMode.MULTIRUN:  # each job its own run directory, named after its overrides
        cfg.paths.run_dir = hydra_cfg.runtime.output_dir
    run_training(cfg)


if __name__ == "__main__":
    main()
