import subprocess
import sys
from pathlib import Path

from tests.conftest import GOLDEN

ROOT = Path(__file__).resolve().parents[2]


def test_check_reference_passes_on_the_public_golden_set():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_reference.py"), "--golden", str(GOLDEN)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.endswith(("PASS", "FAIL"))]
    assert len(rows) >= 40 and all(r.endswith("PASS") for r in rows)
    for name in ("forward per-row T", "block outputs", "Timesteps_per_stage", "training pair", "euler output", "dopri5 output"):
        assert any(name in r for r in rows), name


def test_check_reference_fails_on_perturbed_golden(tmp_path):
    """The check can fail: shift golden outputs by twice their tolerance (within the old, looser bounds) -> exit 1."""
    import numpy as np

    from pixelflow.golden.c2i import TOLERANCES

    for f in GOLDEN.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    for file, key, group in [("sample_euler.npz", "stage3/final", "euler"), ("sample_dopri5.npz", "stage3/final", "dopri5"),
                             ("model_forward.npz", "stage2/out", "forward")]:
        data = dict(np.load(tmp_path / file))
        data[key] = data[key] + 2 * TOLERANCES[group]
        np.savez(tmp_path / file, **data)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "check_reference.py"), "--golden", str(tmp_path)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    failed = {line.split("  ")[0].strip() for line in proc.stdout.splitlines() if line.endswith("FAIL")}
    assert {"euler stage3 final", "dopri5 stage3 final", "stage2 forward"} <= failed, proc.stdout
