import contextlib

import pytest
import torch

from pixelflow.precision import as_dtype, resolve_precision, sampling_precision, strict_fp32
from pixelflow.sampling.samplers import CascadeNoise, CascadeSampler, SamplerConfig


def test_auto_is_bf16_on_cuda_and_fp32_elsewhere():
    assert resolve_precision("auto", "cuda") == "bf16"
    assert resolve_precision("auto", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"


def test_as_dtype_returns_the_tensor_itself_when_it_has_the_dtype_and_a_cast_otherwise():
    x = torch.randn(3)
    assert as_dtype(x, torch.float32) is x
    half = as_dtype(x, torch.bfloat16)
    assert half.dtype == torch.bfloat16 and torch.equal(half, x.to(torch.bfloat16))


def test_bad_precision_names_the_choices():
    with pytest.raises(ValueError, match="one of .*fp32.*got 'fp16'"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="use precision=fp32"):
        resolve_precision("bf16", "meta")


def test_bf16_sampling_agrees_with_fp32_on_the_same_noise(tiny_model, tiny_schedule):
    """bf16 autocast runs the network in bf16 (8 mantissa bits: ~0.4% per op) on the same noise and fp32 state.

    Tolerance: pixel values in [-1, 1] within 0.05 at most and 0.005 on average over 4 stages x 4 Euler steps with
    CFG 3 (measured: 0.015 and 0.0024; the fp32 path itself is golden-checked elsewhere)."""
    sampler = CascadeSampler(tiny_model, tiny_schedule, SamplerConfig(steps=4, guidance_scale=3.0))
    labels = torch.arange(6) % 10
    noise = CascadeNoise.draw(tiny_schedule, 6, 3, False, torch.Generator().manual_seed(0))
    with sampling_precision("fp32", "cpu") as name:
        assert name == "fp32" and not torch.is_autocast_enabled("cpu")
        exact = sampler.sample(labels, noise=noise).images
    with sampling_precision("bf16", "cpu") as name:
        assert name == "bf16" and torch.is_autocast_enabled("cpu")
        fast = sampler.sample(labels, noise=noise).images
    assert fast.dtype == torch.float32  # the latent state stays fp32
    diff = (fast - exact).abs()
    assert 0 < diff.max() < 0.05 and diff.mean() < 0.005


def _tf32_switches() -> tuple[str, bool, bool]:
    return (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)


@pytest.fixture
def process_tf32():
    """Restores the process-wide switches after the test, whatever it did to them."""
    saved = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32 = saved[1]


IEEE = ("highest", False, False)


@pytest.mark.parametrize("fp32", [lambda: sampling_precision("fp32", "cuda"), strict_fp32], ids=["sampling", "strict"])
@pytest.mark.parametrize("raises", [False, True])
def test_fp32_turns_tf32_off_after_a_training_launch_turned_it_on_and_restores_it(process_tf32, fp32, raises):
    torch.set_float32_matmul_precision("high")  # what run_training and the benchmark set
    torch.backends.cudnn.allow_tf32 = True
    before = _tf32_switches()
    assert before == ("high", True, True)
    with pytest.raises(RuntimeError, match="inside") if raises else contextlib.nullcontext():
        with fp32():
            assert _tf32_switches() == IEEE
            if raises:
                raise RuntimeError("inside")
    assert _tf32_switches() == before


def test_fp32_switches_an_enclosing_autocast_off_and_back_on(process_tf32):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with sampling_precision("fp32", "cpu"):
            assert not torch.is_autocast_enabled("cpu")
            assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
        assert torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("start", ["highest", "high", "medium"])
@pytest.mark.parametrize("raises", [False, True])
def test_bf16_turns_tf32_on_and_restores_every_starting_setting(process_tf32, start, raises):
    torch.set_float32_matmul_precision(start)
    torch.backends.cudnn.allow_tf32 = False
    before = _tf32_switches()
    with pytest.raises(RuntimeError, match="inside") if raises else contextlib.nullcontext():
        with sampling_precision("bf16", "cpu"):
            assert _tf32_switches() == ("high", True, True)
            if raises:
                raise RuntimeError("inside")
    assert _tf32_switches() == before  # readable: torch refuses to read a precision set through mixed interfaces
