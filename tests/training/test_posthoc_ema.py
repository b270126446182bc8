import json
import math
import shutil

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

from pixelflow.training.launch import run_training
from pixelflow.training.posthoc_ema import (
    SIGMA_REL_MAX,
    PostHocEMA,
    gamma_to_sigma_rel,
    power_ema_beta,
    power_ema_update,
    sigma_rel_to_gamma,
)
from tests.hydra_utils import compose_config, tiny_train_overrides

SNAPSHOTS = ["callbacks.posthoc_ema.snapshot_every=2"]  # debug=fast runs the quickstart's callback (std 0.05, 0.10)


def _train(run_dir, steps, *extra):
    run_training(compose_config("train", tiny_train_overrides(run_dir, steps, [*SNAPSHOTS, *extra])))


def _meta(path):
    with safe_open(path, framework="pt") as f:
        return f.metadata()


@pytest.mark.parametrize("sigma_rel", [0.01, 0.05, 0.08, 0.10, 0.25, SIGMA_REL_MAX])
def test_gamma_solves_edm2s_relation(sigma_rel):
    gamma = sigma_rel_to_gamma(sigma_rel)
    assert gamma >= 0
    assert gamma_to_sigma_rel(gamma) == pytest.approx(sigma_rel, rel=1e-9)
    assert sigma_rel_to_gamma(0.05) == pytest.approx(16.97, abs=0.01) and sigma_rel_to_gamma(0.10) == pytest.approx(6.94, abs=0.01)


@pytest.mark.parametrize("bad", [0.0, -0.1, 0.3])
def test_sigma_rel_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match=r"sigma_rel must be in \(0, 0.2887\]"):
        sigma_rel_to_gamma(bad)


@pytest.mark.parametrize("gamma", [0.0, 6.94, 16.97])
def test_power_ema_update_matches_its_closed_form(gamma):
    """After T updates with weights e_1..e_T, the EMA holds update tau's weight (tau^(g+1) - (tau-1)^(g+1)) / T^(g+1)."""
    steps = 40
    ema = [torch.full((steps,), 7.0, dtype=torch.float64)]  # the initial value gets weight 0 (beta_1 = 0)
    for t in range(1, steps + 1):
        power_ema_update(ema, [torch.nn.functional.one_hot(torch.tensor(t - 1), steps).double()], gamma, t)
    tau = torch.arange(1, steps + 1, dtype=torch.float64)
    closed = (tau ** (gamma + 1) - (tau - 1) ** (gamma + 1)) / steps ** (gamma + 1)
    torch.testing.assert_close(ema[0], closed, rtol=1e-12, atol=1e-15)
    assert power_ema_beta(gamma, 1) == 0.0 and math.isclose(power_ema_beta(gamma, 4), 0.75 ** (gamma + 1))


@pytest.mark.parametrize("kwargs, match", [({"std": []}, "distinct sigma_rel"), ({"std": [0.05, 0.05]}, "distinct sigma_rel"),
                                           ({"snapshot_every": 0}, "snapshot_every must be an integer"),
                                           ({"dtype": "int8"}, "dtype must be one of")])
