import numpy as np
import pytest

from pixelflow.golden.cli import main
from pixelflow.golden.t2i import GoldenT2IFolder, is_t2i_folder
from tests.conftest import GOLDEN, GOLDEN_T2I


def _rows(out: str) -> list[str]:
    return [line for line in out.splitlines() if line.endswith(("PASS", "FAIL"))]


def test_check_reference_passes_on_the_t2i_golden_set(capsys):
    assert is_t2i_folder(GOLDEN_T2I) and not is_t2i_folder(GOLDEN)
    assert main(["--golden", str(GOLDEN_T2I)]) == 0
    rows = _rows(capsys.readouterr().out)
    assert all(r.endswith("PASS") for r in rows)
    for k in range(4):
        assert any(f"t2i stage{k} forward" in r for r in rows)
        assert any(f"t2i euler stage{k} final" in r for r in rows)
    assert any("t2i euler output image" in r for r in rows) and len(rows) == 14


def test_check_reference_fails_on_a_perturbed_t2i_golden_set(tmp_path, capsys):
    """Shift one forward output and one Euler stage final by 1e-3: both rows must fail."""
    for f in GOLDEN_T2I.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    for name, key in (("model_forward.npz", "stage2/out"), ("sample_euler.npz", "stage1_final")):
        data = dict(np.load(tmp_path / name))
        data[key] = data[key] + 1e-3
        np.savez(tmp_path / name, **data)
    assert main(["--golden", str(tmp_path)]) == 1
    failed = [r for r in _rows(capsys.readouterr().out) if r.endswith("FAIL")]
    assert len(failed) == 2
    assert "t2i stage2 forward" in failed[0] and "t2i euler stage1 final" in failed[1]


def test_a_c2i_folder_is_not_a_t2i_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a T2I golden folder"):
        GoldenT2IFolder(GOLDEN)
