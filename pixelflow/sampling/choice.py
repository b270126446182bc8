"""Which sampler a command uses: a preset, or the one a checkpoint records, with command-line fields on top.

A distilled student records the sampler it was distilled for (method, steps a stage, guidance folded in);
sampling it with another preset's settings would waste its training or break it. So a recorded sampler is
the default for that checkpoint, a preset named on the command line (``sampler=NAME``) still wins, and
single fields given there (``sampler.steps=1``) apply on top of whichever was chosen.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pixelflow.sampling.samplers import SamplerConfig

__all__ = ["choose_sampler"]


def _overridden(overrides: Sequence[str]) -> tuple[bool, list[str]]:
    """(whether ``sampler=NAME`` was given, the ``sampler.<field>`` names set) in Hydra command-line overrides."""
    keys = [item.split("=", 1)[0].lstrip("+~") for item in overrides]
    return "sampler" in keys, [k.split(".", 1)[1] for k in keys if k.startswith("sampler.")]


def choose_sampler(preset: Mapping[str, Any], recorded: Mapping[str, Any] | None,
                   overrides: Sequence[str] = ()) -> tuple[SamplerConfig, str]:
    """(the sampler, where it came from) for a run whose composed ``preset`` (with its overrides applied) and
    checkpoint's ``recorded`` sampler (None: none recorded) are given, under command-line ``overrides``."""
    named, fields = _overridden(overrides)
    if recorded is None or named:
        return SamplerConfig.from_mapping(preset), "the sampler preset"
    values = dict(SamplerConfig.from_mapping(recorded, where="the checkpoint's recorded sampler").__dict__)
    values |= {name: preset[name] for name in fields if name in preset}
    note = "the checkpoint's recorded sampler" + (f" with {', '.join(f'sampler.{f}' for f in fields)} from the command line"
                                                  if fields else "")
    return SamplerConfig.from_mapping(values), note
