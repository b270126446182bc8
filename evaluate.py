"""Evaluate samples: `python evaluate.py samples=DIR/samples.npz ref=mnist_test` -> DIR/metrics.json + a table.

FID, sFID, Inception Score, precision/recall (ADM protocol, torch-fidelity's InceptionV3; protocol=adm, the
default, uses ADM's float16 distances and IS splits, protocol=exact float32/float64), optional KID and
FD-DINOv2 (dinov2_weights=), and for MNIST the class accuracy and FID of a small cached classifier. See docs/evaluation.md. Progress and
notes come through Python logging, which Hydra's default job logging prints.
"""

import sys

import hydra
from omegaconf import DictConfig

from pixelflow.host_memory import keep_freed_memory
from pixelflow.metrics.evaluation import evaluate_config, format_table
from pixelflow.metrics.io import EvaluationInputError


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    keep_freed_memory()  # CPU feature extraction: no page faults on every large tensor (pixelflow/host_memory.py)
    try:
        result, out = evaluate_config(cfg)
    except (EvaluationInputError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(format_table(result))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
