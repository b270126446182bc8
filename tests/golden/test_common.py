import math

import pytest

from pixelflow.golden.common import TOLERANCES, CheckResult, max_abs_error, report, require_files
from pixelflow.golden.sensitivity import SENSITIVITY_MULTIPLE


def test_a_result_with_a_sensitivity_is_bounded_by_the_larger_of_floor_and_multiple():
    floor = TOLERANCES["dopri5"]
    assert CheckResult("a", "dopri5", 0.0).tolerance == floor
    assert CheckResult("a", "dopri5", 0.0, sensitivity=floor / 10).tolerance == floor
    assert CheckResult("a", "dopri5", 0.0, sensitivity=floor).tolerance == SENSITIVITY_MULTIPLE * floor
    assert not CheckResult("a", "dopri5", 1.1 * SENSITIVITY_MULTIPLE * floor, sensitivity=floor).passed
    assert not CheckResult("a", "euler", math.nan).passed


def test_errors_of_different_shapes_never_pass():
    assert max_abs_error([1.0, 2.0], [1.0, 2.5]) == 0.5
    assert max_abs_error([1.0, 2.0], [1.0, 2.0, 3.0]) == math.inf


def test_report_prints_bound_and_sensitivity_and_fails_on_one_failure(capsys):
    rows = [CheckResult("ok forward", "forward", 1e-7), CheckResult("dopri5 row", "dopri5", 1e-3, sensitivity=1e-3)]
    assert report(rows) == 0
    out = capsys.readouterr().out
    assert "Dopri5 rows: bound = max(2.0e-03, 4 x sensitivity)" in out and "other rows: fixed bounds" in out
    line = next(r for r in out.splitlines() if r.startswith("dopri5 row"))
    assert line.split()[-4:] == ["1.000e-03", "4.000e-03", "1.000e-03", "PASS"]
    assert report([*rows, CheckResult("bad", "euler", 1.0)]) == 1
    assert "checks: 2 passed, 1 failed" in capsys.readouterr().out


def test_a_folder_missing_files_is_refused_by_name(tmp_path):
    (tmp_path / "a.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"b\.npz, c\.npz missing \(the layout is described in README\.md\)"):
        require_files(tmp_path, ["a.json", "b.npz", "c.npz"], "README.md")
