import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pixelflow.conditioning import ClassCondition
from pixelflow.golden.c2i import GoldenFolder
from pixelflow.golden.common import TOLERANCES
from pixelflow.golden.sensitivity import SENSITIVITY_MULTIPLE
from tests.conftest import GOLDEN

ROOT = Path(__file__).resolve().parents[2]


def _check_reference(folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "check_reference.py"), "--golden", str(folder)],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def public_check() -> subprocess.CompletedProcess:
    return _check_reference(GOLDEN)


def test_check_reference_passes_on_the_public_golden_set(public_check):
    proc = public_check
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.endswith(("PASS", "FAIL"))]
    assert len(rows) >= 40 and all(r.endswith("PASS") for r in rows)
    for name in ("forward per-row T", "block outputs", "Timesteps_per_stage", "training pair", "euler output", "dopri5 output"):
        assert any(name in r for r in rows), name
    assert "Dopri5 rows: bound = max(2.0e-03, 4 x sensitivity)" in proc.stdout


def test_each_dopri5_row_prints_its_measured_sensitivity_and_the_bound_it_gives(public_check):
    dopri5 = [line.rsplit(None, 4) for line in public_check.stdout.splitlines() if line.startswith("dopri5 ")]
    assert [r[0] for r in dopri5] == [f"dopri5 stage{k} final" for k in range(4)] + [
        "dopri5 output", "dopri5 model calls [32, 38, 44, 44] vs [32, 38, 44, 44]"]
    for _, _, bound, sensitivity, _ in dopri5[:-1]:
        assert float(sensitivity) > 0
        assert float(bound) == pytest.approx(max(TOLERANCES["dopri5"], SENSITIVITY_MULTIPLE * float(sensitivity)), rel=1e-3)
    assert dopri5[-1][2:] == ["0.000e+00", "-", "PASS"]  # model calls: exact, no sensitivity


def test_check_reference_fails_on_perturbed_golden(tmp_path):
    """The check can fail: shift golden outputs by twice their fixed bound (the Dopri5 floor at stage 1, where the
    measured sensitivity leaves the bound at the floor) -> exit 1."""
    for f in GOLDEN.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    for file, key, group in [("sample_euler.npz", "stage3/final", "euler"), ("sample_dopri5.npz", "stage1/final", "dopri5"),
                             ("model_forward.npz", "stage2/out", "forward")]:
        data = dict(np.load(tmp_path / file))
        data[key] = data[key] + 2 * TOLERANCES[group]
        np.savez(tmp_path / file, **data)
    proc = _check_reference(tmp_path)
    assert proc.returncode == 1
    failed = {line.split("  ")[0].strip() for line in proc.stdout.splitlines() if line.endswith("FAIL")}
    assert failed == {"euler stage3 final", "dopri5 stage1 final", "stage2 forward"}, proc.stdout


def test_a_wrong_guidance_ramp_fails_the_dopri5_and_euler_rows(monkeypatch):
    """The linear ramp (0, 1/3, 2/3, 1) for the published (0, 1/6, 2/3, 1): every row from stage 1 on must fail,
    the adaptive bound included (its sensitivity is measured under the same wrong ramp); stage 0 (weight 1 in
    both) and the model-call counts still pass."""
    folder = GoldenFolder(GOLDEN)
    monkeypatch.setattr(ClassCondition, "stage_weight", lambda self, cfg, stage, schedule: 1 + (cfg - 1) * stage / 3)
    with torch.no_grad():
        rows = {r.name.split(" [")[0]: r for r in [*folder.check_dopri5(), *folder.check_euler()]}
    for method in ("dopri5", "euler"):
        assert rows[f"{method} stage0 final"].passed
        assert rows[f"{method} model calls"].passed
        for k in (1, 2, 3):
            assert not rows[f"{method} stage{k} final"].passed, rows[f"{method} stage{k} final"]
    assert not rows["dopri5 output"].passed and not rows["euler output image"].passed


def test_a_folder_without_its_files_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_config.json, sample_settings.json"):
        GoldenFolder(tmp_path)
