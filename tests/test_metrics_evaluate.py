"""evaluate.py end to end (CLI, metrics.json, protocol record) and its errors; the ImageNet reproduction script offline."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from pixelflow.data.mnist import default_mnist_path
from pixelflow.metrics import evaluation
from pixelflow.metrics import fid as M
from pixelflow.metrics.adm import adm_precision_recall
from pixelflow.metrics.evaluation import EvalOptions, _extract, evaluate, evaluate_config, feature_cache_key, inception_cache_parts
from pixelflow.metrics.inception import InceptionFeatures, resolve_inception_weights
from pixelflow.metrics.io import EvaluationInputError, image_set_from_array, load_image_set, write_adm_npz
from pixelflow.metrics.mnist_classifier import RECIPE
from pixelflow.metrics.references import mnist_images
from tests.metrics_fixtures import independent_fid

ROOT = Path(__file__).resolve().parents[1]


def _sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _cli(*overrides, cwd, env=None):
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *overrides], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=900)


def _cfg(**values):
    cfg = OmegaConf.load(ROOT / "conf" / "evaluate.yaml")
    del cfg["hydra"]
    cfg.merge_with(values)
    return cfg


@pytest.mark.slow
def test_cli_mnist_samples_against_named_reference(tmp_path):
    images, labels = mnist_images("test")
    settings = {"method": "euler", "steps": 30, "cfg": 4.0, "seed": 0}
    write_adm_npz(tmp_path / "run" / "samples.npz", images[:12], labels[:12], settings=settings)
    cache = tmp_path / "cache"
    proc = _cli(f"samples={tmp_path / 'run' / 'samples.npz'}", "ref=mnist_train", "num_ref=12", f"cache_dir={cache}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FID (Inception pool3)" in proc.stdout and "MNIST classifier accuracy" in proc.stdout
    assert not (tmp_path / "outputs").exists()  # Hydra's run dir lives under $TMPDIR, not the cwd

    result = json.loads((tmp_path / "run" / "metrics.json").read_text())
    m, protocol = result["metrics"], result["protocol"]
    assert set(m) == {"fid", "sfid", "precision", "recall", "classifier_accuracy", "classifier_fid"}
    assert m["fid"] > 0 and m["sfid"] > 0 and 0 <= m["precision"] <= 1 and 0 <= m["recall"] <= 1
    assert m["classifier_accuracy"] >= 11 / 12  # real test digits with their true labels
    assert "no classifier layer" in result["unavailable"]["inception_score"]
    assert protocol["num_samples"] == 12 and protocol["reference"]["num_images"] == 12
    assert protocol["reference"]["sha256"] == _sha256(default_mnist_path())
    assert protocol["samples"]["sha256"] == _sha256(tmp_path / "run" / "samples.npz")
    assert protocol["sampler_settings"] == settings
    extractor = protocol["feature_extractor"]
    assert extractor["weights_sha256"] == _sha256(extractor["weights_path"]) and not extractor["has_logits"]
    assert extractor["precision"].startswith("fp32 (strict")
    parts = inception_cache_parts(_sha256(default_mnist_path()), 12, extractor["weights_sha256"], extractor["device"])
    assert (cache / "features" / f"{feature_cache_key(parts)}.npz").is_file()  # the reference's features, keyed so
    assert protocol["classifier"]["weights_sha256"] == _sha256(cache / f"{RECIPE}.pt")


@pytest.mark.slow
def test_png_samples_against_adm_reference_batch_uses_its_statistics(tmp_path):
    rng = np.random.default_rng(0)
    samples = mnist_images("test")[0][:8]
    for i, im in enumerate(samples):
        Image.fromarray(im).save(tmp_path / f"{i:05d}.png")
    ref_images = mnist_images("train")[0][:8]
    net = InceptionFeatures(resolve_inception_weights(None, tmp_path / "cache"))
    ref_f = net(ref_images)
    # ADM reference batches carry statistics of a larger set than arr_0: emulate with shifted means
    mu, mu_s = ref_f["pool"].mean(0) + 0.1, ref_f["spatial"].mean(0) - 0.1
    stats = {"mu": mu, "sigma": np.cov(ref_f["pool"].T.astype(np.float64)),
             "mu_s": mu_s, "sigma_s": np.cov(ref_f["spatial"].T.astype(np.float64))}
    write_adm_npz(tmp_path / "ref" / "VIRTUAL_test.npz", ref_images, rng.integers(0, 10, 8), stats=stats)

    result = evaluate(load_image_set(tmp_path), load_image_set(tmp_path / "ref" / "VIRTUAL_test.npz"),
                      EvalOptions(cache_dir=str(tmp_path / "cache"), kid=True))
    gen = net(samples)
    assert result["metrics"]["fid"] == pytest.approx(independent_fid(gen["pool"], ref_f["pool"], mean_b=mu), rel=1e-5)
    assert result["metrics"]["sfid"] == pytest.approx(independent_fid(gen["spatial"], ref_f["spatial"], mean_b=mu_s), rel=1e-5)
    assert result["metrics"]["fid"] != pytest.approx(independent_fid(gen["pool"], ref_f["pool"]), rel=1e-3)
    assert (result["metrics"]["precision"], result["metrics"]["recall"]) == adm_precision_recall(gen["pool"], ref_f["pool"])
    assert result["protocol"]["metric_protocol"] == "adm"
    assert result["metrics"]["kid"] == pytest.approx(M.kernel_inception_distance(gen["pool"], ref_f["pool"])[0], rel=1e-4)
    assert "precomputed" in result["protocol"]["reference"]["fid_statistics"]
    assert result["protocol"]["sampler_settings"] is None and result["protocol"]["classifier"] is None


@pytest.mark.parametrize(("values", "message"), [
    ({}, "both samples= and ref= are required"),
    ({"samples": "/nonexistent/samples.npz", "ref": "mnist_test"}, "/nonexistent/samples.npz does not exist"),
    ({"samples": "SAMPLES", "ref": "imagenet_val"}, r"unknown reference 'imagenet_val': known named references are \['mnist_test'"),
    ({"samples": "SAMPLES", "ref": "mnist_test", "classifier": "maybe"}, "classifier='maybe': use auto, true or false"),
    ({"samples": "SAMPLES", "ref": "mnist_test", "device": "cuda:99"}, "device=cuda:99 but no CUDA device is available"),
])
def test_bad_options_give_clear_errors(tmp_path, values, message):
    if "device" in values and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    write_adm_npz(tmp_path / "samples.npz", mnist_images("test")[0][:4])
    values = {k: str(tmp_path / "samples.npz") if v == "SAMPLES" else v for k, v in values.items()}
    with pytest.raises(EvaluationInputError, match=message):
        evaluate_config(_cfg(cache_dir=str(tmp_path / "cache"), **values))


def test_reference_feature_key_names_the_device_type_and_the_precision(monkeypatch):
    """Features computed on a CPU are never served to a CUDA evaluation (nor the other way): their rounding differs."""
    key = lambda device: feature_cache_key(inception_cache_parts("ref-sha", 500, "weights-sha", device))  # noqa: E731
    assert key("cpu") != key("cuda")
    assert key("cuda:0") == key("cuda:1") == key(torch.device("cuda", 2)) == key("cuda")  # the same arithmetic
    assert key("cpu") != feature_cache_key(inception_cache_parts("ref-sha", 499, "weights-sha", "cpu"))
    cpu_fp32 = key("cpu")
    monkeypatch.setattr(evaluation, "PRECISION", "tf32")
    assert key("cpu") != cpu_fp32


def test_cli_error_exit_code_and_message(tmp_path):
    proc = _cli(f"samples={tmp_path / 'missing.npz'}", "ref=mnist_test", cwd=tmp_path)
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "missing.npz does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_reproduce_script_stops_offline_with_instructions(tmp_path):
    env = {**os.environ, "PIXELFLOW_CKPT_DIR": str(tmp_path / "ckpt"), "ADM_REF": str(tmp_path / "ref.npz"),
           "PYTHON": "/bin/false", "DOWNLOAD": "0"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "reproduce_imagenet256.sh")], cwd=tmp_path, capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 1
    for needle in ("ShoufaChen/PixelFlow-Class2Image", "VIRTUAL_imagenet256_labeled.npz", str(tmp_path / "ckpt"),
                   str(tmp_path / "ref.npz"), "guided-diffusion", "DOWNLOAD=1"):
        assert needle in proc.stderr, needle
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "ref.npz").exists()


def test_default_evaluation_uses_500_mnist_reference_images(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(evaluation, "evaluate", lambda samples, ref, opts: seen.append(opts.num_ref))
    monkeypatch.setattr(evaluation, "write_metrics", lambda result, out: out)
    write_adm_npz(tmp_path / "samples.npz", mnist_images("test")[0][:4])
    for num_ref in ("auto", None, 12):
        evaluate_config(_cfg(samples=str(tmp_path / "samples.npz"), ref="mnist_test", num_ref=num_ref))
    assert seen == [500, None, 12]


def test_feature_extraction_shows_a_progress_bar_with_rate_and_eta(capsys):
    images = image_set_from_array(mnist_images("test")[0][:30], "first 30 test digits", "sha")
    result, seconds = _extract(lambda batches: sum(len(b) for b in batches), images, 30, 10, "Inception features (reference)")
    err = capsys.readouterr().err
    assert result == 30 and seconds >= 0
    assert "Inception features (reference)" in err and "30/30" in err and "img/s" in err and "<00:00" in err


def test_reproduce_dry_run_prints_the_published_plan_without_inputs(tmp_path):
    env = {**os.environ, "PIXELFLOW_CKPT_DIR": str(tmp_path / "ckpt"), "ADM_REF": str(tmp_path / "ref.npz"),
           "PYTHON": sys.executable}
    script = str(ROOT / "scripts" / "reproduce_imagenet256.sh")
    proc = subprocess.run(["bash", script, "--dry-run"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for needle in ("images      50000", "devices     1", "batch       16 per device", "-> bf16 on CUDA",
                   "GiB per device (estimated", "h on 1 x RTX 4090 (estimated", "dry run: nothing sampled"):
        assert needle in proc.stdout, needle
    proc = subprocess.run(["bash", script, "--dry-run", "devices=2", "batch_size=8", "precision=fp32"], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=120)
    assert "devices     2" in proc.stdout and "batch       8 per device" in proc.stdout and "fp32 -> fp32" in proc.stdout
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.slow
def test_classifier_accuracy_scores_only_labelled_text_samples(tmp_path, eval_cache):
    """Text-to-image samples carry -1 where their prompt had no target class; accuracy is over the labelled ones."""
    images, labels = mnist_images("test")
    wrong = (labels[:12] + 1) % 10
    partial = np.where(np.arange(12) % 2 == 0, labels[:12], -1)  # the odd ones unlabelled
    options = EvalOptions(cache_dir=str(eval_cache), classifier=True, inception=False)
    ref = image_set_from_array(images[12:24], "ref", "0" * 64)
    scored = evaluate(image_set_from_array(images[:12], "s", "1" * 64, partial), ref, options)
    assert scored["metrics"]["classifier_accuracy"] >= 5 / 6
    unlabelled_wrong = np.where(np.arange(12) % 2 == 0, labels[:12], wrong)  # wrong labels only on the odd ones
    assert evaluate(image_set_from_array(images[:12], "w", "2" * 64, unlabelled_wrong), ref,
                    options)["metrics"]["classifier_accuracy"] <= 7 / 12
    none = evaluate(image_set_from_array(images[:12], "n", "3" * 64, np.full(12, -1)), ref, options)
    assert "classifier_accuracy" not in none["metrics"] and "every sample label is -1" in none["unavailable"]["classifier_accuracy"]


def test_reproduce_script_refuses_a_sampler_preset_file_outside_a_sampler_folder(tmp_path):
    preset = tmp_path / "tuned.yaml"
    preset.write_text("method: euler\n")
    env = {**os.environ, "PIXELFLOW_CKPT_DIR": str(tmp_path / "ckpt"), "ADM_REF": str(tmp_path / "ref.npz"),
           "PYTHON": "/bin/false", "SAMPLER": str(preset)}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "reproduce_imagenet256.sh")], cwd=tmp_path, capture_output=True,
                          text=True, env=env, timeout=60)
    assert proc.returncode == 2 and "expected an existing preset file in a folder named sampler/" in proc.stderr
