"""Post-hoc EMA tracking (EDM2, Karras et al. 2024): power-function EMAs of the weights and periodic snapshots.

A power-function EMA of exponent gamma averages the weights of updates 1..t with weights proportional to
tau^gamma; its length is a fraction of the run (``sigma_rel``, the profile's standard deviation relative to t),
not a fixed number of steps, so one profile suits any run length. The decay of update t is
beta_t = (1 - 1/t)^(gamma + 1): update t's weight in the average at t' >= t is then exactly
(t^(gamma+1) - (t-1)^(gamma+1)) / t'^(gamma+1), the continuous profile (gamma+1) tau^gamma / t'^(gamma+1)
integrated over [t-1, t] (the closed form that :mod:`pixelflow.posthoc_reconstruct` builds on).

:class:`PostHocEMA` keeps one such EMA per ``std`` (sigma_rel) and writes each every ``snapshot_every`` optimizer
steps; any other sigma_rel is reconstructed after training from those snapshots. t counts the EMA updates: a
skipped non-finite step (the weights did not move) updates nothing and does not advance t, so t equals the
optimizer step while no step was skipped.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import safetensors.torch
import torch
from lightning.pytorch.utilities import rank_zero_only

from pixelflow.atomic import atomic_write_bytes, atomic_write_text
from pixelflow.checkpoint import model_kwargs
from pixelflow.training.sharding import is_fsdp

__all__ = ["PostHocEMA", "sigma_rel_to_gamma", "gamma_to_sigma_rel", "power_ema_beta", "power_ema_update", "snapshot_name",
           "SNAPSHOT_DIR", "RUN_INFO", "SIGMA_REL_MAX", "SNAPSHOT_DTYPES"]

logger = logging.getLogger(__name__)

SNAPSHOT_DIR = "posthoc_ema"  # in the run directory
RUN_INFO = "run.json"  # beside the snapshots: what rebuilds the model (model kwargs, schedule, class names)
SNAPSHOT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The largest sigma_rel of a profile with gamma >= 0 (gamma = 0: a flat average of the whole run); sigma_rel falls
# as gamma grows, so each sigma_rel up to it has exactly one gamma >= 0.
SIGMA_REL_MAX = math.sqrt(1 / 12)


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of the profile tau^gamma on [0, t], divided by t."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma >= 0 whose profile has relative standard deviation ``sigma_rel``: the largest real root of
    gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) with s = sigma_rel^-2 (sigma_rel^2 = (gamma+1)/((gamma+2)^2 (gamma+3)))."""
    if not 0.0 < sigma_rel <= SIGMA_REL_MAX:
        raise ValueError(f"sigma_rel must be in (0, {SIGMA_REL_MAX:.4f}] (sqrt(1/12): gamma = 0, a flat average of the "
                         f"whole run), got {sigma_rel}; EDM2's useful range is about 0.01-0.25")
    s = sigma_rel ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    gamma = float(max(r.real for r in roots if abs(r.imag) < 1e-9))
    return max(gamma, 0.0)  # at sigma_rel = SIGMA_REL_MAX the root is 0 up to rounding


