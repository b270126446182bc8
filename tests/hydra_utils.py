"""Compose the project's Hydra configs in tests (the same configs the entrypoints use)."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose_config(name: str, overrides: list[str] | None = None) -> DictConfig:
    """Compose ``conf/<name>.yaml`` with overrides, with ``hydra:`` interpolations resolvable."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(name, overrides=overrides or [], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def tiny_train_overrides(run_dir: Path, steps: int, extra: list[str] | None = None) -> list[str]:
    """A seconds-long CPU run (``debug=fast``: the Test/2 model on MNIST, no logger, no evaluation) of ``steps`` steps
    in ``run_dir``, checkpoints every half."""
    return ["debug=fast", f"paths.run_dir={run_dir}", f"trainer.max_steps={steps}",
            f"callbacks.checkpoint.every_n_train_steps={max(steps // 2, 1)}", *(extra or [])]
