"""Sampler sweeps: every combination of sampler settings generated and scored, one resumable cell each.

``OUT/cells/<cell name>/`` (the name spells the cell's settings) holds the samples (through
:func:`pixelflow.sampling.generate.generate`, resumable by shards), ``generation.json`` (model calls and seconds
per image, written when generation finishes), ``metrics.json`` (:mod:`pixelflow.metrics`) and
``result.json``, written atomically last: a restarted sweep skips every cell that has one. Every cell
uses the same per-sample seeds, so cells differ only by their sampler settings. ``OUT/sweep.json``
records the fixed settings (checkpoint, reference, seed, Dopri5's tolerances, ...); a restart with other ones is refused.
With ``compile``, the network is compiled once for the cells still to run, before the first of them;
the compile time goes to ``OUT/compile.json``, not into any cell's seconds per image.
Where the sweep has a Dopri5 cell, every cell of its guidance and sample count also reports its images' distance
to Dopri5's (:func:`add_distance_to_dopri5`): the methods draw the same noise for an image.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from lightning.fabric import Fabric

from pixelflow.checkpoint import LoadedModel, load_pixelflow
from pixelflow.metrics.evaluation import EvalOptions, evaluate, write_metrics
from pixelflow.metrics.io import load_image_set
from pixelflow.metrics.references import default_num_ref, is_mnist_reference, resolve_reference
from pixelflow.sampling.call_counter import CallCounter
from pixelflow.sampling.choice import choose_sampler
from pixelflow.sampling.compile import batch_sizes, compile_loaded
from pixelflow.sampling.generate import SHARD_DIR, finished_indices, generate
from pixelflow.sampling.samplers import SamplerConfig
from pixelflow.sampling.sweep_report import write_report

__all__ = ["SweepError", "AXES", "Cell", "SweepOptions", "build_cells", "eval_options", "reference_scorer", "run_cell",
           "run_sweep", "sweep_from_config", "DISTANCE_TO_DOPRI5", "add_distance_to_dopri5"]

logger = logging.getLogger(__name__)

Scorer = Callable[[Path], dict[str, Any]]  # samples.npz -> an evaluate() result (metrics, unavailable, ...)

AXES = ("method", "steps", "guidance_scale", "shift", "guidance_interval")  # the sampler settings a sweep may vary


class SweepError(ValueError):
    """A sweep setting or output folder that cannot be used as given (the message says how to fix it)."""


@dataclass(frozen=True)
class Cell:
    """One combination of sampler settings, sampled ``num_samples`` times."""

    sampler: SamplerConfig
    num_samples: int

    @property
    def method(self) -> str:
        return self.sampler.method

    @property
    def name(self) -> str:
        """The cell's folder name, e.g. ``euler_steps8_guidance5_shift1_giall_n100``."""
        s = self.sampler
        steps = "-".join(map(str, s.steps)) if isinstance(s.steps, tuple) else str(s.steps)
        gi = "all" if s.guidance_interval is None else "-".join(f"{v:g}" for v in s.guidance_interval)
        return f"{s.method}_steps{steps}_guidance{s.guidance_scale:g}_shift{s.shift:g}_gi{gi}_n{self.num_samples}"

    def settings(self) -> dict[str, Any]:
        """The swept settings as JSON values (tuples as lists), as stored in ``result.json``."""
        values = {axis: getattr(self.sampler, axis) for axis in AXES} | {"num_samples": self.num_samples}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}


@dataclass
class SweepOptions:
    """Settings shared by every cell."""

    batch_size: int = 16
    seed: int = 0
    classes: list[int] | None = None
    precision: str = "auto"
    compile: bool = False  # torch.compile the network once, for every shape the cells still to run need
    fixed: dict[str, Any] = field(default_factory=dict)  # further settings that must not change on a restart


def _as_list(values: Any, name: str) -> list:
    values = list(values) if isinstance(values, Sequence) and not isinstance(values, str) else [values]
    if not values:
        raise SweepError(f"{name} is an empty list: give at least one value, e.g. '{name}=[...]'")
    return values


