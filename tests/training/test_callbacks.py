from pixelflow.training.launch import run_training
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


def test_sample_grids_go_to_the_logger_folder(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [o for o in tiny_train_overrides(run_dir, 2, ["callbacks.sample_grid.every_n_steps=2"]) if o != "logger=none"]
    run_training(compose_config("train", [*overrides, "logger=csv"]))
    logged = sorted((run_dir / "logs").glob("version_*/samples/*.png"))
    assert [p.name for p in logged] == ["step_0000002.png"]
    assert logged[0].read_bytes() == (run_dir / "samples" / "step_0000002.png").read_bytes()


def test_chunked_grid_equals_an_unchunked_one(tiny_model, tiny_schedule):
    """Each image's noise comes from its own seed, so chunking (memory) never changes the grid."""
    import torch

    from pixelflow.training.callbacks import SampleGrid

    labels = torch.arange(5).repeat_interleave(2)
    grids = [SampleGrid("unused", sampler={"steps": 2}, chunk_size=c, precision="fp32").sample(tiny_model, tiny_schedule, labels)
             for c in (10, 3, 1)]
    assert grids[0].shape == (10, 32, 32, 3)
    assert torch.equal(grids[0], grids[1]) and torch.equal(grids[0], grids[2])
    assert not torch.equal(grids[0][0], grids[0][1])  # same class, different seeds


def test_chunk_size_must_be_positive():
    import pytest

    from pixelflow.training.callbacks import SampleGrid

    with pytest.raises(ValueError, match="callbacks.sample_grid.chunk_size must be an integer >= 1, got 0"):
        SampleGrid("unused", chunk_size=0)
    with pytest.raises(ValueError, match=r"callbacks.sample_grid.sampler: unknown setting\(s\) \['cfg'\]"):
        SampleGrid("unused", sampler={"cfg": 2.0})


def test_grid_chunking_bounds_the_rows_sampled_at_once(tiny_model, tiny_schedule, monkeypatch):
    """The memory bound: no sampler call sees more than ``chunk_size`` images (the grid used to be one batch)."""
    import torch

    from pixelflow.training import callbacks

    seen = []
    original = callbacks.CascadeSampler.sample

    def recording(self, labels, *args, **kwargs):
        seen.append(len(labels))
        return original(self, labels, *args, **kwargs)

    monkeypatch.setattr(callbacks.CascadeSampler, "sample", recording)
    callbacks.SampleGrid("unused", sampler={"steps": 1}, chunk_size=3, precision="fp32").sample(
        tiny_model, tiny_schedule, torch.arange(10))
    assert seen == [3, 3, 3, 1]


def test_training_memory_estimate_includes_the_grid_chunk():
    """The 24 GB recipe's estimate carries the sample grid's phase, and a larger chunk costs more."""
    from pixelflow.training.memory_estimate import predict

    cal = {"forward": [0.0] * 4, "retained": [0.0] * 4, "working_set": [0.0, 0.0], "k_opt": 2.0}
    small, large = (predict(cal, "XL/4", 256, 8, ema=True, grid_chunk=c) for c in (16, 64))
    assert 0 < small["sample_grid"] < large["sample_grid"]
    assert predict(cal, "XL/4", 256, 8, ema=True, grid_chunk=None)["sample_grid"] == 0


def test_text_grid_chunks_never_change_an_image_and_rows_follow_their_prompt(t2i_model, tiny_schedule):
    import torch

    from pixelflow.text import tiny_random_t5
    from pixelflow.training.callbacks import SampleGrid

    encoder = tiny_random_t5(d_model=t2i_model.cross_attention_dim, num_heads=2, d_ff=32, num_layers=1)
    prompts = ["a handwritten seven", "a handwritten seven", "the digit 3"]
    grids = [SampleGrid("unused", sampler={"steps": 1}, chunk_size=c, precision="fp32").sample_text(
        t2i_model, tiny_schedule, prompts, encoder) for c in (3, 2)]
    assert grids[0].shape == (3, 32, 32, 3) and torch.equal(grids[0], grids[1])
    other = SampleGrid("unused", sampler={"steps": 1}, chunk_size=3, precision="fp32").sample_text(
        t2i_model, tiny_schedule, ["the digit 3"] * 3, encoder)
    assert torch.equal(other[2], grids[0][2]) and not torch.equal(other[0], grids[0][0])  # same seed, other prompt
