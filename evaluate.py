"""Evaluate samples: `python evaluate.py samples=DIR/samples.npz ref=mnist_test` -> DIR/metrics.json + a table.

FID, sFID, Inception Score, precision/recall (ADM protocol, torch-fidelity's InceptionV3), optional KID,
and for MNIST the class accuracy and FID of a small cached classifier. See docs/evaluation.md.
"""

import logging
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from pixelflow.host_memory import keep_freed_memory
from pixelflow.metrics.evaluation import EvalOptions, evaluate, format_table, write_metrics
from pixelflow.metrics.io import EvaluationInputError, load_image_set
from pixelflow.metrics.references import default_num_ref, is_mnist_reference, resolve_reference

log = logging.getLogger("evaluate")


def run(cfg: DictConfig) -> Path:
    """Evaluate per ``cfg`` (conf/evaluate.yaml), write metrics.json, print the table; returns the json path."""
    if not cfg.samples or not cfg.ref:
        raise EvaluationInputError("both samples= and ref= are required, e.g. `python evaluate.py samples=DIR/samples.npz ref=mnist_test`")
    if cfg.classifier not in ("auto", True, False):
        raise EvaluationInputError(f"classifier={cfg.classifier!r}: use auto, true or false")
    if cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    samples_path = Path(cfg.samples).expanduser()
    samples = load_image_set(samples_path, cfg.num_workers)
    ref = resolve_reference(str(cfg.ref), cfg.num_workers)
    opts = EvalOptions(batch_size=cfg.batch_size, device=cfg.device, inception_weights=cfg.inception_weights, cache_dir=cfg.cache_dir,
                       kid=bool(cfg.kid), num_samples=cfg.num_samples, num_ref=default_num_ref(str(cfg.ref), cfg.num_ref),
                       inception=bool(cfg.inception),
                       classifier=is_mnist_reference(str(cfg.ref)) if cfg.classifier == "auto" else bool(cfg.classifier))
    result = evaluate(samples, ref, opts)
    out = Path(cfg.out) if cfg.out else (samples_path if samples_path.is_dir() else samples_path.parent) / "metrics.json"
    write_metrics(result, out)
    print(format_table(result))
    print(f"wrote {out}")
    return out


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    keep_freed_memory()  # CPU feature extraction: no page faults on every large tensor (pixelflow/host_memory.py)
    try:
        run(cfg)
    except (EvaluationInputError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