def _axis(base: SamplerConfig, axes: Mapping[str, Any], name: str) -> list:
    """The values of axis ``name`` (a scalar counts as a one-entry list; unset: the base preset's value)."""
    values = axes.get(name)
    if values is None:
        return [getattr(base, name)]
    values = _as_list(values, f"axes.{name}")
    if name == "steps":  # an entry is an int or a per-stage list
        return [tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v for v in values]
    if name == "guidance_interval":
        for value in values:
            if value is not None and not (isinstance(value, Sequence) and not isinstance(value, str) and len(value) == 2):
                raise SweepError(f"axes.guidance_interval entries must be null or [lo, hi], got {value!r}; one interval "
                                 "is written 'axes.guidance_interval=[[0.1,0.9]]' (a list of intervals)")
        return [None if v is None else tuple(v) for v in values]
    return values


def build_cells(base: SamplerConfig, axes: Mapping[str, Any], num_samples: Any, num_stages: int) -> list[Cell]:
    """Every combination of the ``axes`` lists (keys from :data:`AXES`) and sample counts; other settings are ``base``'s.

    ``steps`` entries are an int or a per-stage list (``axes.steps=[[10,20,30,30],8]``); ``guidance_interval``
    entries are null or ``[lo, hi]``. Dopri5 gets one cell per guidance scale / interval / sample count, named with
    the first ``steps`` and ``shift`` (it uses neither). Every cell's settings are checked by :class:`SamplerConfig`.
    """
    unknown = sorted(set(axes) - set(AXES))
    if unknown:
        raise SweepError(f"axes {unknown} cannot be swept; the axes are {list(AXES)} (other settings: sampler=PRESET)")
    values = {name: _axis(base, axes, name) for name in AXES}
    values["num_samples"] = [int(n) for n in _as_list(num_samples, "num_samples")]
    for name, entries in values.items():
        repeated = sorted({str(v) for v in entries if entries.count(v) > 1})
        if repeated:
            raise SweepError(f"{name} lists {', '.join(repeated)} more than once; give each value once")
    if min(values["num_samples"]) < 2:
        raise SweepError(f"num_samples must be >= 2 (FID needs at least 2 images), got {values['num_samples']}")
    cells = []
    for combo in itertools.product(*values.values()):
        settings = dict(zip(values, combo))
        n = settings.pop("num_samples")
        if settings["method"] == "dopri5":  # adaptive, on each stage's own time: steps and shift unused
            settings |= {"steps": values["steps"][0], "shift": values["shift"][0]}
        try:
            sampler = replace(base, **settings)
            sampler.stage_steps(num_stages)
        except ValueError as err:
            raise SweepError(f"sampler settings {settings}: {err}") from err
        cells.append(Cell(sampler, n))
    cells = list(dict.fromkeys(cells))
    names = [c.name for c in cells]
    if len(set(names)) != len(names):
        raise SweepError("two cells share a folder name (values equal to 6 significant digits); make the values differ more")
    return cells


def eval_options(ref: str, inception: str | bool = "auto", classifier: str | bool = "auto", num_ref: Any = "auto",
                 **kwargs: Any) -> EvalOptions:
    """Scoring options: ``auto`` scores MNIST references with the MNIST classifier only (fast), others with Inception."""
    for name, value in (("inception", inception), ("classifier", classifier)):
        if value not in ("auto", True, False):
            raise SweepError(f"{name}={value!r}: use auto, true or false")
    mnist = is_mnist_reference(ref)
    return EvalOptions(inception=not mnist if inception == "auto" else bool(inception),
                       classifier=mnist if classifier == "auto" else bool(classifier),
                       num_ref=default_num_ref(ref, num_ref), **kwargs)


def reference_scorer(ref: str, opts: EvalOptions) -> Scorer:
    """Score a cell's ``samples.npz`` against ``ref`` (read once) with :func:`pixelflow.metrics.evaluation.evaluate`."""
    reference = resolve_reference(ref)
    return lambda samples: evaluate(load_image_set(samples), reference, opts)


