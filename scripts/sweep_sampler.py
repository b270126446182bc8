"""Sweep sampler settings: generate and score every combination; see conf/sweep_sampler.yaml.

    python scripts/sweep_sampler.py ckpt=runs/mnist_quickstart/export/model.pt out_dir=sweeps/a ref=mnist_test \
        sampler=quickstart 'axes.method=[euler,heun]' 'axes.steps=[4,8]' 'axes.guidance_scale=[1,5]' num_samples=100

writes DIR/results.csv, DIR/results.md and DIR/plots/*.png; each cell lives in DIR/cells/<settings> and a
rerun skips finished cells (pixelflow/sampling/sweep.py).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from lightning.fabric import Fabric
from omegaconf import DictConfig, OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pixelflow.checkpoint import CheckpointError, load_pixelflow  # noqa: E402
from pixelflow.host_memory import keep_freed_memory  # noqa: E402
from pixelflow.sampling.samplers import SamplerConfig  # noqa: E402
from pixelflow.sampling.sweep import Cell, SweepError, SweepOptions, build_cells, eval_options, reference_scorer, run_sweep  # noqa: E402
from pixelflow.sampling.sweep_report import write_report  # noqa: E402


def run(cfg: DictConfig, on_cell_done: Callable[[Cell, dict], None] | None = None) -> Path:
    """Run the sweep ``cfg`` describes (finishing only missing cells) and write its report; returns out_dir."""
    if not cfg.out_dir or not cfg.ref:
        raise SweepError("both out_dir= and ref= are required, e.g. `python scripts/sweep_sampler.py out_dir=sweeps/a ref=mnist_test`")
    c = OmegaConf.to_container(cfg, resolve=True)
    base = SamplerConfig.from_mapping(c["sampler"])
    loaded = load_pixelflow(c["ckpt"], c["config"], allow_download=c["allow_download"], ema=c["ema"])
    cells = build_cells(base, c["axes"] or {}, c["num_samples"], loaded.schedule.num_stages)
    ref = str(c["ref"])
    evals = eval_options(ref, c["inception"], c["classifier"], c["num_ref"], batch_size=c["eval_batch_size"],
                         device=c["eval_device"], inception_weights=c["inception_weights"], cache_dir=c["cache_dir"],
                         kid=bool(c["kid"]))
    fixed = {"ref": ref, "ema": c["ema"], "inception": evals.inception, "classifier": evals.classifier,
             "num_ref": evals.num_ref, "inception_weights": evals.inception_weights, "kid": evals.kid}
    opts = SweepOptions(batch_size=c["batch_size"], seed=c["seed"], classes=c["classes"], precision=c["precision"],
                        compile=bool(c["compile"]), fixed=fixed)
    fabric = Fabric(accelerator=c["accelerator"], devices=1)
    results = run_sweep(loaded, cells, c["out_dir"], reference_scorer(ref, evals), opts, fabric, on_cell_done)
    paths = write_report(c["out_dir"], results)
    print(paths[1].read_text())
    print(f"wrote {paths[0]}, {paths[1]} and {len(paths) - 2} plot(s) in {Path(c['out_dir']) / 'plots'}")
    return Path(c["out_dir"])


@hydra.main(config_path="../conf", config_name="sweep_sampler", version_base="1.3")
def main(cfg: DictConfig) -> None:
    keep_freed_memory()  # CPU sampling: no page faults on every large tensor (pixelflow/host_memory.py)
    try:
        run(cfg)
    except (ValueError, CheckpointError, FileNotFoundError) as err:  # SweepError, EvaluationInputError, generate's checks
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
