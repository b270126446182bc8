"""pixelflow.benchmarking on tiny settings: every figure of the training and the sampling benchmark, clear errors."""

import json

import pytest

from pixelflow.benchmarking import BenchmarkConfig, run_benchmark
from pixelflow.cascade import CascadeSchedule
from pixelflow.checkpoint import export_released_format
from pixelflow.sampling.integrators import model_calls


@pytest.mark.slow
def test_training_benchmark_on_cpu_reports_every_figure():
    result = run_benchmark(BenchmarkConfig(model="Test/2", micro_batch=4, steps=1, sample_batch=2, sample_steps=1))
    assert json.loads(json.dumps(result)) == result
    assert result["recipe"] == {"micro_batch": 4, "accumulation": 1, "precision": "32-true", "gradient_checkpointing": False,
                                "ema": True, "optimizer": "AdamW", "grad_clip": 1.0}
    train = result["train"]
    assert train["images_per_s"] > 0 and train["flops_per_image"] > 0 and result["mfu"] is None
    # Peak: at least weights + grads + AdamW moments + EMA = 20 bytes per parameter.
    assert train["peak_memory_bytes"] >= 20 * result["params"]
    assert result["sample"]["images_per_s"] > 0 and result["sample"]["model_calls"] == 4
    pad = result["padding"]
    # Test/2 at 32 px: stage grids 2, 4, 8, 16 -> one sample each: 4 + 16 + 64 + 256 tokens vs 4 x 256 padded.
    assert (pad["tokens_sub_batches"], pad["tokens_padded"]) == (340, 1024)
    assert pad["flops_padded"] > 2.5 * pad["flops_sub_batches"] and pad["seconds_padded"] > 0


def test_meta_device_counts_flops_without_memory():
    result = run_benchmark(BenchmarkConfig(model="Tiny/4", device="meta", micro_batch=4, peak_tflops=100, assumed_mfu=(0.5,),
                                           sample_steps=3))
    assert result["model"] == "Tiny/4" and "peak_memory_bytes" not in result["train"]
    train, sample = result["train"], result["sample"]
    assert train["estimated_images_per_s"]["mfu_0.50"] == pytest.approx(0.5 * 100e12 / train["flops_per_image"])
    # Per image, training is one stage's forward + backward (~3 forwards of the mean stage F); sampling runs every
    # stage (4 F) x 3 steps x 2 (guidance batch) = 24 F: eight times as much.
    assert sample["flops_per_image"] == pytest.approx(8 * train["flops_per_image"], rel=0.1)
    assert result["padding"]["token_ratio_padded_over_sub"] == pytest.approx(4 * 8**2 / (1 + 2**2 + 4**2 + 8**2))


def test_sampling_benchmark_reports_every_method_with_counted_model_calls():
    result = run_benchmark(BenchmarkConfig(sampling=True, model="Test/2", sample_batch=2, sample_steps=3, guidance_scale=4, repeats=1))
    assert json.loads(json.dumps(result)) == result
    sampling = result["sampling"]
    assert (sampling["batch"], sampling["precision"], sampling["steps_per_stage"]) == (2, "fp32", 3)
    assert list(sampling["methods"]) == ["euler", "heun", "ab2", "dopri5"]
    for method, m in sampling["methods"].items():
        assert m["seconds_per_image"] > 0 and m["images_per_s"] > 0
        if method != "dopri5":  # 4 stages: stage 0 (w = 1) conditional-only, the guided three 2 rows a call
            assert m["model_calls_per_image"] == model_calls(method, 3) * (1 + 3 * 2)
            assert m["forward_calls_per_batch"] == model_calls(method, 3) * 4
    assert sampling["methods"]["dopri5"]["model_calls_per_image"] >= 4 * 2  # at least two evaluations a stage
    assert result["image_size"] == 32 and "initial" in result["weights"]
    assert (sampling["compile"], sampling["compile_seconds"]) == (False, None)


@pytest.mark.slow
def test_sampling_benchmark_compiles_first_and_reports_the_compile_time_apart():
    result = run_benchmark(BenchmarkConfig(sampling=True, compile=True, model="Test/2", num_stages=2, methods=("euler",),
                                           guidance_scale=1, sample_batch=2, sample_steps=2, repeats=1))
    sampling = result["sampling"]
    assert sampling["compile"] and sampling["compile_seconds"] > 0
    assert sampling["methods"]["euler"]["model_calls_per_image"] == 2 * 2 and sampling["methods"]["euler"]["seconds_per_image"] > 0


@pytest.mark.parametrize("settings, message", [
    ({"sampling": True, "device": "meta"}, "needs device cpu or cuda"),
    ({"precision": "bf16"}, r"use one of \('32-true', 'bf16-mixed'\)"),
    ({"sample_precision": "fp16"}, "sample_precision='fp16'"),
    ({"methods": ("euler", "rk4")}, r"\['rk4'\] are not sampling methods"),
    ({"sampling": True, "sample_batch": 0}, "sample_batch >= 1"),
    ({"steps": 0}, "must be >= 1"),
])
def test_a_bad_setting_is_refused_before_any_work(settings, message):
    with pytest.raises(ValueError, match=message):
        BenchmarkConfig(**settings)


def test_training_benchmark_with_the_gpu_recipes_options():
    """The GPU check's training call (FLOP counting + activation checkpointing + bf16 autocast), on a tiny model."""
    result = run_benchmark(BenchmarkConfig(model="Test/2", micro_batch=4, steps=1, sample_batch=0, padding=False,
                                           precision="bf16-mixed", grad_checkpointing=True))
    train = result["train"]
    assert train["images_per_s"] > 0 and train["flops_per_image"] > 0 and train["peak_memory_bytes"] > 0
    plain = run_benchmark(BenchmarkConfig(model="Test/2", micro_batch=4, steps=1, sample_batch=0, padding=False))
    assert train["flops_per_image"] > plain["train"]["flops_per_image"]  # checkpointing recomputes each block's forward


def test_sampling_benchmark_times_a_checkpoints_recorded_sampler(tmp_path, tiny_model):
    """A distilled student's export records its sampler: the benchmark times that one unless told otherwise."""
    recorded = {"method": "ab2", "steps": 2, "shift": 1.0, "guidance_scale": 1.0, "guidance_interval": None}
    ckpt = export_released_format(tiny_model, CascadeSchedule(image_size=32), tmp_path / "student", sampler=recorded)
    result = run_benchmark(BenchmarkConfig(sampling=True, ckpt=str(ckpt), sample_batch=2, repeats=1))
    sampling = result["sampling"]
    assert list(sampling["methods"]) == ["ab2"] and sampling["methods"]["ab2"]["model_calls_per_image"] == 8
    assert (sampling["steps_per_stage"], sampling["guidance_scale"]) == (2, 1.0)
    flags = run_benchmark(BenchmarkConfig(sampling=True, ckpt=str(ckpt), sample_batch=2, repeats=1, methods=("euler",),
                                          recorded_sampler=False))
    assert list(flags["sampling"]["methods"]) == ["euler"] and flags["sampling"]["steps_per_stage"] == 2
    assert flags["sampling"]["methods"]["euler"]["model_calls_per_image"] == 2 * (1 + 3 * 2)  # guidance 4 doubles 3 stages
