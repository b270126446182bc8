import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from omegaconf import OmegaConf

from pixelflow.checkpoint import load_pixelflow
from pixelflow.posthoc_reconstruct import (
    PosthocEMAError,
    Reconstruction,
    Snapshot,
    export_reconstruction,
    list_snapshots,
    profile_inner_products,
    reconstruct,
    reconstruct_state,
    solve_coefficients,
)
from pixelflow.training.launch import run_training
from pixelflow.training.posthoc_ema import power_ema_update, sigma_rel_to_gamma
from tests.hydra_utils import compose_config, tiny_train_overrides

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("t_a, g_a, t_b, g_b", [(300, 16.97, 1000, 6.94), (1000, 6.94, 300, 16.97), (50, 0.0, 50, 3.0)])
def test_inner_products_match_numerical_integration(t_a, g_a, t_b, g_b):
    tau = np.linspace(0, min(t_a, t_b), 2_000_001)  # the product is 0 after the shorter profile ends
    profile = lambda t, g: (g + 1) * tau ** g / t ** (g + 1)  # noqa: E731
    numeric = np.trapezoid(profile(t_a, g_a) * profile(t_b, g_b), tau)
    assert profile_inner_products(t_a, g_a, t_b, g_b) == pytest.approx(numeric, rel=1e-9)


def _trajectory(steps=2000, dim=256, seed=0):
    """A small noisy-SGD run on a drifting quadratic: the weights after each update, float64."""
    rng = np.random.default_rng(seed)
    theta, target, out = np.zeros(dim), rng.normal(size=dim), []
    for _ in range(steps):
        target += 0.01 * rng.normal(size=dim)
        theta += 0.02 * (target - theta) + 0.05 * rng.normal(size=dim)
        out.append(theta.copy())
    return np.array(out)


def test_between_profiles_matches_a_directly_tracked_ema():
    """sigma_rel 0.08 from snapshots of 0.05 and 0.10 every 100 of 2,000 updates vs a tracked 0.08 EMA: the error is
    under 0.5% of the distance between the two tracked EMAs (and 0.05 / 0.10 themselves are reproduced exactly)."""
    weights = _trajectory()
    stds = (0.05, 0.10, 0.08)
    emas = [[torch.zeros(weights.shape[1], dtype=torch.float64)] for _ in stds]
    snapshots, stored = [], []
    for t, theta in enumerate(torch.from_numpy(weights), start=1):
        for ema, std in zip(emas, stds):
            power_ema_update(ema, [theta], sigma_rel_to_gamma(std), t)
        if t % 100 == 0:
            for ema, std in zip(emas[:2], stds[:2]):
                snapshots.append(Snapshot(Path(f"{std}_{t}"), std, sigma_rel_to_gamma(std), t, t))
                stored.append(ema[0].clone())
    stack = torch.stack(stored)
    x, error = solve_coefficients(snapshots, 0.08, 2000)
    recon = torch.from_numpy(x) @ stack
    spread = (emas[0][0] - emas[1][0]).norm()
    assert error < 0.01
    assert (recon - emas[2][0]).norm() / spread < 0.005
    for i in (0, 1):
        x, error = solve_coefficients(snapshots, stds[i], 2000)
        torch.testing.assert_close(torch.from_numpy(x) @ stack, emas[i][0], rtol=0, atol=1e-9)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """6 steps of the test model, snapshots of sigma_rel 0.05 and 0.10 every 2 steps."""
    run = tmp_path_factory.mktemp("posthoc") / "run"
    run_training(compose_config("train", tiny_train_overrides(run, 6, ["callbacks.posthoc_ema.snapshot_every=2"])))
    return run


def test_a_tracked_sigma_rel_reproduces_its_snapshot(run_dir):
    solution = reconstruct(run_dir, 0.10)
    assert solution.step == 6 and len(solution.snapshots) == 6 and solution.profile_error < 1e-6
    one_hot = np.array([1.0 if (s.sigma_rel, s.step) == (0.10, 6) else 0.0 for s in solution.snapshots])
    np.testing.assert_allclose(solution.coefficients, one_hot, atol=1e-9)
    snapshot = safetensors.torch.load_file(run_dir / "posthoc_ema" / "0.1_0000006.safetensors")
    state = reconstruct_state(solution)
    for key, value in snapshot.items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-7)


