"""What a cascade is conditioned on, behind one interface the sampler, the training module and the demo share.

A :class:`Conditioning` holds B images' conditions and gives the network's keyword arguments for the
conditional rows (``cond_kwargs``, used where the guidance weight is 1) and for [unconditional;
conditional] rows in one batch (``both_kwargs``), plus its guidance rule per stage:

- :class:`ClassCondition` (class-to-image): ``class_labels=``; the unconditional row is the null class;
  the published stage-wise ramp w_k = 1 + (cfg - 1) factor_k (stage 0 unguided).
- :class:`pixelflow.text.TextCondition` (text-to-image): ``text_states=``/``text_mask=``; the
  unconditional rows encode the negative (published: empty) prompt; constant guidance w = cfg at every stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Protocol, runtime_checkable

import torch

from pixelflow.cascade import CascadeSchedule

__all__ = ["Conditioning", "ClassCondition", "as_conditioning"]


@runtime_checkable
class Conditioning(Protocol):
    """The conditions of B images (see the module docstring)."""

    @property
    def batch(self) -> int:
        """Number of images B."""

    def cond_kwargs(self) -> dict[str, torch.Tensor]:
        """Model keyword arguments for the B conditional rows."""

    def both_kwargs(self) -> dict[str, torch.Tensor]:
        """Model keyword arguments for 2B rows: [unconditional; conditional]."""

    def stage_weight(self, cfg: float, stage: int, schedule: CascadeSchedule) -> float:
        """The guidance weight of ``stage`` for the guidance scale ``cfg`` (1 = conditional branch only)."""

    def check(self, model: torch.nn.Module) -> None:
        """Raise ValueError if ``model`` cannot take this kind of condition."""

    def to(self, device: torch.device | str) -> Conditioning:
        """The same condition on ``device``."""


@dataclass(frozen=True)
class ClassCondition:
    """Class labels (B,) of a class-to-image model; ``null_class`` is its unconditional label."""

    labels: torch.Tensor
    null_class: int

    def __post_init__(self) -> None:
        if self.labels.ndim != 1 or self.labels.is_floating_point():
            raise ValueError(f"class labels must be a 1-D integer tensor, got {self.labels.dtype} {tuple(self.labels.shape)}")

    @property
    def batch(self) -> int:
        return self.labels.shape[0]

    @cached_property
    def _both(self) -> torch.Tensor:
        return torch.cat([torch.full_like(self.labels, self.null_class), self.labels])

    def cond_kwargs(self) -> dict[str, torch.Tensor]:
        return {"class_labels": self.labels}

    def both_kwargs(self) -> dict[str, torch.Tensor]:
        return {"class_labels": self._both}

    def stage_weight(self, cfg: float, stage: int, schedule: CascadeSchedule) -> float:
        """The published stage-wise ramp (:meth:`CascadeSchedule.stage_cfg`)."""
        return schedule.stage_cfg(cfg, stage)

    def check(self, model: torch.nn.Module) -> None:
        if getattr(model, "cross_attention_dim", None):
            raise ValueError("this is a text-to-image model: condition it on prompts (a TextCondition from "
                             "TextEncoder.condition), not class labels")
        if self.labels.numel() and (self.labels.min() < 0 or self.labels.max() >= model.num_classes):
            raise ValueError(f"class labels must lie in [0, {model.num_classes - 1}], got {self.labels.tolist()}")

    def to(self, device: torch.device | str) -> ClassCondition:
        return ClassCondition(self.labels.to(device), self.null_class)


def as_conditioning(model: torch.nn.Module, condition: Conditioning | torch.Tensor) -> Conditioning:
    """``condition`` checked against ``model``; a tensor of class labels becomes a :class:`ClassCondition`."""
    if isinstance(condition, torch.Tensor):
        if getattr(model, "cross_attention_dim", None):
            raise ValueError("this is a text-to-image model: condition it on prompts (a TextCondition from "
                             "TextEncoder.condition), not a tensor of class labels")
        condition = ClassCondition(condition, model.null_class)
    if not isinstance(condition, Conditioning):
        raise TypeError(f"expected class labels or a Conditioning (ClassCondition, TextCondition), got {type(condition).__name__}")
    condition.check(model)
    return condition
