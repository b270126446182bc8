"""Web demo: `python demo.py` serves the quickstart model on http://127.0.0.1:7860; see conf/demo.yaml and docs/demo.md."""

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pixelflow.demo.app import launch
from pixelflow.host_memory import keep_freed_memory


@hydra.main(config_path="conf", config_name="demo", version_base="1.3")
def main(cfg: DictConfig) -> None:
    keep_freed_memory()  # CPU sampling: no page faults on every large tensor (pixelflow/host_memory.py)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own start-up probes, one line per request
    launch(cfg, HydraConfig.get().overrides.task)  # a named sampler preset wins over a checkpoint's recorded one


if __name__ == "__main__":
    main()
