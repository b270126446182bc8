"""Euler sampling of a text-to-image cascade with constant text guidance.

The cascade maths (timestep tables, stage transitions, block noise) come from
:mod:`pixelflow.cascade` and the Euler grid and noise draws from :mod:`pixelflow.samplers`;
only the guided velocity differs from class-to-image: v = v_u + g (v_c - v_u) at EVERY
stage (no stage ramp), the model run on [uncond; cond] text rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from pixelflow.cascade import CascadeSchedule
from pixelflow.samplers import _EULER_T_MAX, CascadeNoise, SampleOutput, SamplerConfig, euler_grid
from pixelflow.text import TextCondition

__all__ = ["sample_text_euler"]


def guided_velocity(model: torch.nn.Module, x: torch.Tensor, timestep: torch.Tensor, text: TextCondition,
                    guidance: float) -> torch.Tensor:
    """v_u + g (v_c - v_u) from one batched forward over [uncond; cond] (cond rows only for g = 1)."""
    batch = x.shape[0]
    if guidance == 1:
        states, mask = text.cond()
        return model(x, timestep.expand(batch), text_states=states, text_mask=mask)
    both = model(torch.cat([x, x]), timestep.expand(2 * batch), text_states=text.states, text_mask=text.mask)
    v_uncond, v_cond = both.chunk(2)
    return v_uncond + guidance * (v_cond - v_uncond)


@torch.no_grad()
def sample_text_euler(
    model: torch.nn.Module,
    schedule: CascadeSchedule,
    text: TextCondition,
    steps: Sequence[int] | int = 30,
    shift: float = 1.0,
    guidance: float = 4.0,
    noise: CascadeNoise | None = None,
    generator: torch.Generator | None = None,
) -> SampleOutput:
    """Generate ``text.batch`` images; draws come from ``noise`` or ``generator``."""
    if not getattr(model, "cross_attention_dim", None):
        raise ValueError("sample_text_euler needs a text-to-image model (built with cross_attention_dim)")
    per_stage = SamplerConfig(method="euler", steps=steps, shift=shift, cfg=guidance).validate(schedule.num_stages)
    device = next(model.parameters()).device
    text = text.to(device)
    if noise is None:
        noise = CascadeNoise.draw(schedule, text.batch, model.in_channels, False, generator, device)
    if noise.init.shape[0] != text.batch:
        raise ValueError(f"noise is for {noise.init.shape[0]} images but the text condition for {text.batch}")
    x = noise.init.to(device)
    finals, nfes = [], []
    for stage in range(schedule.num_stages):
        if stage:
            x = schedule.transition(x, stage, noise.transitions[stage - 1].to(device))
        t = euler_grid(per_stage[stage], shift)
        timesteps = schedule.stage_timestep(stage, t[:-1], _EULER_T_MAX).float().to(device)
        t32 = t.float()
        for n in range(len(timesteps)):
            dt = (t32[n + 1] - t32[n]).item()
            x = x + dt * guided_velocity(model, x, timesteps[n], text, guidance)
        finals.append(x)
        nfes.append(len(timesteps))
    return SampleOutput(images=x, stage_finals=finals, nfe=nfes)
