"""Consistency distillation within each cascade stage (Song et al. 2023), the teacher's guided ODE as the target.

Stage k's consistency function maps a state at stage-local time t to the stage's end along the teacher's
ODE; with a velocity network it is f(x, t) = x + (1 - t) v(x, t), so one Euler step from t = 0 *is* the
stage's sample. Training draws x_n on the stage's flow-matching path at a grid time t_n = n / N (the images
are the teacher's own samples, so no dataset is needed), takes one guided Euler step of the frozen teacher
to t_{n+1}, and regresses f(x_n, t_n) onto the stop-gradient f(x_{n+1}, t_{n+1}) (at t_{n+1} = 1: x_{n+1}
itself). The error is divided by (1 - t_n)^2, i.e. taken on the implied velocity.
"""

from __future__ import annotations

import torch

from pixelflow.cascade import CascadeSchedule
from pixelflow.prediction import TRAIN_MIN_DIVISOR, convert
from pixelflow.training.objective import cpu_generator

__all__ = ["guided_velocity", "consistency_loss"]


def guided_velocity(model: torch.nn.Module, x: torch.Tensor, timestep: torch.Tensor, labels: torch.Tensor, weight: float,
                    t: torch.Tensor, schedule: CascadeSchedule, stage: int) -> torch.Tensor:
    """v_u + w (v_c - v_u) of ``model`` at per-sample timesteps (B,), as the sampler guides (w == 1: v_c alone)."""
    if weight == 1.0:
        out = model(x, timestep, class_labels=labels)
    else:
        null = torch.full_like(labels, model.null_class)
        uncond, cond = model(torch.cat([x, x]), torch.cat([timestep, timestep]),
                              class_labels=torch.cat([null, labels])).chunk(2)
        out = uncond + weight * (cond - uncond)
    if model.prediction == "v":
        return out
    return convert(out, x, t, schedule.line(stage), model.prediction, "v", TRAIN_MIN_DIVISOR)


def consistency_loss(model: torch.nn.Module, teacher: torch.nn.Module, schedule: CascadeSchedule, images: torch.Tensor,
                     labels: torch.Tensor, generator: torch.Generator | None, teacher_steps: int,
                     guidance_scale: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The consistency-distillation loss of a batch (one stage a sample, every stage equally often) and the
    per-stage terms to log (``stage<k>``). ``teacher_steps`` N must divide the schedule's training timesteps."""
    num = schedule.num_train_timesteps
    if num % teacher_steps:
        raise ValueError(f"teacher_steps={teacher_steps} must divide the {num} training timesteps (e.g. 8, 10, 20)")
    batch, device = labels.shape[0], labels.device
    stages = schedule.balanced_stages(batch, cpu_generator(generator)).to(device)
    n = torch.randint(teacher_steps, (batch,), generator=generator, device=device)
    present = [k for k in range(schedule.num_stages) if (stages == k).any()]
    inputs, timesteps, targets, order = [], [], [], []
    for k in present:
        idx = (stages == k).nonzero(as_tuple=True)[0]
        pair = schedule.training_pair(images[idx], k, n[idx] * (num // teacher_steps), generator=generator)
        t_next = pair.t + 1.0 / teacher_steps
        last = (n[idx] + 1 == teacher_steps).view(-1, 1, 1, 1)
        table = schedule.timestep_tables[k].to(device)
        with torch.no_grad():
            weight = schedule.stage_cfg(guidance_scale, k)
            x_next = pair.x_t + guided_velocity(teacher, pair.x_t, pair.timestep, labels[idx], weight, pair.t, schedule, k) \
                / teacher_steps
            t_next_index = ((n[idx] + 1) * (num // teacher_steps)).clamp(max=num - 1)
            v_next = guided_velocity(model, x_next, table[t_next_index].float(), labels[idx], 1.0, t_next, schedule, k)
            end = torch.where(last, x_next, x_next + (1 - t_next).view(-1, 1, 1, 1) * v_next)
        inputs.append(pair.x_t)
        timesteps.append(pair.timestep)
        targets.append((end - pair.x_t) / (1 - pair.t).view(-1, 1, 1, 1))
        order.append(idx)
    preds = model(inputs, timesteps, class_labels=labels[torch.cat(order)])
    losses, logs = [], {}
    for k, pred, target, x_t, idx in zip(present, preds, targets, inputs, order):
        if model.prediction != "v":
            pred = convert(pred, x_t, (n[idx].double() / teacher_steps).to(x_t.dtype), schedule.line(k), model.prediction,
                           "v", TRAIN_MIN_DIVISOR)
        error = (pred.float() - target.float()).square().mean(dim=(1, 2, 3))
        logs[f"stage{k}"] = error.detach().mean()
        losses.append(error)
    return torch.cat(losses).mean(), logs
