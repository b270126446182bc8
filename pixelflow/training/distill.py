"""Few-step distillation: a student that reaches its teacher's guided cascade in ``student_steps`` calls a stage.

The objective is rectified-flow reflow (Liu et al. 2023) on the teacher's own coupling: for a teacher pair of
stage k, z0 the stage's start and z1 the teacher's ODE solution from it (guidance included, see
:mod:`pixelflow.training.teacher_pairs`), the student learns the straight velocity z1 - z0 at
x_t = z0 + t (z1 - z0). A network that has learnt it exactly lands on z1 from z0 with any fixed-step
method and any number of steps. A learnt one is least sure at t = 0, where it sees only noise and regresses
towards the mean of its targets, so the student samples with AB2 on ``student_steps`` steps of the grid
shifted by ``student_shift`` (a shift > 1 makes the first step short and extrapolates from the better
later velocity; :meth:`DistillLitModule.student_sampler`), one conditional network row per call (guidance
is folded in: the student is never asked for an unconditional velocity). ``time`` picks where on the
segment it learns:

- ``uniform``: t ~ U(0, 1), reflow as published;
- ``student_grid``: t only at the student's own step times (the points its sampler visits).

``method: consistency`` instead trains consistency distillation against the frozen teacher
(:mod:`pixelflow.training.consistency`; ``teacher_steps`` guided Euler steps a stage), on the teacher's
final samples as images.

Stage transitions stay the published ones: at sampling time the student's stage k starts from its own stage
k-1 result, upsampled and renoised as the cascade says.
"""

from __future__ import annotations

from typing import Any

import torch

from pixelflow.cascade import CascadeSchedule
from pixelflow.prediction import TRAIN_MIN_DIVISOR, convert
from pixelflow.sampling.samplers import SamplerConfig, ab2_time_grid
from pixelflow.training.consistency import consistency_loss
from pixelflow.training.lit_module import PixelFlowLitModule
from pixelflow.training.objective import cpu_generator
from pixelflow.training.teacher_pairs import stage_starts

__all__ = ["METHODS", "TIMES", "DistillLitModule", "draw_times", "reflow_targets", "reflow_loss", "student_grid"]

TIMES = ("uniform", "student_grid")
METHODS = ("reflow", "consistency")


def reflow_targets(z0: torch.Tensor, z1: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, velocity) on the segment from ``z0`` to ``z1`` at per-sample times ``t`` (B,)."""
    tau = t.to(z0.dtype).view(-1, *([1] * (z0.ndim - 1)))
    return z0 + tau * (z1 - z0), z1 - z0


def student_grid(student_steps: int, student_shift: float) -> torch.Tensor:
    """The stage-local times (student_steps,) at which the student's AB2 sampler calls the network."""
    return ab2_time_grid(student_steps, student_shift)[:-1].float()


def draw_times(batch: int, time: str, student_steps: int, generator: torch.Generator | None,
               device: torch.device, student_shift: float = 1.0) -> torch.Tensor:
    """Per-sample segment times: U(0, 1) (``uniform``) or one of the student's step times (``student_grid``)."""
    if time == "uniform":
        return torch.rand(batch, generator=generator, device=device)
    index = torch.randint(student_steps, (batch,), generator=generator, device=device)
    return student_grid(student_steps, student_shift).to(device)[index]