def _generate_measured(loaded: LoadedModel, counter: CallCounter, cell: Cell, cell_dir: Path, opts: SweepOptions,
                       fabric: Fabric) -> dict[str, Any]:
    """Generate the cell's samples (resuming its shards); model calls and seconds per image of what this run made."""
    path = cell_dir / "generation.json"
    if path.is_file():
        return json.loads(path.read_text())
    shards = cell_dir / SHARD_DIR
    done = len(finished_indices(shards)) if shards.is_dir() else 0
    if done >= cell.num_samples:  # generated, but killed before its measurement was written: measure again
        shutil.rmtree(cell_dir)
        done = 0
    counter.reset()
    start = time.perf_counter()
    generate(replace(loaded, model=counter), cell.sampler, cell_dir, cell.num_samples,
             opts.batch_size, opts.seed, opts.classes, save_png=False, fabric=fabric, precision=opts.precision)
    seconds = time.perf_counter() - start
    images = cell.num_samples - done
    measured = {"model_calls_per_image": counter.rows / images, "seconds_per_image": seconds / images,
                "images_measured": images, "forward_calls": counter.calls}
    write_metrics(measured, path)
    return measured


def run_cell(loaded: LoadedModel, counter: CallCounter, cell: Cell, cell_dir: Path, score: Scorer, opts: SweepOptions,
             fabric: Fabric) -> dict[str, Any]:
    """Generate, measure and score one cell; returns (and atomically writes) its ``result.json`` content."""
    measured = _generate_measured(loaded, counter, cell, cell_dir, opts, fabric)
    scored = score(cell_dir / "samples.npz")
    write_metrics(scored, cell_dir / "metrics.json")
    result = {"name": cell.name, "settings": cell.settings(), **measured, "metrics": scored["metrics"],
              "unavailable": scored["unavailable"]}
    write_metrics(result, cell_dir / "result.json")
    return result


def _check_fixed(path: Path, fixed: dict[str, Any]) -> None:
    fixed = json.loads(json.dumps(fixed))  # as stored
    if path.is_file():
        before = json.loads(path.read_text())
        changed = [f"{k}: {before.get(k)!r} then, {fixed.get(k)!r} now" for k in sorted(set(before) | set(fixed))
                   if before.get(k) != fixed.get(k)]
        if changed:
            raise SweepError(f"{path.parent} holds a sweep with other fixed settings ({'; '.join(changed)}); its cells "
                             "would not be comparable with new ones. Use a new out_dir, or the same settings to resume")
    else:
        write_metrics(fixed, path)


DISTANCE_TO_DOPRI5 = "pixel_distance_to_dopri5"


def add_distance_to_dopri5(out_dir: Path, cells: list[Cell], results: list[dict[str, Any]]) -> None:
    """Add to each result, in place, the mean absolute difference (0-255 levels) of its images from the Dopri5 cell's
    with the same guidance and sample count, image by image; cells without such a Dopri5 cell get none.

    Every cell samples from the same per-sample seeds, and every method draws the same noise for an image from
    its seed (:class:`~pixelflow.sampling.samplers.CascadeNoise`), so this is each method's distance to the
    adaptive solution of the same ODE. It is computed from the samples each time (not stored in ``result.json``).
    """
    group = lambda c: (c.sampler.guidance_scale, c.sampler.guidance_interval, c.num_samples)  # noqa: E731
    references = {group(c): out_dir / "cells" / c.name / "samples.npz" for c in cells if c.method == "dopri5"}
    for cell, result in zip(cells, results, strict=True):
        reference = references.get(group(cell))
        if reference is None:
            continue
        result["metrics"][DISTANCE_TO_DOPRI5] = _mean_abs_difference(out_dir / "cells" / cell.name / "samples.npz", reference)


def _mean_abs_difference(first: Path, second: Path, batch: int = 256) -> float:
    """Mean |first - second| over two sample files of the same images, streamed a batch at a time (exact integer sums)."""
    total = count = 0
    for a, b in zip(load_image_set(first).read(batch), load_image_set(second).read(batch), strict=True):
        total += int(np.abs(a.astype(np.int16) - b).sum(dtype=np.int64))
        count += a.size
    return total / count


