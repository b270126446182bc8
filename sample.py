"""Generate samples from a project checkpoint or the released model.pt; see conf/sample.yaml."""

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from lightning.fabric import Fabric
from omegaconf import DictConfig, OmegaConf

from pixelflow.checkpoint import CheckpointError, load_pixelflow
from pixelflow.host_memory import keep_freed_memory
from pixelflow.sampling.choice import choose_sampler
from pixelflow.sampling.generate import generate
from pixelflow.sampling.prompts import prompt_set


@hydra.main(config_path="conf", config_name="sample", version_base="1.3")
def main(cfg: DictConfig) -> None:
    keep_freed_memory()  # CPU sampling: no page faults on every large tensor (pixelflow/host_memory.py)
    try:
        loaded = load_pixelflow(cfg.ckpt, cfg.config, allow_download=cfg.allow_download, ema=cfg.ema)
        sampler, source = choose_sampler(OmegaConf.to_container(cfg.sampler, resolve=True), loaded.sampler,
                                         HydraConfig.get().overrides.task)
    except (ValueError, CheckpointError) as err:
        sys.exit(f"error: {err}")
    logging.getLogger(__name__).info("sampler (%s): %s", source, sampler)
    fabric = Fabric(accelerator=cfg.accelerator, devices=cfg.devices)
    fabric.launch()
    classes = list(cfg.classes) if cfg.classes is not None else None
    try:
        prompts = prompt_set(list(cfg.prompts) if OmegaConf.is_list(cfg.prompts) else cfg.prompts, cfg.prompts_file)
        generate(loaded, sampler, cfg.out_dir, cfg.num_samples, cfg.batch_size, cfg.seed,
                 classes, cfg.save_png, fabric, cfg.precision, cfg.device_memory_gib, prompts, cfg.negative_prompt,
                 cfg.text_encoder, compile=cfg.compile)  # compiled after the memory check; its time logged apart
    except (ValueError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
