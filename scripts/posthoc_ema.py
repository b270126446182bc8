"""Reconstruct post-hoc EMAs of a run (EDM2) and export them; see conf/posthoc_ema.yaml.

    python scripts/posthoc_ema.py run=runs/mnist_quickstart sigma_rel=0.08
    python scripts/posthoc_ema.py run=runs/mnist_quickstart 'sigma_rel=[0.06,0.08,0.12]' step=2000
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from pixelflow.posthoc_reconstruct import PosthocEMAError, export_dir_name, export_reconstruction, reconstruct


@hydra.main(config_path="../conf", config_name="posthoc_ema", version_base="1.3")
def main(cfg: DictConfig) -> None:
    c = OmegaConf.to_container(cfg, resolve=True)
    if not c["run"] or c["sigma_rel"] is None:
        sys.exit("error: run= and sigma_rel= are required, e.g. `python scripts/posthoc_ema.py run=runs/mnist_quickstart sigma_rel=0.08`")
    many = isinstance(c["sigma_rel"], Sequence)
    values = [float(v) for v in c["sigma_rel"]] if many else [float(c["sigma_rel"])]
    try:
        for sigma_rel in values:
            out = c["out_dir"]
            if many and out is not None:
                out = Path(out) / export_dir_name(sigma_rel, reconstruct(c["run"], sigma_rel, c["step"]).step)
            path = export_reconstruction(c["run"], sigma_rel, out, c["step"])
            print(f"sigma_rel {sigma_rel}: {path}")
    except PosthocEMAError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
