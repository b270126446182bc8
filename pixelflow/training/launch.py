"""Builds a training run from a composed Hydra config: datamodule, model, module, trainer, resume."""

from __future__ import annotations

import logging
import uuid
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from omegaconf import DictConfig, OmegaConf

from pixelflow.atomic import atomic_write_text
from pixelflow.checkpoint import CheckpointError, load_pixelflow, model_kwargs
from pixelflow.text import TextEncoder
from pixelflow.training.callbacks import SampleGrid
from pixelflow.training.checkpoint_io import AtomicCheckpointIO
from pixelflow.training.console import StepProgressBar, silence_lightning_tips
from pixelflow.training.objective import Objective
from pixelflow.training.preemption import RequeueOnSignal, slurm_environment
from pixelflow.training.repa import RepaAlignment
from pixelflow.training.retention import newest_checkpoint
from pixelflow.training.sharding import is_fsdp

__all__ = ["build_training", "build_objective", "build_alignment", "build_text_encoder", "run_training",
           "check_global_batch", "group_entries", "init_from_weights"]

logger = logging.getLogger(__name__)

# lightning 2.6 still builds torch's deprecated LeafSpec on every batch; nothing a user can act on.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning)
# A run directory with checkpoints is reused on purpose: it is resumed (run_training refuses when resume=false).
warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
silence_lightning_tips()


def check_global_batch(global_batch: int | None, micro_batch: int, accumulation: int, world_size: int) -> int:
    """Enforce global batch = micro-batch x accumulation x world size; return the global batch."""
    actual = micro_batch * accumulation * world_size
    if global_batch is not None and global_batch != actual:
        raise ValueError(
            f"global_batch_size={global_batch} but data.batch_size ({micro_batch}) x trainer.accumulate_grad_batches "
            f"({accumulation}) x world size ({world_size}) = {actual}. Change one of them, e.g. "
            f"trainer.accumulate_grad_batches={max(1, global_batch // (micro_batch * world_size))}."
        )
    return actual


def init_from_weights(module: L.LightningModule, path: str | Path) -> str:
    """Load the weights of ``path`` (a released/exported ``model.pt`` with its config.yaml, or a project
    ``.ckpt``: its EMA weights) strictly into the live model and every EMA. Returns a line for the log."""
    loaded = load_pixelflow(path)
    want, got = model_kwargs(module.model), model_kwargs(loaded.model)
    if want != got:
        diff = ", ".join(f"{k}: file {got[k]} vs run {want[k]}" for k in want if want[k] != got.get(k))
        raise CheckpointError(f"init_from={path} does not fit this run's model ({diff}). Pick the model config of the "
                              "checkpoint (e.g. model=xl4) and a dataset with the same number of classes.")
    module.init_weights(loaded.model.state_dict())
    note = ""
    if loaded.schedule != module.schedule:
        note = f" (it was trained with {loaded.schedule}; this run uses {module.schedule})"
    return f"initialised the model and its EMAs from {path}{note}; fresh optimizer, step 0"


def _fsdp_callbacks(trainer: L.Trainer) -> list[str]:
    """Under FSDP, turn off what cannot drive a sharded model; return what was said about it."""
    if not is_fsdp(trainer):
        return []
    grids = [c for c in trainer.callbacks if isinstance(c, SampleGrid)]
    for callback in grids:
        trainer.callbacks.remove(callback)
    return ["FSDP: the sample-grid callback is off (it samples on one rank from the whole model, which is sharded); "
            "sample from export/model.pt or a checkpoint with sample.py"] if grids else []


def _wandb_id(run_dir: Path) -> str:
    """A W&B run id persisted in the run directory so resumed runs continue the same W&B run."""
    path = run_dir / "wandb_id.txt"
    if not path.is_file():
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, uuid.uuid4().hex[:8])
    return path.read_text().strip()


def group_entries(cfg: DictConfig, group: str) -> dict[str, DictConfig]:
    """The ``callbacks`` / ``logger`` entries to instantiate, each with a ``_target_``.

    The option ``none`` means none at all: whatever an experiment's overrides or a sub-group (e.g.
    ``callbacks/evaluate``) still put there is dropped, with a note. Under any other option an entry
    without ``_target_`` (settings for an entry the option does not define) is a conflict, reported
    before any work.
    """
    entries = dict((cfg.get(group) or {}).items())
    choice = HydraConfig.get().runtime.choices.get(group) if HydraConfig.initialized() else None
    if choice == "none":
        if entries:
            logger.info("%s=none: ignoring %s", group, ", ".join(f"{group}.{name}" for name in sorted(entries)))
        return {}
    orphans = sorted(name for name, conf in entries.items() if not (isinstance(conf, DictConfig) and "_target_" in conf))
    if not orphans:
        return entries
    names = ", ".join(f"{group}.{name}" for name in orphans)
    raise ValueError(f"{names} has no _target_: something (an experiment or a command-line override) sets options of "
                     f"{names} but the {group} option {choice!r} does not define it. Use a {group} option that defines "
                     f"it, {group}=none to drop them all, or remove it with ~{group}.{orphans[0]}.")


def _loggers(cfg: DictConfig, run_dir: Path) -> list[Any]:
    loggers = []
    for name, conf in group_entries(cfg, "logger").items():
        extra = {"id": _wandb_id(run_dir), "resume": "allow"} if name == "wandb" else {}
        loggers.append(instantiate(conf, **extra))
    return loggers