def test_bad_settings_are_refused(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        PostHocEMA(str(tmp_path), **kwargs)


def test_snapshots_hold_the_ema_and_its_update_count(tmp_path):
    run_dir = tmp_path / "run"
    _train(run_dir, 4, "callbacks.posthoc_ema.dtype=bfloat16")
    folder = run_dir / "posthoc_ema"
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [
        "0.05_0000002.safetensors", "0.05_0000004.safetensors", "0.1_0000002.safetensors", "0.1_0000004.safetensors"]
    meta = _meta(folder / "0.1_0000004.safetensors")
    assert meta["step"] == meta["t"] == "4" and meta["dtype"] == "bfloat16" and float(meta["sigma_rel"]) == 0.1
    snap = safetensors.torch.load_file(folder / "0.1_0000004.safetensors")
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    state = ckpt["callbacks"]["PostHocEMA"]
    assert state["updates"] == 4 and state["std"] == [0.05, 0.1]
    names = [k.removeprefix("model.") for k in ckpt["state_dict"] if k.startswith("model.")]  # parameter order
    assert sorted(snap) == sorted(names)
    for name, ema in zip(names, state["emas"][1], strict=True):
        assert snap[name].dtype == torch.bfloat16 and torch.equal(snap[name], ema.bfloat16())
    info = json.loads((folder / "run.json").read_text())
    assert info["std"] == [0.05, 0.1] and info["model"]["depth"] >= 1 and info["schedule"]["num_stages"] == 4


def test_killed_run_resumes_with_every_snapshot_exactly_once(tmp_path):
    """Killed after step 5 (checkpoint at 3, snapshots at 2 and 4 written, 4's cut short): the resumed run ends
    with the same snapshots as an uninterrupted one, tensor for tensor, each once, and the same EMA state."""
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    every3 = "callbacks.checkpoint.every_n_train_steps=3"
    _train(straight, 6, every3)
    _train(killed, 6, every3)
    for path in [killed / "checkpoints" / "last.ckpt", killed / "checkpoints" / "step_0000006.ckpt",
                 *(killed / "posthoc_ema").glob("*_0000006.safetensors")]:
        path.unlink()  # what a kill during step 5 would not have written yet
    cut = killed / "posthoc_ema" / "0.05_0000004.safetensors"
    cut.write_bytes(cut.read_bytes()[:100])  # ... and a snapshot written without pixelflow.atomic would look like
    shutil.rmtree(killed / "export")
    _train(killed, 6, every3)
    names = lambda run: sorted(p.name for p in (run / "posthoc_ema").iterdir())  # noqa: E731
    assert names(killed) == names(straight) == [
        *(f"0.05_{s:07d}.safetensors" for s in (2, 4, 6)), *(f"0.1_{s:07d}.safetensors" for s in (2, 4, 6)), "run.json"]
    for path in (straight / "posthoc_ema").glob("*.safetensors"):  # (safetensors orders the metadata freely)
        again = killed / "posthoc_ema" / path.name
        assert _meta(path) == _meta(again), path.name
        a, b = safetensors.torch.load_file(path), safetensors.torch.load_file(again)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), path.name
    a, b = (torch.load(r / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["PostHocEMA"] for r in (straight, killed))
    assert a["updates"] == b["updates"] == 6
    assert all(torch.equal(x, y) for ema_a, ema_b in zip(a["emas"], b["emas"]) for x, y in zip(ema_a, ema_b))


def test_resume_with_other_sigma_rel_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    _train(run_dir, 2)
    with pytest.raises(ValueError, match=r"track sigma_rel \[0.05, 0.1\] but callbacks.posthoc_ema.std is \[0.05, 0.2\]"):
        _train(run_dir, 4, "callbacks.posthoc_ema.std=[0.05,0.2]")


def test_skipped_nonfinite_steps_do_not_update_the_emas(tmp_path):
    """Optimizer steps 2 and 3 are skipped (NaN batch): their snapshots equal step 1's, t stays 1, step 4 moves on."""
    run_dir = tmp_path / "run"
    _train(run_dir, 4, "callbacks.posthoc_ema.snapshot_every=1", "callbacks.checkpoint.every_n_train_steps=4",
           "+callbacks.inject._target_=tests.training.test_long_runs.InjectNonFinite", "+callbacks.inject.steps=[1,2]")
    folder = run_dir / "posthoc_ema"
    for std in ("0.05", "0.1"):
        snaps = [safetensors.torch.load_file(folder / f"{std}_{s:07d}.safetensors") for s in (1, 2, 3, 4)]
        assert [_meta(folder / f"{std}_{s:07d}.safetensors")["t"] for s in (1, 2, 3, 4)] == ["1", "1", "1", "2"]
        assert all(torch.equal(snaps[0][k], snaps[i][k]) for i in (1, 2) for k in snaps[0])
        assert not all(torch.equal(snaps[0][k], snaps[3][k]) for k in snaps[0])
