import subprocess
import sys
from pathlib import Path

from tests.conftest import GOLDEN

ROOT = Path(__file__).resolve().parents[1]


def test_check_reference_passes_on_the_public_golden_set():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_reference.py"), "--golden", str(GOLDEN)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.endswith(("PASS", "FAIL"))]
    assert len(rows) >= 40 and all(r.endswith("PASS") for r in rows)
    for name in ("forward per-row T", "block outputs", "Timesteps_per_stage", "training pair", "euler output", "dopri5 output"):
        assert any(name in r for r in rows), name


def test_check_reference_fails_on_perturbed_golden(tmp_path):
    """The check can fail: shift one golden output by 1e-3 and it must exit non-zero."""
    import numpy as np

    for f in GOLDEN.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    data = dict(np.load(tmp_path / "sample_euler.npz"))
    data["stage3/final"] = data["stage3/final"] + 1e-3
    np.savez(tmp_path / "sample_euler.npz", **data)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_reference.py"), "--golden", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert "euler stage3 final" in proc.stdout and "FAIL" in proc.stdout
