"""How far float rounding moves this implementation's own adaptive (Dopri5) samples: the yardstick for their bound.

Why: Dopri5's step-size control is ill-conditioned. Its initial-step heuristic and error estimate involve
cancellation, so a change at float-rounding level (another kernel, another CPU) alters the accepted step
sizes, often with the same step counts, and the stage finals then move by orders of magnitude more than the
rounding itself. How far depends on the model, the sizes, the steps and the guidance, so a fixed bound tuned
on one golden folder cannot tell a bug from rounding on another: it either flags rounding there or is loose
everywhere.

The rule: the check re-runs this implementation's Dopri5 sampling :data:`PERTURBATIONS` times with every
entry of the injected noise (initial latent and transition block noise) nudged by one ulp in a random
direction (seeded, so a check is reproducible), and takes, per compared output, the largest change from the
unperturbed run: its *sensitivity* on this folder. That output's bound is
``max(floor, SENSITIVITY_MULTIPLE * sensitivity)``. The multiple covers a few nudges underestimating the
largest change and the golden's rounding (other kernels throughout the run) exceeding a nudge of the inputs;
the floor (the group's fixed bound) covers the same where rounding barely moves the result. Model-call counts
are not relaxed: they must match exactly. A deviation below the bound is beyond what these rows can resolve;
the Euler rows (same model, guidance and noise, no step control) keep their tight fixed bounds and are the fine
check of all that the two paths share.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from pixelflow.sampling.samplers import CascadeNoise

__all__ = ["PERTURBATIONS", "SENSITIVITY_MULTIPLE", "nudge_one_ulp", "nudged_noise", "rounding_sensitivity",
           "sensitivity_bound", "describe_bound"]

PERTURBATIONS = 4
SENSITIVITY_MULTIPLE = 4.0


def nudge_one_ulp(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``x`` with every entry moved to its next float up or down (each direction with probability 1/2)."""
    if not x.is_floating_point():
        raise TypeError(f"only floating-point noise can be nudged by one ulp, got {x.dtype}")
    up = torch.rand(x.shape, generator=generator, device=generator.device).to(x.device) < 0.5
    return torch.nextafter(x, torch.where(up, torch.inf, -torch.inf).to(x.dtype))


def nudged_noise(noise: CascadeNoise, generator: torch.Generator) -> CascadeNoise:
    """Every draw of ``noise`` (initial latent, each transition's block noise) nudged by one ulp."""
    return CascadeNoise(nudge_one_ulp(noise.init, generator), [nudge_one_ulp(z, generator) for z in noise.transitions])


def rounding_sensitivity(
    run: Callable[[CascadeNoise], Sequence[torch.Tensor]], noise: CascadeNoise, reference: Sequence[torch.Tensor],
    perturbations: int = PERTURBATIONS, seed: int = 0,
) -> list[float]:
    """Per output of ``run``: the max abs change from ``reference`` (``run(noise)``) over one-ulp nudged noises."""
    if perturbations < 1:
        raise ValueError(f"perturbations must be >= 1 to measure a sensitivity, got {perturbations}")
    generator = torch.Generator().manual_seed(seed)
    worst = [0.0] * len(reference)
    for _ in range(perturbations):
        outputs = run(nudged_noise(noise, generator))
        if len(outputs) != len(reference):
            raise ValueError(f"run gave {len(outputs)} outputs for a reference of {len(reference)}")
        for i, (out, ref) in enumerate(zip(outputs, reference)):
            worst[i] = max(worst[i], float((out.double() - ref.double()).abs().max()))
    return worst


def sensitivity_bound(floor: float, sensitivity: float) -> float:
    """The bound of an output with measured ``sensitivity``: ``max(floor, SENSITIVITY_MULTIPLE * sensitivity)``."""
    return max(floor, SENSITIVITY_MULTIPLE * sensitivity)


def describe_bound(floor: float) -> str:
    """The rule in words, for the check's printed output."""
    return (f"Dopri5 rows: bound = max({floor:.1e}, {SENSITIVITY_MULTIPLE:g} x sensitivity), where sensitivity = the\n"
            f"  largest change of this implementation's own Dopri5 output when every noise entry is nudged by one ulp\n"
            f"  ({PERTURBATIONS} random nudges): its adaptive step control turns float rounding into changes of that size")
