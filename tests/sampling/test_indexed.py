"""pixelflow.sampling.indexed: per-index seeds, balanced labels, the one chunked sampling loop."""

import pytest
import torch

from pixelflow.sampling.indexed import balanced_labels, sample_indexed, sample_seed, sample_uint8
from pixelflow.sampling.samplers import CascadeNoise, CascadeSampler, SamplerConfig, to_uint8


def test_balanced_labels():
    labels = balanced_labels(25, list(range(10)))
    assert torch.bincount(labels).tolist() == [3] * 5 + [2] * 5


def test_sample_seed_is_the_published_convention():
    assert sample_seed(0, 5) == 5 and sample_seed(3, 17) == 30_000_017


@pytest.mark.parametrize("method", ["euler", "dopri5"])
def test_indexed_sampling_is_sampling_from_each_indexs_own_seed(tiny_model, tiny_schedule, method):
    sampler = CascadeSampler(tiny_model, tiny_schedule, SamplerConfig(method=method, steps=1, rtol=1e-2, atol=1e-3))
    labels = torch.tensor([4, 5])
    noise = CascadeNoise.per_sample(tiny_schedule, [sample_seed(2, 7), sample_seed(2, 9)], 3, method == "dopri5")
    expected = sampler.sample(labels, noise=noise).images
    assert torch.equal(sample_indexed(sampler, labels, [7, 9], seed=2).images, expected)


def test_chunks_never_change_an_image_and_bound_the_batch(tiny_model, tiny_schedule, monkeypatch):
    sampler = CascadeSampler(tiny_model, tiny_schedule, SamplerConfig(steps=2, guidance_scale=3.0))
    labels = torch.tensor([0, 1, 2, 3])
    indices = torch.tensor([3, 4, 5, 6])  # sample i has label labels[i - 3]
    sizes = []
    original = CascadeSampler.sample
    monkeypatch.setattr(CascadeSampler, "sample", lambda self, c, *a, **k: sizes.append(len(c)) or original(self, c, *a, **k))
    whole = sample_uint8(sampler, lambda chunk: labels[chunk - 3], indices, 1, 7)
    chunked = sample_uint8(sampler, lambda chunk: labels[chunk - 3], indices, 1, 3)
    assert sizes == [4, 3, 1] and whole.dtype == torch.uint8 and whole.shape == (4, 32, 32, 3)
    assert torch.equal(whole, chunked)
    alone = sample_uint8(sampler, lambda chunk: labels[chunk - 3], torch.tensor([5]), 1, 1)
    assert torch.equal(alone[0], whole[2])  # sample 5 is the same image alone or in a batch
    other_seed = sample_uint8(sampler, lambda chunk: labels[chunk - 3], torch.tensor([5]), 2, 1)
    assert not torch.equal(other_seed, alone)
    assert torch.equal(whole, to_uint8(sample_indexed(sampler, labels, indices, 1).images))


def test_bad_chunks_and_indices_are_clear_errors(tiny_model, tiny_schedule):
    sampler = CascadeSampler(tiny_model, tiny_schedule, SamplerConfig(steps=1))
    with pytest.raises(ValueError, match="chunk_size must be an integer >= 1, got 0"):
        sample_uint8(sampler, lambda chunk: chunk, [0], 0, 0)
    with pytest.raises(ValueError, match="indices must be a non-empty list"):
        sample_uint8(sampler, lambda chunk: chunk, [], 0, 4)
