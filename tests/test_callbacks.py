from pixelflow.launch import run_training
from tests.hydra_utils import compose_config, tiny_train_overrides


def _grids(run_dir, every, steps):
    run_training(compose_config("train", tiny_train_overrides(run_dir, steps, [f"callbacks.sample_grid.every_n_steps={every}"])))
    return {p.name: p.read_bytes() for p in (run_dir / "samples").glob("*.png")}


def test_sample_grids_every_n_steps_and_a_final_grid(tmp_path):
    on_boundary = _grids(tmp_path / "a", 2, 4)
    assert sorted(on_boundary) == ["final.png", "step_0000002.png", "step_0000004.png"]
    assert on_boundary["final.png"] == on_boundary["step_0000004.png"]  # reused, not sampled twice
    assert on_boundary["step_0000002.png"] != on_boundary["step_0000004.png"]
    off_boundary = _grids(tmp_path / "b", 3, 4)
    assert sorted(off_boundary) == ["final.png", "step_0000003.png"]
    assert off_boundary["final.png"] == on_boundary["final.png"]  # same seed and weights at step 4: same grid