def build_text_encoder(cfg: DictConfig, datamodule: L.LightningDataModule) -> TextEncoder | None:
    """The frozen text encoder of a text-to-image run (``cfg.text_encoder``), None for class-to-image; a caption
    datamodule (``num_classes`` 0) needs one and a class datamodule must not have one."""
    spec = cfg.get("text_encoder")
    if spec and datamodule.num_classes:
        raise ValueError(f"text_encoder is set but data ({cfg.data._target_}) yields class labels, not captions: use a "
                         "caption datamodule (e.g. data=mnist_captions) or drop text_encoder (text_encoder=null)")
    if not spec and not datamodule.num_classes:
        raise ValueError(f"data ({cfg.data._target_}) yields captions but no text_encoder is configured: add one, e.g. "
                         "text_encoder='{_target_: pixelflow.text.tiny_random_t5}' (see conf/experiment/mnist_t2i_quickstart.yaml)")
    return instantiate(spec) if spec else None


def build_objective(cfg: DictConfig, num_stages: int) -> Objective:
    """``cfg.objective`` (a ``conf/objective`` preset; absent: the published recipe), checked against the stages."""
    values = cfg.get("objective")
    return Objective.from_config(None if values is None else OmegaConf.to_container(values, resolve=True), num_stages)


def build_alignment(objective: Objective, hidden: int) -> RepaAlignment | None:
    """The REPA term of ``objective.repa`` (its encoder instantiated from the config), or None."""
    repa = objective.repa
    if repa is None:
        return None
    return RepaAlignment(instantiate(repa.encoder), hidden, repa.block, repa.weight, repa.projector_dim)


def build_training(cfg: DictConfig) -> tuple[L.Trainer, L.LightningModule, L.LightningDataModule]:
    """Instantiate everything a run needs; validates the batch invariant and the objective before any work."""
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.paths.run_dir)
    schedule = instantiate(cfg.cascade)
    objective = build_objective(cfg, schedule.num_stages)
    datamodule = instantiate(cfg.data)
    text_encoder = build_text_encoder(cfg, datamodule)
    text = {"cross_attention_dim": text_encoder.width} if text_encoder is not None else {}
    model = instantiate(cfg.model, num_classes=datamodule.num_classes, prediction=objective.prediction, **text)
    if schedule.image_size != datamodule.image_size:
        raise ValueError(f"cascade.image_size={schedule.image_size} differs from data.image_size={datamodule.image_size}")
    module = instantiate(cfg.module)(model=model, schedule=schedule, class_names=datamodule.class_names,
                                     text_encoder=text_encoder, objective=objective,
                                     alignment=build_alignment(objective, model.hidden_size))
    callbacks = [instantiate(c) for c in group_entries(cfg, "callbacks").values()]
    if cfg.trainer.get("enable_progress_bar", True) and not any(isinstance(c, ProgressBar) for c in callbacks):
        callbacks.append(StepProgressBar())
    plugins: list[Any] = [AtomicCheckpointIO()]
    slurm = slurm_environment()
    if slurm is not None:  # last, after every callback that may act at the same step
        callbacks.append(RequeueOnSignal(slurm.requeue_signal))
        plugins.append(slurm)
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=_loggers(cfg, run_dir) or False, plugins=plugins)
    check_global_batch(cfg.get("global_batch_size"), datamodule.batch_size, trainer.accumulate_grad_batches,
                       trainer.world_size)
    return trainer, module, datamodule


def run_training(cfg: DictConfig) -> Path:
    """Train (resuming from the run directory when possible); return the run directory."""
    run_dir = Path(cfg.paths.run_dir)
    choice = newest_checkpoint(run_dir)
    ckpt = choice.path
    if choice.found and not cfg.resume:
        raise FileExistsError(f"{run_dir} already holds a run ({choice.found[0]}) and resume=false: starting over there would "
                              "mix two runs. Pick another run_name=..., delete the directory, or set resume=true.")
    if choice.found and ckpt is None:
        raise CheckpointError(f"{run_dir} holds checkpoints but none is readable: {'; '.join(choice.notes)}. "
                              "Move them away to start over in this directory, or pick another run_name=...")
    trainer, module, datamodule = build_training(cfg)
    problems = [n for n in choice.notes if "unreadable" in n]  # checkpoints it could not read
    notes = [n for n in choice.notes if "unreadable" not in n]
    notes += _fsdp_callbacks(trainer)
    init_from = cfg.get("init_from")
    if init_from and ckpt is not None:
        notes.append(f"init_from={init_from} ignored: resuming this run from {ckpt} (its weights and optimizer)")
    elif init_from:
        notes.append(init_from_weights(module, init_from))
    if trainer.is_global_zero:
        logger.info("run directory: %s", run_dir)
        for problem in problems:
            logger.warning(problem)
        for note in notes:
            logger.info(note)
        logger.info("%s; %.2fM parameters", f"resuming from {ckpt} (step {choice.step})" if ckpt else "starting a new run",
                    sum(p.numel() for p in module.model.parameters()) / 1e6)
    torch.set_float32_matmul_precision("high")
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
    if trainer.is_global_zero:
        logger.info("done; run directory: %s", run_dir)
    return run_dir
