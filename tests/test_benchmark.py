"""scripts/benchmark.py and scripts/estimate_memory.py run on tiny settings and print valid JSON."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from pixelflow.sampling.integrators import model_calls

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load(name: str):
    sys.path.insert(0, str(SCRIPTS))
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


benchmark, estimate_memory = load("benchmark"), load("estimate_memory")


@pytest.mark.slow
def test_benchmark_tiny_cpu_prints_json_with_every_figure(capsys):
    result = benchmark.main(["--model", "Test/2", "--micro-batch", "4", "--steps", "1", "--sample-batch", "2",
                             "--sample-steps", "1"])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(result))
    assert printed["recipe"] == {"micro_batch": 4, "accumulation": 1, "precision": "32-true", "gradient_checkpointing": False,
                                 "ema": True, "optimizer": "AdamW", "grad_clip": 1.0}
    train = printed["train"]
    assert train["images_per_s"] > 0 and train["flops_per_image"] > 0 and printed["mfu"] is None
    # Peak: at least weights + grads + AdamW moments + EMA = 20 bytes per parameter.
    assert train["peak_memory_bytes"] >= 20 * printed["params"]
    assert printed["sample"]["images_per_s"] > 0 and printed["sample"]["model_calls"] == 4
    pad = printed["padding"]
    # Test/2 at 32 px: stage grids 2, 4, 8, 16 -> one sample each: 4 + 16 + 64 + 256 tokens vs 4 x 256 padded.
    assert (pad["tokens_sub_batches"], pad["tokens_padded"]) == (340, 1024)
    assert pad["flops_padded"] > 2.5 * pad["flops_sub_batches"] and pad["seconds_padded"] > 0


def test_benchmark_meta_counts_flops_without_memory(capsys):
    result = benchmark.main(["--model", "Tiny/4", "--device", "meta", "--micro-batch", "4", "--peak-tflops", "100",
                             "--assumed-mfu", "0.5", "--sample-steps", "3"])
    assert json.loads(capsys.readouterr().out)["model"] == "Tiny/4"
    train, sample = result["train"], result["sample"]
    assert train["estimated_images_per_s"]["mfu_0.50"] == pytest.approx(0.5 * 100e12 / train["flops_per_image"])
    # Per image, training is one stage's forward + backward (~3 forwards of the mean stage F); sampling runs every
    # stage (4 F) x 3 steps x 2 (guidance batch) = 24 F: eight times as much.
    assert sample["flops_per_image"] == pytest.approx(8 * train["flops_per_image"], rel=0.1)
    assert result["padding"]["token_ratio_padded_over_sub"] == pytest.approx(4 * 8**2 / (1 + 2**2 + 4**2 + 8**2))


def test_sampling_benchmark_reports_every_method_with_counted_model_calls(tmp_path, capsys):
    out = tmp_path / "sampling.json"
    result = benchmark.main(["--sampling", "--model", "Test/2", "--sample-batch", "2", "--sample-steps", "3", "--cfg", "4",
                             "--repeats", "1", "--out", str(out)])
    assert json.loads(capsys.readouterr().out) == json.loads(out.read_text()) == json.loads(json.dumps(result))
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
    result = benchmark.main(["--sampling", "--compile", "--model", "Test/2", "--num-stages", "2", "--methods", "euler",
                             "--cfg", "1", "--sample-batch", "2", "--sample-steps", "2", "--repeats", "1"])
    sampling = result["sampling"]
    assert sampling["compile"] and sampling["compile_seconds"] > 0
    assert sampling["methods"]["euler"]["model_calls_per_image"] == 2 * 2 and sampling["methods"]["euler"]["seconds_per_image"] > 0


@pytest.mark.slow
def test_memory_estimate_matches_a_measured_step(capsys):
    (check,) = estimate_memory.validate("Test/2", "bf16-mixed", ckpt=True, ema=True, micro_batches=[16])
    assert abs(check["relative_error"]) < 0.1
    assert check["retained_predicted_vs_measured"][0] == pytest.approx(check["retained_predicted_vs_measured"][1], rel=0.05)
    result = estimate_memory.main(["--model", "Test/2", "--image-size", "32", "--calibration-size", "32", "--micro-batch", "4", "16"])
    assert json.loads(capsys.readouterr().out)["gradient_checkpointing"] is True
    small, large = result["estimates"]
    for est in (small, large):  # weights + AdamW moments + EMA = 16 bytes/parameter, plus the fp32 input batch
        assert est["static"] == pytest.approx((16 * est["params"] + est["micro_batch"] * 3 * 32**2 * 4) / 2**30, abs=1e-3)
    assert large["retained"] > small["retained"] and large["fits"]


@pytest.mark.slow
def test_sampling_memory_model_predicts_whole_runs(capsys):
    """Calibrated at 32 px, the model of pixelflow.sampling.memory predicts whole Test/2 runs at 64 px."""
    checks = estimate_memory.validate_sampling("Test/2")
    assert len(checks) == 4 and all(abs(c["relative_error"]) < 0.1 for c in checks), checks
    result = estimate_memory.main(["--sampling", "--batch", "16", "100", "--method", "dopri5"])
    rows = {(r["precision"], r["batch"]): r for r in result["estimates"]}
    assert rows["bf16", 16]["fits_24gb"] and not rows["bf16", 100]["fits_24gb"] and rows["bf16", 100]["fits_40gb"]
    assert rows["fp32", 16]["peak_allocated"] > rows["bf16", 16]["peak_allocated"]
