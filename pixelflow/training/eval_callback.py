"""Evaluation during training: sample from the EMA weights at fixed seeds, score with :mod:`pixelflow.metrics`, log.

Every ``every_n_steps`` optimizer steps and at the end, :class:`EvaluateSamples` draws ``num_samples`` images
from each selected EMA with per-sample seeds and balanced labels (:mod:`pixelflow.sampling.indexed`, as ``sample.py`` does),
scores them against ``ref`` with :func:`pixelflow.metrics.evaluation.evaluate` (reference features are cached
there), logs ``eval/<metric>`` to every logger and appends one JSON line per (step, EMA rate) to ``metrics_file``.

Resume: when training starts, lines of steps after the restored step (evaluations of an interrupted run
after its last checkpoint) are dropped, since they will be evaluated again; an evaluation already in
the file is never repeated. So each evaluation is in the file exactly once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only

from pixelflow.atomic import atomic_write_text
from pixelflow.cascade import CascadeSchedule
from pixelflow.metrics.evaluation import EvalOptions, evaluate
from pixelflow.metrics.io import ImageSet, image_set_from_array
from pixelflow.metrics.references import is_mnist_reference, resolve_reference
from pixelflow.sampling.indexed import balanced_labels, sample_uint8
from pixelflow.sampling.samplers import CascadeSampler, SamplerConfig

__all__ = ["EvaluateSamples", "read_metrics"]

logger = logging.getLogger(__name__)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (empty if the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_records(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


class EvaluateSamples(L.Callback):
    """Score samples of the EMA weights every ``every_n_steps`` (0: only at the end) and at the end of training.

    ``ema``: rates to evaluate (each must be in ``module.ema_decays``); null = the first EMA.
    ``sampler``: :class:`~pixelflow.sampling.samplers.SamplerConfig` fields (a ``conf/sampler`` preset), sampling
    ``batch_size`` images at a time in ``precision`` (:mod:`pixelflow.precision`). ``classifier``: the MNIST classifier
    metrics, ``auto`` = for the ``mnist_*`` references. ``inception``: FID / sFID / precision / recall.
    """

    def __init__(self, metrics_file: str, ref: str, every_n_steps: int = 0, num_samples: int = 500, batch_size: int = 100,
                 seed: int = 0, sampler: Mapping[str, Any] | SamplerConfig | None = None, ema: list[float] | None = None,
                 classifier: bool | str = "auto", inception: bool = True, num_ref: int | None = None,
                 cache_dir: str | None = None, device: str = "auto", precision: str = "fp32"):
        if every_n_steps < 0 or num_samples < 2 or batch_size < 1:
            raise ValueError(f"evaluation needs every_n_steps >= 0, num_samples >= 2 and batch_size >= 1; got {every_n_steps}, "
                             f"{num_samples}, {batch_size}")
        if classifier not in ("auto", True, False):
            raise ValueError(f"classifier={classifier!r}: use auto, true or false")
        self.metrics_file, self.ref_spec, self.every_n_steps = Path(metrics_file), str(ref), every_n_steps
        self.num_samples, self.batch_size, self.seed, self.precision = num_samples, batch_size, seed, precision
        self.config = SamplerConfig.from_mapping(sampler or {}, "callbacks.evaluate.sampler")
        self.ema = None if ema is None else [float(r) for r in ema]
        self.options = EvalOptions(batch_size=batch_size, device=device, cache_dir=cache_dir, num_ref=num_ref, inception=inception,
                                   classifier=is_mnist_reference(self.ref_spec) if classifier == "auto" else bool(classifier))
        self._ref: ImageSet | None = None
        self._last_step = -1

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Check every setting before the first step, so a typo fails now and not after hours of training."""
        if pl_module.model.cross_attention_dim:
            raise ValueError("callbacks.evaluate samples class labels and cannot drive a text-to-image model: drop it "
                             "(callbacks/evaluate=null); score text-to-image samples with sample.py prompts and evaluate.py")
        self.config.stage_steps(pl_module.schedule.num_stages)
        for rate in self.ema or []:
            pl_module.ema_model(rate)
        if not (self.options.inception or self.options.classifier):
            raise ValueError("callbacks.evaluate: inception=false and classifier=false leave no metric; enable one")
        if trainer.is_global_zero:
            self._ref = resolve_reference(self.ref_spec)

    @rank_zero_only
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        records = read_metrics(self.metrics_file)
        kept = [r for r in records if r["step"] <= trainer.global_step]
        if len(kept) < len(records):
            logger.info("resuming at step %d: dropped %d evaluation(s) of later steps from %s; they are evaluated again "
                        "when training gets there", trainer.global_step, len(records) - len(kept), self.metrics_file)
            _write_records(self.metrics_file, kept)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step  # optimizer steps: 0 until the first one, through every accumulated micro-batch
        if self.every_n_steps and step and step % self.every_n_steps == 0 and step != self._last_step:
            self._last_step = step
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.evaluate(trainer, pl_module)

    def _rates(self, pl_module: L.LightningModule) -> list[float | None]:
        if self.ema is not None:
            return list(self.ema)
        return [pl_module.ema_decays[0] if pl_module.ema_decays else None]

    def _settings(self, step: int, rate: float | None) -> dict[str, Any]:
        return {"step": step, "ema_decay": rate, "sampler": asdict(self.config), "precision": self.precision,
                "num_samples": self.num_samples, "seed": self.seed, "reference": self.ref_spec}

    @rank_zero_only
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Evaluate every selected EMA at the current step unless the file has that evaluation already."""
        step = trainer.global_step
        done = [{k: r.get(k) for k in self._settings(step, None)} for r in read_metrics(self.metrics_file)]
        rates = self._rates(pl_module)
        for rate in rates:
            settings = self._settings(step, rate)
            if json.loads(json.dumps(settings)) in done:
                continue
            record = {**settings, **self.score(pl_module, pl_module.ema_model(rate))}
            self.metrics_file.parent.mkdir(parents=True, exist_ok=True)
            _write_records(self.metrics_file, [*read_metrics(self.metrics_file), record])
            prefix = "eval" if len(rates) == 1 else f"eval/ema{rate}"
            for run_logger in trainer.loggers:
                run_logger.log_metrics({f"{prefix}/{k}": v for k, v in record["metrics"].items()}, step=step)
            shown = ", ".join(f"{k} {v:.4g}" for k, v in record["metrics"].items())
            logger.info("evaluation at step %d (EMA %s, %d samples): %s", step, rate, self.num_samples, shown)

    def score(self, pl_module: L.LightningModule, model: torch.nn.Module) -> dict[str, Any]:
        """Sample ``num_samples`` images from ``model`` and score them; returns metrics, reasons and seconds."""
        start = time.perf_counter()
        images, labels = self.sample(model, pl_module.schedule)
        sampling = time.perf_counter() - start
        samples = image_set_from_array(images, "samples drawn during training", hashlib.sha256(images.tobytes()).hexdigest(), labels)
        start = time.perf_counter()
        result = evaluate(samples, self._ref or resolve_reference(self.ref_spec), self.options)
        return {"metrics": result["metrics"], "unavailable": result["unavailable"],
                "seconds": {"sampling": round(sampling, 3), "scoring": round(time.perf_counter() - start, 3)}}

    def sample(self, model: torch.nn.Module, schedule: CascadeSchedule) -> tuple[np.ndarray, np.ndarray]:
        """uint8 NHWC images and labels of sample indices 0..N-1 (label and noise seed fixed per index)."""
        labels = balanced_labels(self.num_samples, list(range(model.num_classes)))
        was_training = model.training
        model.eval()
        images = sample_uint8(CascadeSampler(model, schedule, self.config), lambda chunk: labels[chunk],
                              torch.arange(self.num_samples), self.seed, self.batch_size, self.precision)
        model.train(was_training)
        return images.numpy(), labels.numpy()
