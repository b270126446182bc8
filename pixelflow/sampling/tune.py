"""Tuning pass: sampler sweeps over several EMAs (post-hoc sigma_rel reconstructions and exports), one report.

Each EMA is a *candidate*: a ``sigma_rel`` of a run with post-hoc EMA snapshots (reconstructed on first use into
``OUT/exports/sigma_rel<value>_step<step>/`` and reused from there), or an export given by path (e.g. the run's
fixed-rate ``export/model.pt``). Every candidate gets the same sampler sweep (:mod:`pixelflow.sampling.sweep`) in
``OUT/candidates/<label>/`` (resumable cell by cell, with its own tables and plots); :mod:`.tune_report` then
writes the combined table, the unguided-vs-best-guided summary, metric vs sigma_rel, and the best settings as a
``conf/sampler``-style preset (``OUT/sampler/tuned.yaml``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lightning.fabric import Fabric

from pixelflow.checkpoint import load_pixelflow
from pixelflow.posthoc_reconstruct import export_dir_name, export_reconstruction, reconstruct
from pixelflow.sampling.samplers import SamplerConfig
from pixelflow.sampling.sweep import SweepError, SweepOptions, build_cells, eval_options, reference_scorer, run_sweep
from pixelflow.sampling.sweep_report import write_report
from pixelflow.sampling.tune_report import write_tune_report

__all__ = ["Candidate", "candidates", "with_unguided", "tune_from_config"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Candidate:
    """One set of weights to tune the sampler for: its label (folder name), export path and sigma_rel (None: an export)."""

    label: str
    path: Path
    sigma_rel: float | None = None


def candidates(run: str | Path | None, sigma_rels: list[float], step: int | None, exports: list[str],
               export_cache: Path) -> list[Candidate]:
    """The sigma_rel reconstructions of ``run`` (cached in ``export_cache``) and the given ``exports``, in that order."""
    if sigma_rels and not run:
        raise SweepError("sigma_rel values need run=<run directory> (the one with posthoc_ema/ snapshots)")
    if not sigma_rels and not exports:
        raise SweepError("nothing to tune: give sigma_rel=[...] with run=..., and/or exports=[path/to/model.pt, ...]")
    out = []
    for sigma_rel in dict.fromkeys(float(s) for s in sigma_rels):
        solution = reconstruct(run, sigma_rel, step)  # refuses an unrepresentable sigma_rel before any export
        folder = export_cache / export_dir_name(sigma_rel, solution.step)
        if not (folder / "model.pt").is_file():
            logger.info("reconstructing sigma_rel %s at step %d into %s", sigma_rel, solution.step, folder)
            export_reconstruction(run, sigma_rel, folder, step)
        out.append(Candidate(folder.name, folder / "model.pt", sigma_rel))
    for i, export in enumerate(exports):
        path = Path(export).expanduser()
        label = f"export{i}_{path.parent.name}_{path.stem}"
        out.append(Candidate(label, path))
    return out


def with_unguided(base: SamplerConfig, axes: Mapping[str, Any]) -> dict[str, Any]:
    """``axes`` with guidance scale 1 among its guidance scales: every EMA's unguided cell is always measured."""
    scales = axes.get("guidance_scale")
    scales = [base.guidance_scale] if scales is None else list(scales) if isinstance(scales, (list, tuple)) else [scales]
    if 1 not in scales:
        logger.info("adding guidance_scale 1 to %s: every EMA's unguided cell goes beside its guided ones", scales)
        scales = [1, *scales]
    return {**axes, "guidance_scale": scales}


def tune_from_config(c: Mapping[str, Any]) -> list[Path]:
    """Run the tuning pass a resolved ``conf/tune.yaml`` describes; returns the combined report's paths."""
    if not c["out_dir"] or not c["ref"]:
        raise SweepError("both out_dir= and ref= are required, e.g. `python scripts/tune.py out_dir=tune/a ref=mnist_test ...`")
    out = Path(c["out_dir"])
    todo = candidates(c["run"], list(c["sigma_rel"] or []), c["step"], list(c["exports"] or []), out / "exports")
    base = SamplerConfig.from_mapping(c["sampler"])
    ref = str(c["ref"])
    evals = eval_options(ref, c["inception"], c["classifier"], c["num_ref"], batch_size=c["eval_batch_size"],
                         device=c["eval_device"], inception_weights=c["inception_weights"], cache_dir=c["cache_dir"],
                         protocol=c["protocol"])
    fixed = {"ref": ref, "inception": evals.inception, "classifier": evals.classifier, "num_ref": evals.num_ref,
             "inception_weights": evals.inception_weights, "protocol": evals.protocol}
    opts = SweepOptions(batch_size=c["batch_size"], seed=c["seed"], classes=c["classes"], precision=c["precision"],
                        fixed=fixed)
    fabric = Fabric(accelerator=c["accelerator"], devices=1)
    score = reference_scorer(ref, evals)
    results = []
    axes = with_unguided(base, c["axes"] or {})
    for candidate in todo:
        loaded = load_pixelflow(candidate.path)
        cells = build_cells(base, axes, c["num_samples"], loaded.schedule.num_stages)
        folder = out / "candidates" / candidate.label
        logger.info("candidate %s (%s): %d cell(s)", candidate.label, candidate.path, len(cells))
        found = run_sweep(loaded, cells, folder, score, opts, fabric)
        write_report(folder, found)
        results += [{**r, "candidate": candidate.label, "sigma_rel": candidate.sigma_rel, "checkpoint": str(candidate.path)}
                    for r in found]
    return write_tune_report(out, results, asdict(base), c["metric"])
