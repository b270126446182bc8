"""Text-to-image sampling at scale: prompts cycled over the samples, labels from a prompts file, sample.py prompts."""

import json

import numpy as np
import pytest
import torch

from pixelflow.cascade import CascadeSchedule
from pixelflow.checkpoint import export_released_format, load_pixelflow
from pixelflow.sampling.generate import generate
from pixelflow.sampling.memory import GIB, sampling_budget_bytes, sampling_peak_bytes
from pixelflow.sampling.prompts import NO_LABEL, PromptSet, load_text_encoder, prompt_set, read_prompts_file
from pixelflow.sampling.samplers import SamplerConfig
from tests.sampling.test_generate import sample_cli

CONFIG = SamplerConfig(steps=2, guidance_scale=3.0)


def test_prompts_cycle_over_the_samples_and_images_follow_the_prompt(tmp_path, t2i_export):
    loaded = load_pixelflow(t2i_export)
    prompts = prompt_set(["a handwritten seven", "the digit 3"])
    path = generate(loaded, CONFIG, tmp_path / "a", 5, batch_size=2, prompts=prompts, save_png=False)
    data = np.load(path, allow_pickle=False)
    assert data["arr_0"].shape == (5, 32, 32, 3) and data["arr_1"].tolist() == [NO_LABEL] * 5
    settings = json.loads(str(data["settings"]))
    assert settings["prompts"] == ["a handwritten seven", "the digit 3"] and settings["text_encoder"] == "text_encoder"
    # same prompts in another batch size: the same images (per-sample seeds); another prompt: other images
    again = np.load(generate(loaded, CONFIG, tmp_path / "b", 5, batch_size=5, prompts=prompts, save_png=False))["arr_0"]
    assert np.abs(again.astype(int) - data["arr_0"].astype(int)).max() <= 1
    other = np.load(generate(loaded, CONFIG, tmp_path / "c", 5, batch_size=5, prompts=prompt_set(["a red fox"]),
                             save_png=False))["arr_0"]
    assert np.abs(other.astype(int) - data["arr_0"].astype(int)).max() > 10


def test_prompts_file_labels_are_stored_with_the_samples(tmp_path, t2i_export):
    file = tmp_path / "prompts.txt"
    file.write_text("7\ta handwritten seven\n\n3\tthe digit 3\nno label here\n")
    prompts = read_prompts_file(file)
    assert prompts == PromptSet(("a handwritten seven", "the digit 3", "no label here"), (7, 3, NO_LABEL))
    path = generate(load_pixelflow(t2i_export), SamplerConfig(steps=1, guidance_scale=2.0), tmp_path / "out", 7, batch_size=4,
                    prompts=prompts, negative_prompt="blurry")
    data = np.load(path, allow_pickle=False)
    assert data["arr_1"].tolist() == [7, 3, -1, 7, 3, -1, 7]
    assert sorted(p.name for p in (tmp_path / "out" / "images").glob("*.png"))[:2] == ["000000_7.png", "000001_3.png"]
    assert json.loads(str(data["settings"]))["negative_prompt"] == "blurry"


def test_bf16_text_sampling_runs_the_encoder_in_bf16_and_agrees_with_fp32(tmp_path, t2i_export):
    loaded = load_pixelflow(t2i_export)
    assert load_text_encoder(loaded, dtype=torch.bfloat16).model.dtype == torch.bfloat16
    prompts = prompt_set(["a handwritten seven", "the digit 3"])
    exact = np.load(generate(loaded, CONFIG, tmp_path / "fp32", 2, 2, prompts=prompts, save_png=False))["arr_0"]
    fast = np.load(generate(loaded, CONFIG, tmp_path / "bf16", 2, 2, prompts=prompts, save_png=False,
                            precision="bf16"))["arr_0"]
    diff = np.abs(fast.astype(int) - exact.astype(int))
    assert diff.mean() < 3 and diff.max() < 40  # 8-bit pixels; bf16 network and T5 (see test_precision)


