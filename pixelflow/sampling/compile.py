"""Opt-in ``torch.compile`` of the network for sampling, every shape it will see compiled before sampling starts.

A sampler calls the network at each stage's side with B rows (guidance weight 1) or 2B rows (guided).
:func:`sampling_shapes` lists those (rows, side) pairs for given samplers and batch sizes;
:func:`compile_for_sampling` compiles for static shapes and runs the network once at each of them (under
the sampling precision, which the compiled graphs depend on), so the compile time is spent and reported
up front and sampling afterwards runs at steady state. A shape not listed compiles when it first comes.
The network call is generic: ``example_inputs`` builds its arguments for a row count and side, so a
text-to-image caller passes its text states the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import torch

from pixelflow.cascade import CascadeSchedule
from pixelflow.checkpoint import LoadedModel
from pixelflow.precision import resolve_precision, sampling_precision
from pixelflow.sampling.samplers import SamplerConfig

__all__ = ["ExampleInputs", "class_inputs", "batch_sizes", "sampling_shapes", "compile_for_sampling", "compile_loaded"]

logger = logging.getLogger(__name__)

# (rows, side, device) -> (args, kwargs) of one network call
ExampleInputs = Callable[[int, int, torch.device], tuple[tuple[Any, ...], dict[str, Any]]]


def class_inputs(model: torch.nn.Module) -> ExampleInputs:
    """A class-to-image network's call ``model(x, None, class_labels=, modulation=)``, laid out as the samplers pass it."""
    if getattr(model, "cross_attention_dim", None):
        raise ValueError("compile=true warms class-to-image shapes only; this is a text-to-image checkpoint: "
                         "sample it with compile=false")
    def inputs(rows: int, side: int, device: torch.device) -> tuple[tuple[Any, ...], dict[str, Any]]:
        x = torch.zeros(rows, model.in_channels, side, side, device=device)
        labels = torch.zeros(rows, dtype=torch.long, device=device)
        # Samplers pass the adaLN vectors computed ahead for the stage in place of the timestep.
        modulation = model.modulations(torch.full((1,), 500.0, device=device), side // model.patch_size, labels)[0]
        return (x, None), {"class_labels": labels, "modulation": modulation}

    return inputs


def batch_sizes(num_samples: int, batch_size: int) -> set[int]:
    """Sizes of the batches that sampling ``num_samples`` images ``batch_size`` at a time makes."""
    sizes = {min(batch_size, num_samples)}
    if num_samples > batch_size and num_samples % batch_size:
        sizes.add(num_samples % batch_size)
    return sizes


def sampling_shapes(schedule: CascadeSchedule, configs: Iterable[SamplerConfig], sizes: Iterable[int]) -> list[tuple[int, int]]:
    """(rows, side) of every network call the samplers ``configs`` make for batches of ``sizes``."""
    shapes = set()
    sizes = list(sizes)
    for config in configs:
        for stage, side in enumerate(schedule.stage_sides):
            guided = schedule.stage_cfg(config.guidance_scale, stage) != 1.0
            factors = ({1, 2} if config.guidance_interval is not None else {2}) if guided else {1}
            shapes.update((f * b, side) for f in factors for b in sizes)
    return sorted(shapes)


def compile_for_sampling(model: torch.nn.Module, shapes: Iterable[tuple[int, int]], precision: str = "fp32",
                         example_inputs: ExampleInputs | None = None, mode: str | None = None,
                         room: int = 8) -> tuple[torch.nn.Module, float]:
    """``torch.compile(model)`` run once at every (rows, side) in ``shapes``; returns it and the seconds that took.

    ``room``: how many further shapes may compile later (past dynamo's graph limit it silently runs eager).
    The compiled module forwards attribute access to ``model``, so a sampler uses it in its place.
    """
    shapes = list(shapes)
    device = next(model.parameters()).device
    inputs = example_inputs or class_inputs(model)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, len(shapes) + room)
    compiled = torch.compile(model, dynamic=False, mode=mode)
    start = time.perf_counter()
    with torch.no_grad(), sampling_precision(precision, device):  # as the samplers run a compiled network
        for rows, side in shapes:
            args, kwargs = inputs(rows, side, device)
            compiled(*args, **kwargs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return compiled, time.perf_counter() - start


def compile_loaded(loaded: LoadedModel, configs: Iterable[SamplerConfig], sizes: Iterable[int], device: torch.device,
                   precision: str = "auto", example_inputs: ExampleInputs | None = None) -> tuple[LoadedModel, float]:
    """``loaded`` with its network moved to ``device`` and compiled for these samplers and batch sizes; and the seconds."""
    model = loaded.model.to(device).eval()
    shapes = sampling_shapes(loaded.schedule, configs, sizes)
    compiled, seconds = compile_for_sampling(model, shapes, resolve_precision(precision, device), example_inputs)
    logger.info("compiled the network for %d sampling shapes in %.1f s (compile time, not part of the sampling speed)",
                len(shapes), seconds)
    return replace(loaded, model=compiled), seconds
