"""What the class- and text-to-image golden checks share: loading, the error measure, the bounds and the report."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pixelflow.golden.sensitivity import describe_bound, sensitivity_bound
from pixelflow.model import PixelFlowTransformer
from pixelflow.sampling.samplers import SamplerConfig

__all__ = ["TOLERANCES", "CheckResult", "max_abs_error", "require_files", "read_json", "load_golden_model",
           "sampler_config", "report"]

# Max abs error allowed per group (the *_calls groups: model evaluations per stage, which must match exactly).
# forward / scheduler / targets / euler are well-conditioned: a re-implementation matches them to float
# rounding, so they keep tight fixed bounds. dopri5 is the floor of a bound measured on each folder
# (pixelflow.golden.sensitivity): its results move with float rounding far more than the others.
TOLERANCES = {"forward": 5e-6, "scheduler": 1e-6, "targets": 1e-6, "euler": 1e-5, "dopri5": 2e-3,
              "euler_calls": 0, "dopri5_calls": 0}


@dataclass(frozen=True)
class CheckResult:
    """One compared quantity; ``sensitivity`` (measured rounding sensitivity) widens its group's bound."""

    name: str
    group: str
    error: float
    sensitivity: float | None = None

    @property
    def tolerance(self) -> float:
        floor = TOLERANCES[self.group]
        return floor if self.sensitivity is None else sensitivity_bound(floor, self.sensitivity)

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.error)) and self.error <= self.tolerance


def max_abs_error(a: Any, b: Any) -> float:
    """Max abs difference in float64; inf when the shapes differ (a wrong shape never passes)."""
    a = torch.as_tensor(np.asarray(a), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(b), dtype=torch.float64)
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).abs().max()) if a.numel() else 0.0


def require_files(root: Path, names: list[str], layout: str) -> None:
    """Raise FileNotFoundError naming every file of ``names`` missing from the golden folder ``root``."""
    missing = [n for n in names if not (root / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{root} is not a complete golden folder: {', '.join(missing)} missing "
                                f"(the layout is described in {layout})")


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def load_golden_model(constructor: dict[str, Any], forward: np.lib.npyio.NpzFile) -> PixelFlowTransformer:
    """The model built from ``constructor`` with the golden ``param/<name>`` weights (strict: every key must match)."""
    model = PixelFlowTransformer(**constructor).eval()
    params = {k[len("param/"):]: torch.from_numpy(forward[k]) for k in forward.files if k.startswith("param/")}
    model.load_state_dict(params, strict=True)
    return model


def sampler_config(method: str, steps: list[int], shift: float, guidance: float) -> SamplerConfig:
    """The sampler options of a golden run (the only place the golden checks build a SamplerConfig)."""
    return SamplerConfig(method=method, steps=steps, shift=shift, guidance_scale=guidance)


def report(results: list[CheckResult]) -> int:
    """Print one row per check (max abs error, bound, measured sensitivity where used); 0 only if all pass."""
    width = max(len(r.name) for r in results)
    measured = sorted({r.group for r in results if r.sensitivity is not None})
    for group in measured:
        print(describe_bound(TOLERANCES[group]))
    print(f"{'other' if measured else 'all'} rows: fixed bounds; model-call counts must match exactly")
    print(f"{'check':<{width}}  {'max abs err':>12}  {'bound':>10}  {'sensitivity':>11}  result")
    for r in results:
        sensitivity = "-" if r.sensitivity is None else f"{r.sensitivity:.3e}"
        print(f"{r.name:<{width}}  {r.error:>12.3e}  {r.tolerance:>10.3e}  {sensitivity:>11}  "
              f"{'PASS' if r.passed else 'FAIL'}")
    failed = [r for r in results if not r.passed]
    print(f"checks: {len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0
