"""Hydra multirun for training: ``hydra:`` interpolations in the sweep directory (see conf/train.yaml)."""

from __future__ import annotations

from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

__all__ = ["ResolveSweepDir"]


class ResolveSweepDir(Callback):
    """Makes ``${hydra:...}`` resolvable when the sweeper reads ``hydra.sweep.dir`` (Hydra sets it only per job),
    so the sweep directory can follow ``paths.runs_dir`` and ``run_name`` like a single run's directory."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        HydraConfig.instance().set_config(config)