def reflow_loss(model: torch.nn.Module, schedule: CascadeSchedule, ends: list[torch.Tensor], labels: torch.Tensor,
                seeds: list[int], generator: torch.Generator | None, time: str = "uniform",
                student_steps: int = 1, student_shift: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean over samples of the pixel-mean squared error between the student's velocity and the teacher's
    straight one, one stage a sample (every stage equally often), in one packed forward; logs ``stage<k>``."""
    batch, device = labels.shape[0], labels.device
    starts = stage_starts(schedule, ends, seeds, model.in_channels)
    stages = schedule.balanced_stages(batch, cpu_generator(generator)).to(device)
    t = draw_times(batch, time, student_steps, generator, device, student_shift)
    present = [k for k in range(schedule.num_stages) if (stages == k).any()]
    index = {k: (stages == k).nonzero(as_tuple=True)[0] for k in present}
    rows = {k: reflow_targets(starts[k][index[k]], ends[k][index[k]], t[index[k]]) for k in present}
    order = torch.cat([index[k] for k in present])
    timesteps = [schedule.stage_timestep(k, t[index[k]].double()).float() for k in present]
    preds = model([rows[k][0] for k in present], timesteps, class_labels=labels[order])
    losses, logs = [], {}
    for k, pred in zip(present, preds):
        x_t, target = rows[k]
        if model.prediction != "v":
            pred = convert(pred, x_t, t[index[k]], schedule.line(k), model.prediction, "v", TRAIN_MIN_DIVISOR)
        error = (pred.float() - target.float()).square().mean(dim=(1, 2, 3))
        logs[f"stage{k}"] = error.detach().mean()
        losses.append(error)
    return torch.cat(losses).mean(), logs


class DistillLitModule(PixelFlowLitModule):
    """The student: :class:`PixelFlowLitModule` (EMAs, resume, non-finite guard, export) trained on teacher pairs
    (:class:`~pixelflow.data.teacher_pairs.TeacherPairsDataModule`) with :func:`reflow_loss`.

    Its checkpoints and exports record the sampler it was distilled for (:meth:`student_sampler`), which
    ``sample.py``, the evaluation callback and the demo use unless told otherwise.
    """

    def __init__(self, *args: Any, student_steps: int = 2, student_shift: float = 1.0, time: str = "uniform",
                 method: str = "reflow", teacher_steps: int = 8, **kwargs: Any):
        if kwargs.get("label_dropout", 0.0):
            raise ValueError("module.label_dropout must be 0 for a distilled student: guidance is folded into it, so it "
                             "never needs an unconditional velocity (the experiment sets module.label_dropout=0)")
        if isinstance(student_steps, bool) or not isinstance(student_steps, int) or student_steps < 1:
            raise ValueError(f"module.student_steps must be an integer >= 1 (steps a stage), got {student_steps!r}")
        if isinstance(student_shift, bool) or not isinstance(student_shift, (int, float)) or student_shift <= 0:
            raise ValueError(f"module.student_shift must be a number > 0 (the AB2 grid's shift), got {student_shift!r}")
        if time not in TIMES:
            raise ValueError(f"module.time must be one of {TIMES}, got {time!r}")
        if method not in METHODS:
            raise ValueError(f"module.method must be one of {METHODS}, got {method!r}")
        kwargs["label_dropout"] = 0.0
        super().__init__(*args, **kwargs)
        if self.objective.repa is not None or self.alignment is not None:
            raise ValueError("objective.repa does not apply to distillation (the student learns the teacher's velocity): "
                             "use objective=published")
        self.student_steps, self.student_shift = student_steps, float(student_shift)
        self.time, self.method, self.teacher_steps = time, method, teacher_steps
        self._teacher: torch.nn.Module | None = None  # consistency: the frozen teacher (a plain attribute, never saved)
        self._guidance = 1.0

    def student_sampler(self) -> SamplerConfig:
        """What the student is distilled for: AB2 on ``student_steps`` steps a stage (grid shift ``student_shift``),
        no guidance doubling."""
        return SamplerConfig(method="ab2", steps=self.student_steps, shift=self.student_shift, guidance_scale=1.0)

    @property
    def recorded_sampler(self) -> dict[str, Any]:
        config = self.student_sampler()
        return {"method": config.method, "steps": config.steps, "shift": config.shift,
                "guidance_scale": config.guidance_scale, "guidance_interval": None}

    def on_fit_start(self) -> None:
        super().on_fit_start()
        teacher = getattr(self.trainer.datamodule, "teacher", None)
        if teacher is None:
            raise ValueError("a distilled student trains on teacher pairs: use data=teacher_pairs (experiment=mnist_distill)")
        if teacher.schedule != self.schedule:
            raise ValueError(f"the teacher's cascade ({teacher.schedule}) differs from this run's ({self.schedule}): the "
                             "student keeps the teacher's stages; set cascade.num_stages and data.image_size to the teacher's")
        if self.method == "consistency":
            self._teacher = teacher.model.to(self.device).eval().requires_grad_(False)
            self._guidance = self.trainer.datamodule.teacher_sampler.guidance_scale

    def batch_loss(self, batch: tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        ends, labels, seeds = batch
        if self.method == "consistency":
            return consistency_loss(self.model, self._teacher, self.schedule, ends[-1], labels, self._generator(),
                                    self.teacher_steps, self._guidance)
        return reflow_loss(self.model, self.schedule, ends, labels, seeds.tolist(), self._generator(), self.time,
                           self.student_steps, self.student_shift)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        teacher = getattr(self.trainer.datamodule, "teacher", None) if self._trainer is not None else None
        checkpoint["pixelflow"]["distillation"] = {"method": self.method, "time": self.time, "student_steps": self.student_steps,
                                                   "student_shift": self.student_shift, "teacher_steps": self.teacher_steps,
                                                   "teacher": None if teacher is None else teacher.source}
