"""GPU checks (skipped without CUDA; scripts/gpu_check.sh runs them): bf16 sampling, sampling memory at the
default batch, and the first steps of the 24 GB training recipe."""

import math

import pytest
import torch

from pixelflow.benchmarking import BenchmarkConfig, run_benchmark
from pixelflow.cascade import CascadeSchedule
from pixelflow.model import build_model
from pixelflow.precision import sampling_precision
from pixelflow.sampling.memory import sampling_peak_bytes
from pixelflow.sampling.samplers import CascadeNoise, CascadeSampler, SamplerConfig
from tests.hydra_utils import compose_config

pytestmark = pytest.mark.gpu
GIB = 2**30


def test_bf16_sampling_on_cuda_agrees_with_fp32(tiny_model, tiny_schedule):
    model = tiny_model.cuda()
    sampler = CascadeSampler(model, tiny_schedule, SamplerConfig(steps=4, guidance_scale=3.0))
    labels = torch.arange(6, device="cuda") % 10
    noise = CascadeNoise.draw(tiny_schedule, 6, 3, False, torch.Generator("cuda").manual_seed(0), "cuda")
    exact = sampler.sample(labels, noise=noise).images
    with sampling_precision("auto", "cuda") as name:
        fast = sampler.sample(labels, noise=noise).images
    assert name == "bf16"
    diff = (fast - exact).abs()
    assert 0 < diff.max() < 0.05 and diff.mean() < 0.005  # the CPU test's tolerance


def test_sampling_peak_at_the_default_batch_is_under_22_gib():
    """XL/4, 256 px, batch 16 (conf/sample.yaml), Dopri5 + CFG 2.4 in bf16; loose tolerances keep it short
    (the peak does not depend on the number of steps)."""
    assert compose_config("sample").batch_size == 16
    with torch.device("cuda"):
        net = build_model("XL/4", num_classes=1000).eval()
    schedule = CascadeSchedule(image_size=256)
    sampler = CascadeSampler(net, schedule, SamplerConfig(method="dopri5", guidance_scale=2.4, atol=0.1, rtol=0.1))
    torch.cuda.reset_peak_memory_stats()
    with sampling_precision("bf16", "cuda"):
        sampler.sample(torch.arange(16, device="cuda"), generator=torch.Generator("cuda").manual_seed(0))
    peak = torch.cuda.max_memory_allocated()
    assert peak < 22 * GIB
    assert peak < 1.25 * sampling_peak_bytes(net, 256, 16, "dopri5", "bf16")  # the estimate is not far below


def test_24gb_recipe_first_training_steps():
    cfg = compose_config("train", ["experiment=imagenet256_xl4_24gb"])
    config = BenchmarkConfig(model="XL/4", device="cuda", micro_batch=cfg.data.batch_size, precision=cfg.trainer.precision,
                             grad_checkpointing=cfg.model.gradient_checkpointing, steps=2, sample_batch=0, padding=False)
    assert cfg.model.gradient_checkpointing and cfg.trainer.precision == "bf16-mixed"
    result = run_benchmark(config)
    assert result["train"]["peak_memory_bytes"] < 22 * GIB and math.isfinite(result["train"]["images_per_s"])