def test_step_picks_the_last_snapshot_used(run_dir):
    solution = reconstruct(run_dir, 0.05, step=4)
    assert solution.step == solution.t == 4 and {s.step for s in solution.snapshots} == {2, 4}
    with pytest.raises(PosthocEMAError, match=r"no snapshot at step 5; the snapshots are at steps 2..6"):
        reconstruct(run_dir, 0.05, step=5)


@pytest.mark.parametrize("sigma_rel", [0.01, 0.25])
def test_unrepresentable_sigma_rel_is_refused_with_the_usable_range(run_dir, sigma_rel):
    with pytest.raises(PosthocEMAError, match=rf"sigma_rel={sigma_rel} cannot be represented .* Usable sigma_rel range "
                                              r"at this step: 0\.0\d\d-0\.1\d\d"):
        reconstruct(run_dir, sigma_rel)
    with pytest.raises(PosthocEMAError, match=r"sigma_rel must be in \(0, 0.2887\]"):
        reconstruct(run_dir, 0.5)


def test_no_snapshots_is_a_clear_error(tmp_path):
    with pytest.raises(PosthocEMAError, match="no post-hoc EMA snapshots in .*callbacks/posthoc_ema=edm2"):
        list_snapshots(tmp_path)


def test_export_loads_like_any_export(run_dir, tmp_path):
    path = export_reconstruction(run_dir, 0.08, tmp_path / "export")
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.yaml", "model.pt", "model.safetensors"]
    config = OmegaConf.load(path.parent / "config.yaml")
    assert config.posthoc_ema.sigma_rel == 0.08 and config.posthoc_ema.step == 6
    loaded = load_pixelflow(path)
    assert loaded.schedule.num_stages == 4 and len(loaded.class_names) == 10
    state = reconstruct_state(reconstruct(run_dir, 0.08))
    assert all(torch.equal(loaded.model.state_dict()[k], v) for k, v in state.items())
    assert load_pixelflow(path.with_name("model.safetensors")).model.state_dict().keys() == state.keys()


@pytest.mark.slow
def test_script_writes_one_export_per_value_and_refuses_bad_ones(run_dir, tmp_path):
    script = [sys.executable, str(ROOT / "scripts" / "posthoc_ema.py"), f"run={run_dir}"]
    done = subprocess.run([*script, "sigma_rel=[0.07,0.09]", f"out_dir={tmp_path}"], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sigma_rel0.07_step0000006", "sigma_rel0.09_step0000006"]
    bad = subprocess.run([*script, "sigma_rel=0.01"], capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 1 and "Usable sigma_rel range" in bad.stderr


@pytest.mark.slow
def test_between_profiles_matches_a_tracked_ema_in_a_training_run(tmp_path):
    """40 steps of the test model tracking sigma_rel 0.05, 0.10 and 0.08: 0.08 rebuilt from the 0.05 / 0.10
    snapshots (every 4 steps) lies within 3% of the 0.05-0.10 distance of the tracked 0.08 EMA (a run this short
    leaves the 0.08 profile only a few updates wide, so the fit is coarser than in the 2,000-update run above)."""
    run = tmp_path / "run"
    run_training(compose_config("train", tiny_train_overrides(run, 40, [
        "callbacks.posthoc_ema.snapshot_every=4", "callbacks.posthoc_ema.std=[0.05,0.1,0.08]"])))
    used = [s for s in list_snapshots(run) if s.sigma_rel in (0.05, 0.1)]
    x, error = solve_coefficients(used, 0.08, 40)
    state = reconstruct_state(Reconstruction(0.08, 40, 40, used, x, error))
    load = lambda name: safetensors.torch.load_file(run / "posthoc_ema" / name)  # noqa: E731
    tracked, short, long_ = load("0.08_0000040.safetensors"), load("0.05_0000040.safetensors"), load("0.1_0000040.safetensors")
    flat = lambda s: torch.cat([s[k].flatten() for k in sorted(s)])  # noqa: E731
    spread = (flat(short) - flat(long_)).norm()
    assert error < 0.05
    assert (flat(state) - flat(tracked)).norm() / spread < 0.03
