import math

import numpy as np
import pytest
import torch

from pixelflow.cascade import CascadeSchedule, downsample, upsample
from tests.conftest import GOLDEN


def test_published_four_stage_geometry_and_windows():
    s = CascadeSchedule(image_size=256)
    assert s.stage_sides == [32, 64, 128, 256]
    assert s.starts == pytest.approx([0, 1 / 7, 1 / 3, 3 / 5])
    assert s.ends == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert s.boundaries == [0, 175, 426, 719, 999]
    assert s.timestep_tables[:, -1].tolist() == pytest.approx([174.825, 425.749, 718.707, 999.0])
    assert s.timestep_tables[:, 0].tolist() == [0, 175, 426, 719]


@pytest.mark.parametrize("stages,size", [(2, 64), (3, 32), (4, 32), (5, 512)])
def test_any_number_of_stages_is_monotone_and_covers_the_range(stages, size):
    s = CascadeSchedule(image_size=size, num_stages=stages)
    assert s.stage_sides[-1] == size and len(s.stage_sides) == stages
    tables = s.timestep_tables
    assert tables.shape == (stages, 1000)
    assert tables[0, 0] == 0 and tables[-1, -1] == 999
    assert bool((tables[1:, 0] > tables[:-1, -1]).all())
    assert len(s.cfg_stage_factors) == stages and s.cfg_stage_factors[-1] == 1.0


def test_invalid_schedule_is_a_clear_error():
    with pytest.raises(ValueError, match="divisible"):
        CascadeSchedule(image_size=30, num_stages=4)
    with pytest.raises(ValueError, match="gamma"):
        CascadeSchedule(gamma=0.5)


def test_timestep_tables_match_golden():
    golden = np.load(GOLDEN / "scheduler.npz")
    assert np.abs(CascadeSchedule(image_size=32).timestep_tables.numpy() - golden["Timesteps_per_stage"]).max() < 1e-9


def test_down_is_2x2_mean_and_up_is_nearest():
    x = torch.randn(2, 3, 8, 8)
    mean = x.unfold(2, 2, 2).unfold(3, 2, 2).mean(dim=(-1, -2))
    assert torch.allclose(downsample(x), mean, atol=1e-6)
    assert torch.equal(upsample(mean)[..., ::2, ::2], mean) and torch.equal(upsample(mean)[..., 1::2, 1::2], mean)


def test_training_pair_endpoints(tiny_schedule):
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    noise = torch.randn(3, 3, 16, 16)
    k = 2
    start = tiny_schedule.training_pair(images, k, torch.zeros(3, dtype=torch.long), noise=noise)
    late = tiny_schedule.training_pair(images, k, torch.full((3,), 999), noise=noise)
    clean = downsample(images, 1)
    s, e = tiny_schedule.starts[k], tiny_schedule.ends[k]
    x_start = s * upsample(downsample(clean)) + (1 - s) * noise
    x_end = e * clean + (1 - e) * noise
    assert torch.allclose(start.x_t, x_start, atol=1e-6)
    assert torch.allclose(late.x_t, 0.999 * x_end + 0.001 * x_start, atol=1e-6)
    assert torch.allclose(start.target, x_end - x_start, atol=1e-6)
    assert torch.equal(start.target, late.target)
    assert start.timestep.tolist() == [426.0] * 3 and late.timestep[0] == pytest.approx(718.707, abs=1e-3)


def test_balanced_stages():
    s = CascadeSchedule(image_size=32)
    stages = s.balanced_stages(64, torch.Generator().manual_seed(0))
    assert torch.bincount(stages, minlength=4).tolist() == [16, 16, 16, 16]
    assert not torch.equal(stages, s.balanced_stages(64, torch.Generator().manual_seed(1)))
    # Micro-batches smaller than the stage count still reach every stage over steps.
    seen = torch.cat([s.balanced_stages(2, torch.Generator().manual_seed(i)) for i in range(20)])
    assert set(seen.tolist()) == {0, 1, 2, 3}


def test_block_noise_statistics():
    s = CascadeSchedule(image_size=32)
    n = s.block_noise((256, 3, 32, 32), torch.Generator().manual_seed(0))
    blocks = n.unfold(2, 2, 2).unfold(3, 2, 2).reshape(-1, 4)  # vector index 2p + q
    cov = torch.cov(blocks.T.double())
    expected = torch.full((4, 4), -1 / 3, dtype=torch.float64).fill_diagonal_(1.0)
    assert (cov - expected).abs().max() < 0.01  # 196k blocks: standard error ~0.003
    assert blocks.sum(dim=1).abs().max() < 1e-2  # rank 3: zero block sum (up to the 1e-6 jitter)
    # Neighbouring pixels in different blocks are independent.
    right = torch.stack([n[..., :, 1:-1:2].flatten(), n[..., :, 2::2].flatten()])
    assert abs(torch.corrcoef(right.double())[0, 1]) < 0.01


def test_transition_preserves_signal_to_noise_scaling(tiny_schedule):
    alpha, beta = tiny_schedule.renoise_coefficients(1)
    assert alpha == pytest.approx(1 / (2 - 0.25)) and beta == pytest.approx(math.sqrt(3) * alpha * 0.75)
    x = torch.randn(1, 3, 4, 4)
    noise = torch.randn(1, 3, 8, 8)
    assert torch.allclose(tiny_schedule.transition(x, 1, noise), alpha * upsample(x) + beta * noise)
