import json
import subprocess
import sys
from pathlib import Path

import pytest

from pixelflow.training.step_timer import StepTimer

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "time_recipe_steps.py"


def test_median_skips_the_warmup_steps():
    timer = StepTimer(warmup=2)
    timer.stamps = [0.0, 5.0, 5.5, 6.0, 6.5, 9.0]  # gaps after the warm-up: 0.5, 0.5, 2.5
    assert timer.median() == 0.5
    short = StepTimer(warmup=2)
    short.stamps = [0.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="only 3 steps ran"):
        short.median()


@pytest.mark.slow
def test_the_script_times_two_rows_and_gives_their_ratio(tmp_path):
    out = tmp_path / "steps.json"
    subprocess.run([sys.executable, str(SCRIPT), "published", "single_stage", "--steps", "13", "--rounds", "1",
                    "--out", str(out)], check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    assert result["published"]["ratio_to_published"] == 1.0
    assert len(result["single_stage"]["seconds_per_step"]) == 1 and result["single_stage"]["seconds_per_step"][0] > 0
