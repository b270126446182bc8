"""Evaluation during training: sample from the EMA weights at fixed seeds, score with :mod:`pixelflow.metrics`, log.

Every ``every_n_steps`` optimizer steps and at the end, :class:`EvaluateSamples` draws ``num_samples`` images
from each selected EMA with per-sample seeds and balanced labels (:mod:`pixelflow.sampling.indexed`, as ``sample.py`` does),
scores them against ``ref`` with :func:`pixelflow.metrics.evaluation.evaluate` (reference features are cached
there), logs ``eval/<metric>`` to every logger and appends one JSON line per (step, EMA rate) to ``metrics_file``.

Several ranks (DDP) share the work (:mod:`pixelflow.training.eval_shares`): every rank draws its chunks of the
sample indices, the uint8 images are gathered onto global rank 0, which scores, writes the file and logs, and all
ranks leave together. An image depends only on its index (seed and label), not on the rank that draws it, and DDP
keeps the EMA weights identical on every rank. Which evaluations are due is rank 0's decision (it reads the file),
broadcast to the others. FSDP shards the EMA weights, so no rank could sample from them: the callback refuses it.

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

from pixelflow.atomic import atomic_write_text
from pixelflow.cascade import CascadeSchedule
from pixelflow.metrics.evaluation import EvalOptions, evaluate
from pixelflow.metrics.io import ImageSet, image_set_from_array
from pixelflow.metrics.references import is_mnist_reference, resolve_reference
from pixelflow.precision import PRECISIONS, resolve_precision
from pixelflow.sampling.indexed import balanced_labels, sample_uint8
from pixelflow.sampling.memory import check_sampling_fits, max_fitting_batch
from pixelflow.sampling.samplers import CascadeSampler, SamplerConfig
from pixelflow.training.callbacks import student_sampler
from pixelflow.training.eval_shares import balanced_batch, free_device_bytes, gather_to_rank_zero, rank_chunks
from pixelflow.training.sharding import is_fsdp

__all__ = ["EvaluateSamples", "read_metrics", "SAFETY_MARGIN", "CPU_BATCH_SIZE"]

logger = logging.getLogger(__name__)
GIB = 2**30
SAFETY_MARGIN = 0.10  # share of the free device memory that batch_size=auto leaves unused, on top of the estimate's slack
CPU_BATCH_SIZE = 100  # batch_size=auto where no free-memory figure exists (CPU)


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
    ``sampler``: :class:`~pixelflow.sampling.samplers.SamplerConfig` fields (a ``conf/sampler`` preset), in
    ``precision`` (:mod:`pixelflow.precision`; ``auto``: bf16 on CUDA, fp32 on CPU). ``batch_size``: images a
    sampling forward takes, an integer or ``auto`` (:meth:`sampling_batch`). ``classifier``: the MNIST classifier
    metrics, ``auto`` = for the ``mnist_*`` references. ``inception``: FID / sFID / precision / recall, with
    ``scoring_batch_size`` images a feature forward on rank 0 and ``device`` for it (``auto``: CUDA if present).
    """

    def __init__(self, metrics_file: str, ref: str, every_n_steps: int = 0, num_samples: int = 500,
                 batch_size: int | str = "auto", seed: int = 0, sampler: Mapping[str, Any] | SamplerConfig | None = None,
                 ema: list[float] | None = None, classifier: bool | str = "auto", inception: bool = True,
                 num_ref: int | None = None, cache_dir: str | None = None, device: str = "auto", precision: str = "auto",
                 scoring_batch_size: int = 100):
        if every_n_steps < 0 or num_samples < 2 or scoring_batch_size < 1:
            raise ValueError(f"evaluation needs every_n_steps >= 0, num_samples >= 2 and scoring_batch_size >= 1; got "
                             f"{every_n_steps}, {num_samples}, {scoring_batch_size}")
        if batch_size != "auto" and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"callbacks.evaluate.batch_size={batch_size!r}: use auto (the largest that fits) or an integer >= 1")
        if precision not in PRECISIONS:
            raise ValueError(f"callbacks.evaluate.precision={precision!r}: use one of {PRECISIONS}")
        if classifier not in ("auto", True, False):
            raise ValueError(f"classifier={classifier!r}: use auto, true or false")
        self.metrics_file, self.ref_spec, self.every_n_steps = Path(metrics_file), str(ref), every_n_steps
        self.num_samples, self.batch_size, self.seed, self.precision = num_samples, batch_size, seed, precision
        self.config = SamplerConfig.from_mapping(sampler or {}, "callbacks.evaluate.sampler")
        self.ema = None if ema is None else [float(r) for r in ema]
        self.options = EvalOptions(batch_size=scoring_batch_size, device=device, cache_dir=cache_dir, num_ref=num_ref,
                                   inception=inception,
                                   classifier=is_mnist_reference(self.ref_spec) if classifier == "auto" else bool(classifier))
        self._ref: ImageSet | None = None
        self._last_step = -1

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Check every setting before the first step, so a typo fails now and not after hours of training."""
        if is_fsdp(trainer):
            raise ValueError("callbacks.evaluate cannot run under FSDP: the EMA weights are sharded over the ranks, so no "
                             "rank holds a model to sample from. Train with DDP (trainer=ddp) to evaluate during training, "
                             "or drop the callback (callbacks/evaluate=null) and score the export afterwards: sample.py "
                             "ckpt=<run>/export/model.pt, then evaluate.py samples=<its samples.npz> ref=...")
        if pl_module.model.cross_attention_dim:
            raise ValueError("callbacks.evaluate samples class labels and cannot drive a text-to-image model: drop it "
                             "(callbacks/evaluate=null); score text-to-image samples with sample.py prompts and evaluate.py")
        self.config = student_sampler(pl_module, self.config, "callbacks.evaluate")
        self.config.stage_steps(pl_module.schedule.num_stages)
        for rate in self.ema or []:
            pl_module.ema_model(rate)
        if not (self.options.inception or self.options.classifier):
            raise ValueError("callbacks.evaluate: inception=false and classifier=false leave no metric; enable one")
        if trainer.is_global_zero:
            self._ref = resolve_reference(self.ref_spec)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            records = read_metrics(self.metrics_file)
            kept = [r for r in records if r["step"] <= trainer.global_step]
            if len(kept) < len(records):
                logger.info("resuming at step %d: dropped %d evaluation(s) of later steps from %s; they are evaluated "
                            "again when training gets there", trainer.global_step, len(records) - len(kept), self.metrics_file)
                _write_records(self.metrics_file, kept)
        # A batch that does not fit now, before the optimizer state exists, will not fit later: refuse it before training.
        self.sampling_batch(trainer, pl_module, resolve_precision(self.precision, pl_module.device))

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

    def _settings(self, step: int, rate: float | None, precision: str) -> dict[str, Any]:
        return {"step": step, "ema_decay": rate, "sampler": asdict(self.config), "precision": precision,
                "num_samples": self.num_samples, "seed": self.seed, "reference": self.ref_spec}

    def _due(self, step: int, precision: str, pl_module: L.LightningModule) -> list[float | None]:
        """The selected EMA rates whose evaluation at ``step`` in ``precision`` is not in the file yet."""
        done = [{k: r.get(k) for k in self._settings(step, None, precision)} for r in read_metrics(self.metrics_file)]
        return [rate for rate in self._rates(pl_module) if json.loads(json.dumps(self._settings(step, rate, precision))) not in done]

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Evaluate every selected EMA at the current step unless the file has that evaluation already. Every rank
        calls it and samples its share; global rank 0 decides what is due, scores, writes and logs."""
        step, strategy = trainer.global_step, trainer.strategy
        precision = resolve_precision(self.precision, pl_module.device)
        rates = strategy.broadcast(self._due(step, precision, pl_module) if trainer.is_global_zero else None, src=0)
        batch = self.sampling_batch(trainer, pl_module, precision) if rates else 0
        for rate in rates:
            start = time.perf_counter()
            images = self.sample(trainer, pl_module.ema_model(rate), pl_module.schedule, batch, precision)
            sampling = time.perf_counter() - start  # on rank 0: until every rank's images have arrived
            if not trainer.is_global_zero:
                continue
            scores = self.score(images.numpy(), self.labels(pl_module.model).numpy())
            scores["seconds"] = {"sampling": round(sampling, 3), **scores["seconds"]}
            record = {**self._settings(step, rate, precision), **scores, "batch_size": batch, "ranks": trainer.world_size}
            self.metrics_file.parent.mkdir(parents=True, exist_ok=True)
            _write_records(self.metrics_file, [*read_metrics(self.metrics_file), record])
            prefix = "eval" if len(rates) == 1 else f"eval/ema{rate}"
            for run_logger in trainer.loggers:
                run_logger.log_metrics({f"{prefix}/{k}": v for k, v in record["metrics"].items()}, step=step)
            shown = ", ".join(f"{k} {v:.4g}" for k, v in record["metrics"].items())
            logger.info("evaluation at step %d (EMA %s, %d samples, batch %d on %d rank(s), %s): %s", step, rate,
                        self.num_samples, batch, trainer.world_size, precision, shown)
        strategy.barrier("callbacks.evaluate")

    def sampling_batch(self, trainer: L.Trainer, pl_module: L.LightningModule, precision: str) -> int:
        """The images a sampling forward takes, the same on every rank (a collective: every rank calls it).

        An integer ``batch_size`` is used as given, after checking that its estimated peak
        (:mod:`pixelflow.sampling.memory`) fits every rank's free device memory with the training state resident,
        less :data:`SAFETY_MARGIN`; ``auto`` is the largest batch that fits there on every rank, lowered to spread
        the samples evenly over the ranks (:func:`~pixelflow.training.eval_shares.balanced_batch`). Without a
        free-memory figure (CPU) an integer is unchecked and ``auto`` starts from :data:`CPU_BATCH_SIZE`."""
        model, image_size, method = pl_module.model, pl_module.schedule.image_size, self.config.method
        estimate = {"guided": self.config.guidance_scale > 1, "steps": self.config.steps}
        free = free_device_bytes(pl_module.device)
        usable = None if free is None else free * (1 - SAFETY_MARGIN)
        where = (f"{1 - SAFETY_MARGIN:.0%} of the {(free or 0) / GIB:.1f} GiB free on {pl_module.device} (rank "
                 f"{trainer.global_rank}) with the training state resident")
        fit, problem = self.batch_size, None
        if self.batch_size == "auto":
            fit = CPU_BATCH_SIZE if usable is None else max_fitting_batch(model, image_size, method, precision, usable, **estimate)
            if not fit:
                fix = "precision=bf16, " if precision == "fp32" else ""
                problem = (f"callbacks.evaluate.batch_size=auto: not even one image at {image_size} px ({method}, {precision}) "
                           f"fits the {usable / GIB:.1f} GiB left ({where}); use {fix}a device with more memory, or drop "
                           "the callback (callbacks/evaluate=null) and evaluate the export with sample.py and evaluate.py")
        elif usable is not None:
            try:
                check_sampling_fits(model, image_size, min(fit, self.num_samples), method, precision, usable, **estimate)
            except ValueError as error:
                problem = f"callbacks.evaluate.{error} (the device's {usable / GIB:.1f} GiB: {where}); or batch_size=auto"
        if not trainer.strategy.reduce_boolean_decision(problem is None, all=True):
            raise ValueError(problem or "callbacks.evaluate: the sampling batch does not fit another rank's device (its "
                                        "error names the batch that does)")
        if self.batch_size != "auto":
            return fit
        fit = int(trainer.strategy.reduce(torch.tensor(fit, device=trainer.strategy.root_device), reduce_op="min"))
        return balanced_batch(fit, self.num_samples, trainer.world_size)

    def labels(self, model: torch.nn.Module) -> torch.Tensor:
        """The label of every sample index (classes cycled)."""
        return balanced_labels(self.num_samples, list(range(model.num_classes)))

    def sample(self, trainer: L.Trainer, model: torch.nn.Module, schedule: CascadeSchedule, batch: int,
               precision: str) -> torch.Tensor | None:
        """uint8 NHWC images of sample indices 0..N-1 on global rank 0, None on the others (every rank calls it): each
        rank draws its chunks (:func:`~pixelflow.training.eval_shares.rank_chunks`), rank 0 gathers them in place."""
        world, rank = trainer.world_size, trainer.global_rank
        shares = (rank_chunks(self.num_samples, batch, r, world) for r in range(world))
        positions = [torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.long) for chunks in shares]
        if len(positions[rank]):
            local = self.draw(model, schedule, positions[rank], batch, precision)
        else:  # fewer chunks than ranks
            local = torch.empty((0, schedule.image_size, schedule.image_size, model.in_channels), dtype=torch.uint8)
        return gather_to_rank_zero(trainer.strategy, local, positions, rank)  # rows in index order

    def draw(self, model: torch.nn.Module, schedule: CascadeSchedule, indices: torch.Tensor, batch: int,
             precision: str) -> torch.Tensor:
        """uint8 NHWC images of sample ``indices`` on this rank, ``batch`` at a time (label and noise seed fixed per index)."""
        labels = self.labels(model)
        was_training = model.training
        model.eval()
        images = sample_uint8(CascadeSampler(model, schedule, self.config), lambda chunk: labels[chunk], indices, self.seed,
                              batch, precision)
        model.train(was_training)
        return images

    def score(self, images: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
        """Metrics of ``images`` (uint8 NHWC, sample indices 0..N-1) against ``ref``: metrics, reasons, the images'
        SHA-256 and seconds."""
        start = time.perf_counter()
        digest = hashlib.sha256(np.ascontiguousarray(images)).hexdigest()  # of the buffer itself: no copy of the images
        samples = image_set_from_array(images, "samples drawn during training", digest, labels)
        result = evaluate(samples, self._ref or resolve_reference(self.ref_spec), self.options)
        return {"metrics": result["metrics"], "unavailable": result["unavailable"], "samples_sha256": digest,
                "seconds": {"scoring": round(time.perf_counter() - start, 3)}}