def test_wrong_conditions_are_clear_errors(tmp_path, t2i_export, tiny_model, tiny_t5_dir):
    loaded = load_pixelflow(t2i_export)
    with pytest.raises(ValueError, match="text-to-image checkpoint: pass prompts="):
        generate(loaded, CONFIG, tmp_path / "x", 1, 1)
    with pytest.raises(ValueError, match="takes prompts, not classes="):
        generate(loaded, CONFIG, tmp_path / "x", 1, 1, classes=[1], prompts=prompt_set(["a"]))
    c2i = load_pixelflow(export_released_format(tiny_model, CascadeSchedule(image_size=32), tmp_path / "c2i"))
    with pytest.raises(ValueError, match="class-to-image checkpoint: it takes classes=, not prompts"):
        generate(c2i, CONFIG, tmp_path / "x", 1, 1, prompts=prompt_set(["a"]))
    loaded.text_encoder = None
    with pytest.raises(ValueError, match="names no text encoder .* pass text_encoder=PATH"):
        load_text_encoder(loaded)
    assert load_text_encoder(loaded, str(tiny_t5_dir)).max_length == 512  # an override, the published length
    with pytest.raises(FileNotFoundError, match="not available locally"):
        load_text_encoder(loaded, str(tmp_path / "missing"))
    loaded.model.cross_attention_dim = 24
    with pytest.raises(ValueError, match="width 32 but the model's cross_attention_dim is 24"):
        load_text_encoder(loaded, str(tiny_t5_dir))


def test_a_batch_that_only_fits_without_the_text_encoder_is_refused(tmp_path, t2i_export):
    loaded = load_pixelflow(t2i_export)
    encoder = load_text_encoder(loaded)
    model_only = sampling_budget_bytes(sampling_peak_bytes(loaded.model, 32, 2, "euler", "fp32", text_length=32, steps=CONFIG.steps))
    memory_gib = (model_only + encoder.device_bytes() / 2) / GIB
    with pytest.raises(ValueError, match=r"batch_size=2 at 32 px \(euler, fp32\) needs an estimated"):
        generate(loaded, CONFIG, tmp_path / "x", 2, 2, prompts=prompt_set(["a"]), device_memory_gib=memory_gib)
    generate(loaded, CONFIG, tmp_path / "y", 1, 1, prompts=prompt_set(["a"]), device_memory_gib=memory_gib + 1, save_png=False)


def test_bad_prompt_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="not both"):
        prompt_set(["a"], tmp_path / "p.txt")
    with pytest.raises(ValueError, match="list of strings"):
        prompt_set("a handwritten seven")
    with pytest.raises(ValueError, match="no prompts given"):
        prompt_set([])
    with pytest.raises(ValueError, match="does not exist"):
        read_prompts_file(tmp_path / "p.txt")
    (tmp_path / "p.txt").write_text("seven\ta handwritten seven\n")
    with pytest.raises(ValueError, match="line 1: 'seven' before the tab is not an integer label"):
        read_prompts_file(tmp_path / "p.txt")
    (tmp_path / "p.txt").write_text("\n \n")
    with pytest.raises(ValueError, match="holds no prompts"):
        read_prompts_file(tmp_path / "p.txt")


@pytest.mark.slow
def test_sample_cli_with_prompts(tmp_path, t2i_export):
    out = tmp_path / "out"
    proc = sample_cli(f"ckpt={t2i_export}", f"out_dir={out}", "num_samples=4", "batch_size=4", "sampler.steps=1",
                      "prompts=[a handwritten seven,the digit 3]")
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, log
    data = np.load(out / "samples.npz", allow_pickle=False)
    assert data["arr_0"].shape == (4, 32, 32, 3)
    assert json.loads(str(data["settings"]))["prompts"] == ["a handwritten seven", "the digit 3"]
    proc = sample_cli(f"ckpt={t2i_export}", f"out_dir={tmp_path / 'none'}", "num_samples=1")
    log = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0 and "error: " in log and "text-to-image checkpoint: pass prompts=" in log
