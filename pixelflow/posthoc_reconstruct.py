"""Post-hoc EMA reconstruction (EDM2): any sigma_rel as a least-squares combination of stored EMA snapshots.

A snapshot of the power-function EMA with exponent gamma taken after t updates is the average of the weights
theta(tau) under the profile p(tau) = (gamma + 1) tau^gamma / t^(gamma + 1) on [0, t] (exactly, for the
piecewise-constant weights of a discrete run: see :mod:`pixelflow.training.posthoc_ema`). A weighted sum of
snapshots averages the weights under the same sum of profiles, so the snapshot coefficients x that bring
sum_i x_i p_i closest to a target profile p_r in L2 give the reconstruction sum_i x_i theta_i. The normal
equations A x = b need only the profiles' inner products, which have a closed form: for t_a <= t_b,

    <p_a, p_b> = int_0^{t_a} (g_a+1)(g_b+1) tau^(g_a+g_b) / (t_a^(g_a+1) t_b^(g_b+1)) dtau
               = (g_a+1)(g_b+1) / (g_a+g_b+1) * (t_a / t_b)^(g_b) / t_b.

The relative L2 error of the fitted profile, sqrt(<p_r,p_r> - 2 x.b + x'Ax) / |p_r|, says how well the
snapshots can represent a target; a sigma_rel whose error exceeds :data:`MAX_PROFILE_ERROR` is refused with the
range that they can represent.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from pixelflow.atomic import atomic_write_text
from pixelflow.cascade import CascadeSchedule
from pixelflow.checkpoint import export_released_format
from pixelflow.model import PixelFlowTransformer
from pixelflow.training.posthoc_ema import RUN_INFO, SIGMA_REL_MAX, SNAPSHOT_DIR, sigma_rel_to_gamma

__all__ = ["Snapshot", "PosthocEMAError", "Reconstruction", "profile_inner_products", "list_snapshots",
           "solve_coefficients", "profile_error", "usable_sigma_rel_range", "reconstruct", "reconstruct_state",
           "export_reconstruction", "MAX_PROFILE_ERROR", "export_dir_name"]

MAX_PROFILE_ERROR = 0.05  # relative L2 error of the fitted EMA profile above which a sigma_rel is refused


class PosthocEMAError(ValueError):
    """Snapshots missing or unusable, or a sigma_rel they cannot represent (the message says what to do)."""


@dataclass(frozen=True)
class Snapshot:
    """One stored EMA: its file, sigma_rel, exponent, optimizer step and EMA update count t."""

    path: Path
    sigma_rel: float
    gamma: float
    step: int
    t: int


@dataclass(frozen=True)
class Reconstruction:
    """The solve for one target: the snapshots used, their coefficients, the profile fit's relative error."""

    sigma_rel: float
    step: int
    t: int
    snapshots: list[Snapshot]
    coefficients: np.ndarray
    profile_error: float


def profile_inner_products(t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray) -> np.ndarray:
    """<p_a, p_b> of power-function EMA profiles (float64, broadcasting): see the module docstring."""
    t_a, g_a, t_b, g_b = (np.asarray(v, dtype=np.float64) for v in (t_a, gamma_a, t_b, gamma_b))
    short, long_ = np.minimum(t_a, t_b), np.maximum(t_a, t_b)
    g_long = np.where(t_a <= t_b, g_b, g_a)  # the exponent of the profile that ends later
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * (short / long_) ** g_long / long_


def list_snapshots(run_dir: str | Path) -> list[Snapshot]:
    """Every snapshot in ``<run_dir>/posthoc_ema/``, by step then sigma_rel (read from each file's metadata)."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    files = sorted(folder.glob("*.safetensors")) if folder.is_dir() else []
    if not files:
        raise PosthocEMAError(f"no post-hoc EMA snapshots in {folder}: train with the post-hoc EMA callback "
                              "(+callbacks/posthoc_ema=edm2, on in experiment=mnist_quickstart) and pass that run's directory")
    snapshots = []
    for path in files:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        try:
            snapshots.append(Snapshot(path, float(meta["sigma_rel"]), float(meta["gamma"]), int(meta["step"]), int(meta["t"])))
        except (KeyError, ValueError) as err:
            raise PosthocEMAError(f"{path} is not a post-hoc EMA snapshot (metadata {meta}); move it out of {folder}") from err
    return sorted(snapshots, key=lambda s: (s.step, s.sigma_rel))


def _select(snapshots: list[Snapshot], step: int | None) -> list[Snapshot]:
    steps = sorted({s.step for s in snapshots})
    step = steps[-1] if step is None else int(step)
    if step not in steps:
        raise PosthocEMAError(f"no snapshot at step {step}; the snapshots are at steps {steps[0]}..{steps[-1]} "
                              f"({len(steps)} steps, e.g. {steps[-3:]}); pass one of those as step=")
    used = [s for s in snapshots if s.step <= step and s.t > 0]
    if len({s.t for s in used if s.step == step}) != 1:
        raise PosthocEMAError(f"the snapshots at step {step} disagree on the update count t; they come from different runs")
    return used


def solve_coefficients(snapshots: list[Snapshot], sigma_rel: float, t: int) -> tuple[np.ndarray, float]:
    """Least-squares coefficients of ``snapshots`` for the profile of ``sigma_rel`` ending at update ``t``, and the
    fit's relative L2 error."""
    gamma = sigma_rel_to_gamma(sigma_rel)
    ts = np.array([s.t for s in snapshots], dtype=np.float64)
    gs = np.array([s.gamma for s in snapshots], dtype=np.float64)
    gram = profile_inner_products(ts[:, None], gs[:, None], ts[None, :], gs[None, :])
    target = profile_inner_products(ts, gs, float(t), gamma)
    x = np.linalg.lstsq(gram, target, rcond=None)[0]
    norm = float(profile_inner_products(t, gamma, t, gamma))
    residual = max(norm - 2 * float(x @ target) + float(x @ gram @ x), 0.0)
    return x, float(np.sqrt(residual / norm))