def power_ema_beta(gamma: float, t: int) -> float:
    """Decay of EMA update ``t`` (1-based): (1 - 1/t)^(gamma + 1); 0 at t = 1 (the first update copies the weights)."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


@torch.no_grad()
def power_ema_update(ema: list[torch.Tensor], params: list[torch.Tensor], gamma: float, t: int) -> None:
    """Update ``t`` (1-based) of a power-function EMA in place: ema <- beta_t ema + (1 - beta_t) params."""
    torch._foreach_lerp_(ema, params, 1.0 - power_ema_beta(gamma, t))


def snapshot_name(sigma_rel: float, step: int) -> str:
    """``<sigma_rel>_<step, 7 digits>.safetensors``: sorts by sigma_rel, then by step."""
    return f"{float(sigma_rel)!r}_{step:07d}.safetensors"


class PostHocEMA(L.Callback):
    """Keep one power-function EMA per relative standard deviation in ``std`` and write each as
    ``<out_dir>/<std>_<step>.safetensors`` (``dtype``: float32, bfloat16 or float16) every ``snapshot_every``
    optimizer steps and at ``trainer.max_steps``, with ``run.json`` beside them.

    The EMAs (fp32, on the model's device) and their update count are this callback's state in the Lightning
    checkpoint, so a resumed run continues them exactly and rewrites a snapshot it already wrote (same name, same
    bytes, atomically) rather than adding one. Skipped non-finite steps (``pl_module.skipped_steps`` grows) do
    not update them. Not under FSDP (the EMAs would need the sharded parameters gathered every step).
    """

    def __init__(self, out_dir: str, std: Sequence[float] = (0.05, 0.10), snapshot_every: int = 1000,
                 dtype: str = "float32"):
        stds = [float(s) for s in std]
        if not stds or len(set(stds)) != len(stds):
            raise ValueError(f"callbacks.posthoc_ema.std must be distinct sigma_rel values, e.g. [0.05, 0.10]; got {std}")
        self.gammas = [sigma_rel_to_gamma(s) for s in stds]  # raises on a value out of range
        if isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int) or snapshot_every < 1:
            raise ValueError(f"callbacks.posthoc_ema.snapshot_every must be an integer >= 1 (optimizer steps), got {snapshot_every!r}")
        if dtype not in SNAPSHOT_DTYPES:
            raise ValueError(f"callbacks.posthoc_ema.dtype must be one of {sorted(SNAPSHOT_DTYPES)}, got {dtype!r}")
        self.out_dir, self.stds, self.snapshot_every, self.dtype = Path(out_dir), stds, snapshot_every, dtype
        self.updates = 0  # EMA updates so far: t of the last one
        self._emas: list[list[torch.Tensor]] | None = None
        self._loaded: dict[str, Any] | None = None
        self._seen_step = self._seen_skipped = 0

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if is_fsdp(trainer):
            raise ValueError("callbacks.posthoc_ema does not run under FSDP (it averages the full weights every step); "
                             "train with trainer=ddp or drop it (~callbacks.posthoc_ema)")
        if pl_module.model.cross_attention_dim:
            raise ValueError("callbacks.posthoc_ema supports class-to-image runs only (a reconstruction has no text "
                             "encoder to export beside it); drop it for this text-to-image run (~callbacks.posthoc_ema)")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        params = self._named_params(pl_module)[1]
        self._emas = [[p.detach().float().clone() for p in params] for _ in self.stds]
        if self._loaded is not None:
            self._restore(self._loaded)
            self._loaded = None
        self._seen_step, self._seen_skipped = trainer.global_step, pl_module.skipped_steps
        if trainer.is_global_zero:
            self._write_run_info(pl_module)

    @staticmethod
    def _named_params(pl_module: L.LightningModule) -> tuple[list[str], list[torch.Tensor]]:
        named = list(pl_module.model.named_parameters())
        return [n for n, _ in named], [p for _, p in named]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        if step == self._seen_step:  # a micro-batch of an accumulated step: no optimizer step yet
            return
        skipped = pl_module.skipped_steps > self._seen_skipped
        self._seen_step, self._seen_skipped = step, pl_module.skipped_steps
        if not skipped:
            self._update([p.detach() for p in self._named_params(pl_module)[1]])
        if step % self.snapshot_every == 0 or step == trainer.max_steps:
            self._write_snapshots(pl_module, step)

    def _update(self, params: list[torch.Tensor]) -> None:
        self.updates += 1
        fp32 = [p.float() for p in params]
        for ema, gamma in zip(self._emas, self.gammas):
            power_ema_update(ema, fp32, gamma, self.updates)

    @rank_zero_only
    def _write_snapshots(self, pl_module: L.LightningModule, step: int) -> None:
        names = self._named_params(pl_module)[0]
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for sigma_rel, gamma, ema in zip(self.stds, self.gammas, self._emas):
            state = {n: e.to(SNAPSHOT_DTYPES[self.dtype]).cpu().contiguous() for n, e in zip(names, ema)}
            meta = {"sigma_rel": repr(sigma_rel), "gamma": repr(gamma), "step": str(step), "t": str(self.updates),
                    "dtype": self.dtype}
            atomic_write_bytes(self.out_dir / snapshot_name(sigma_rel, step), safetensors.torch.save(state, metadata=meta))
        logger.info("post-hoc EMA: snapshots of sigma_rel %s at step %d (t=%d) in %s", self.stds, step, self.updates,
                    self.out_dir)

    def _write_run_info(self, pl_module: L.LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        info = {"model": model_kwargs(pl_module.model), "schedule": asdict(pl_module.schedule),
                "class_names": pl_module.class_names, "std": self.stds, "snapshot_every": self.snapshot_every,
                "dtype": self.dtype}
        atomic_write_text(self.out_dir / RUN_INFO, json.dumps(info, indent=1) + "\n")

    def state_dict(self) -> dict[str, Any]:
        if self._emas is None:  # saved before training started: whatever was loaded
            return self._loaded or {}
        return {"std": self.stds, "updates": self.updates, "emas": [[e.detach().cpu() for e in ema] for ema in self._emas]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        if [float(s) for s in state_dict["std"]] != self.stds:
            raise ValueError(f"the checkpoint's post-hoc EMAs track sigma_rel {state_dict['std']} but "
                             f"callbacks.posthoc_ema.std is {self.stds}: resume with the same std list")
        self.updates = int(state_dict["updates"])
        if self._emas is None:
            self._loaded = state_dict
        else:
            self._restore(state_dict)

    @torch.no_grad()
    def _restore(self, state: dict[str, Any]) -> None:
        for ema, saved in zip(self._emas, state["emas"]):
            if len(saved) != len(ema) or any(a.shape != b.shape for a, b in zip(ema, saved)):
                raise ValueError("the checkpoint's post-hoc EMAs do not fit this model's parameters: resume with the "
                                 "model config the run was trained with")
            torch._foreach_copy_(ema, [s.to(e.device, e.dtype) for s, e in zip(saved, ema)])