def run_sweep(loaded: LoadedModel, cells: list[Cell], out_dir: str | Path, score: Scorer, opts: SweepOptions,
              fabric: Fabric | None = None, on_cell_done: Callable[[Cell, dict[str, Any]], None] | None = None
              ) -> list[dict[str, Any]]:
    """Run every cell not finished yet (no ``result.json``); returns all cells' results in the order of ``cells``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tolerances = {(c.sampler.atol, c.sampler.rtol) for c in cells}
    if len(tolerances) != 1:
        raise SweepError(f"the cells of one sweep share Dopri5's atol and rtol; these have {sorted(tolerances)}")
    [(atol, rtol)] = tolerances
    shared = {k: v for k, v in asdict(opts).items() if k != "fixed"}
    _check_fixed(out_dir / "sweep.json", {**shared, "atol": atol, "rtol": rtol, **opts.fixed, "checkpoint": loaded.source})
    fabric = fabric or Fabric(accelerator="auto", devices=1)
    todo = [c for c in cells if not (out_dir / "cells" / c.name / "result.json").is_file()]
    if opts.compile and todo:
        sizes = set().union(*(batch_sizes(c.num_samples, opts.batch_size) for c in todo))
        loaded, seconds = compile_loaded(loaded, [c.sampler for c in todo], sizes, fabric.device, opts.precision)
        write_metrics({"compile_seconds": seconds, "cells": [c.name for c in todo]}, out_dir / "compile.json")
    counter = CallCounter(loaded.model)
    results = []
    for i, cell in enumerate(cells):
        cell_dir = out_dir / "cells" / cell.name
        done = cell_dir / "result.json"
        if done.is_file():
            result = json.loads(done.read_text())
            logger.info("cell %d/%d %s: finished before, skipped", i + 1, len(cells), cell.name)
        else:
            logger.info("cell %d/%d %s", i + 1, len(cells), cell.name)
            result = run_cell(loaded, counter, cell, cell_dir, score, opts, fabric)
        results.append(result)
        if on_cell_done is not None:
            on_cell_done(cell, result)
    add_distance_to_dopri5(out_dir, cells, results)
    return results


def sweep_from_config(c: Mapping[str, Any], on_cell_done: Callable[[Cell, dict], None] | None = None,
                      sampler_overrides: Sequence[str] = ()) -> list[Path]:
    """Run the sweep a resolved ``conf/sweep_sampler.yaml`` describes (finishing only missing cells) and write its
    report; returns the report's paths (results.csv, results.md, then the plots). The cells' base settings are
    the checkpoint's recorded sampler unless the command line (``sampler_overrides``) names a preset, as in
    ``sample.py`` (:func:`~pixelflow.sampling.choice.choose_sampler`)."""
    if not c["out_dir"] or not c["ref"]:
        raise SweepError("both out_dir= and ref= are required, e.g. `python scripts/sweep_sampler.py out_dir=sweeps/a ref=mnist_test`")
    SamplerConfig.from_mapping(c["sampler"])  # a bad preset fails before the checkpoint loads
    loaded = load_pixelflow(c["ckpt"], c["config"], allow_download=c["allow_download"], ema=c["ema"])
    base = choose_sampler(c["sampler"], loaded.sampler, sampler_overrides)[0]
    cells = build_cells(base, c["axes"] or {}, c["num_samples"], loaded.schedule.num_stages)
    ref = str(c["ref"])
    evals = eval_options(ref, c["inception"], c["classifier"], c["num_ref"], batch_size=c["eval_batch_size"],
                         device=c["eval_device"], inception_weights=c["inception_weights"], cache_dir=c["cache_dir"],
                         kid=bool(c["kid"]))
    fixed = {"ref": ref, "ema": c["ema"], "inception": evals.inception, "classifier": evals.classifier,
             "num_ref": evals.num_ref, "inception_weights": evals.inception_weights, "kid": evals.kid}
    opts = SweepOptions(batch_size=c["batch_size"], seed=c["seed"], classes=c["classes"], precision=c["precision"],
                        compile=bool(c["compile"]), fixed=fixed)
    fabric = Fabric(accelerator=c["accelerator"], devices=1)
    results = run_sweep(loaded, cells, c["out_dir"], reference_scorer(ref, evals), opts, fabric, on_cell_done)
    return write_report(c["out_dir"], results)
