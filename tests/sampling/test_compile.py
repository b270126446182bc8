"""pixelflow.sampling.compile: the shapes sampling needs, and compiled sampling equal to eager (slow: compiling on CPU)."""

import pytest
import torch
from torch._dynamo.utils import counters

from pixelflow.cascade import CascadeSchedule
from pixelflow.sampling.compile import batch_sizes, compile_for_sampling, sampling_shapes
from pixelflow.sampling.samplers import CascadeSampler, SamplerConfig


def test_batch_sizes_include_the_last_partial_batch():
    assert batch_sizes(10, 4) == {4, 2} and batch_sizes(8, 4) == {4} and batch_sizes(3, 4) == {3}


def test_sampling_shapes_follow_the_guidance_of_each_stage(tiny_schedule):
    assert tiny_schedule.stage_sides == [4, 8, 16, 32]
    # Published ramp: stage 0 has w = 1 (B rows), the others are guided (2B rows).
    assert sampling_shapes(tiny_schedule, [SamplerConfig(guidance_scale=4.0)], [3]) == [(3, 4), (6, 8), (6, 16), (6, 32)]
    assert sampling_shapes(tiny_schedule, [SamplerConfig(guidance_scale=1.0)], [3, 1]) == [(1, 4), (1, 8), (1, 16), (1, 32),
                                                                                  (3, 4), (3, 8), (3, 16), (3, 32)]
    # A guidance interval leaves some calls of a guided stage conditional-only: both row counts there.
    interval = sampling_shapes(tiny_schedule, [SamplerConfig(guidance_scale=4.0, guidance_interval=(0.2, 0.8))], [2])
    assert interval == [(2, 4), (2, 8), (2, 16), (2, 32), (4, 8), (4, 16), (4, 32)]


@pytest.mark.slow
def test_compiled_sampling_matches_eager_without_compiling_again(tiny_model):
    schedule = CascadeSchedule(image_size=32, num_stages=2)  # two shapes to compile keeps this test to ~a minute on CPU
    config, labels = SamplerConfig(method="euler", steps=3, guidance_scale=1.0), torch.tensor([3, 7])
    shapes = sampling_shapes(schedule, [config], [2])
    assert shapes == [(2, 16), (2, 32)]
    torch._dynamo.reset()  # forget graphs other tests compiled
    graphs = counters["stats"]["unique_graphs"]
    compiled, seconds = compile_for_sampling(tiny_model, shapes, "fp32")
    assert seconds > 0 and counters["stats"]["unique_graphs"] == graphs + len(shapes)  # the warm-up compiled every shape
    eager = CascadeSampler(tiny_model, schedule, config).sample(labels, generator=torch.Generator().manual_seed(0))
    fast = CascadeSampler(compiled, schedule, config).sample(labels, generator=torch.Generator().manual_seed(0))
    assert counters["stats"]["unique_graphs"] == graphs + len(shapes)  # sampling ran the warmed graphs, no new compile
    torch.testing.assert_close(fast.images, eager.images, rtol=0, atol=1e-5)
    assert fast.nfe == eager.nfe == [3, 3]


def test_text_to_image_models_are_refused_with_the_fix(t2i_model):
    from pixelflow.sampling.compile import class_inputs

    with pytest.raises(ValueError, match="compile=false"):
        class_inputs(t2i_model)