def profile_error(snapshots: list[Snapshot], sigma_rel: float, t: int) -> float:
    """How far (relative L2) the best combination of ``snapshots`` is from the profile of ``sigma_rel`` at ``t``."""
    return solve_coefficients(snapshots, sigma_rel, t)[1]


def usable_sigma_rel_range(snapshots: list[Snapshot], t: int, max_error: float = MAX_PROFILE_ERROR) -> tuple[float, float] | None:
    """The sigma_rel interval (on a fine log grid) that ``snapshots`` represent within ``max_error`` at ``t``."""
    grid = np.geomspace(0.005, SIGMA_REL_MAX * (1 - 1e-12), 240)
    ok = [float(s) for s in grid if profile_error(snapshots, float(s), t) <= max_error]
    return (min(ok), max(ok)) if ok else None


def reconstruct(run_dir: str | Path, sigma_rel: float, step: int | None = None,
                max_error: float = MAX_PROFILE_ERROR) -> Reconstruction:
    """Solve for ``sigma_rel`` at the snapshot step ``step`` (default the newest) from the snapshots up to it."""
    used = _select(list_snapshots(run_dir), step)
    last = max(s.step for s in used)
    t = next(s.t for s in used if s.step == last)
    try:
        sigma_rel_to_gamma(float(sigma_rel))
    except ValueError as err:
        raise PosthocEMAError(str(err)) from err
    x, error = solve_coefficients(used, float(sigma_rel), t)
    if error > max_error:
        span = usable_sigma_rel_range(used, t, max_error)
        usable = f"{span[0]:.3f}-{span[1]:.3f}" if span else "none"
        raise PosthocEMAError(f"sigma_rel={sigma_rel} cannot be represented by the {len(used)} snapshots up to step {last} "
                              f"(tracked sigma_rel {sorted({s.sigma_rel for s in used})}): the best combination's EMA profile "
                              f"is {error:.1%} off (limit {max_error:.0%}). Usable sigma_rel range at this step: {usable}")
    return Reconstruction(float(sigma_rel), last, t, used, x, error)


def reconstruct_state(solution: Reconstruction) -> dict[str, torch.Tensor]:
    """The weighted sum of the snapshots, accumulated in float64 one tensor at a time, returned in float32."""
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(s.path, framework="pt")) for s in solution.snapshots]
        keys = list(handles[0].keys())
        for h, s in zip(handles, solution.snapshots):
            if set(h.keys()) != set(keys):
                raise PosthocEMAError(f"{s.path} holds other tensors than {solution.snapshots[0].path}: mixed runs")
        state = {}
        for key in keys:
            total = torch.zeros_like(handles[0].get_tensor(key), dtype=torch.float64)
            for h, coefficient in zip(handles, solution.coefficients):
                total.add_(h.get_tensor(key).double(), alpha=float(coefficient))
            state[key] = total.float()
        return state


def _run_info(run_dir: Path) -> dict[str, Any]:
    path = run_dir / SNAPSHOT_DIR / RUN_INFO
    if not path.is_file():
        raise PosthocEMAError(f"{path} is missing: it is written when a run with the post-hoc EMA callback starts")
    return json.loads(path.read_text())


def export_dir_name(sigma_rel: float, step: int) -> str:
    """``sigma_rel<value>_step<7 digits>``: the default export folder under ``<run>/posthoc_exports/``."""
    return f"sigma_rel{float(sigma_rel)!r}_step{step:07d}"


def export_reconstruction(run_dir: str | Path, sigma_rel: float, out_dir: str | Path | None = None,
                          step: int | None = None) -> Path:
    """Reconstruct ``sigma_rel`` and write it in the released layout (model.pt, model.safetensors, config.yaml with a
    ``posthoc_ema`` entry: sigma_rel, step, t, snapshots, profile_error). Returns the ``model.pt`` path."""
    run_dir = Path(run_dir)
    solution = reconstruct(run_dir, sigma_rel, step)
    info = _run_info(run_dir)
    with torch.device("meta"):
        model = PixelFlowTransformer(**info["model"])
    model = model.to_empty(device="cpu")
    model.load_state_dict(reconstruct_state(solution), strict=True)
    out = Path(out_dir) if out_dir is not None else run_dir / "posthoc_exports" / export_dir_name(sigma_rel, solution.step)
    path = export_released_format(model.eval(), CascadeSchedule(**info["schedule"]), out, info.get("class_names"))
    config = OmegaConf.load(out / "config.yaml")
    config.posthoc_ema = {"sigma_rel": solution.sigma_rel, "step": solution.step, "t": solution.t,
                          "snapshots": len(solution.snapshots), "profile_error": solution.profile_error}
    atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(config))
    return path
