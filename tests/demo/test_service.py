"""The web demo: generation logic as plain Python, the page's API through gradio_client, the Hydra entrypoint."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from unittest.mock import patch

import httpx
import numpy as np
import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image

from pixelflow.cascade import CascadeSchedule
from pixelflow.checkpoint import RELEASED_URL, CheckpointError, export_released_format, load_pixelflow
from pixelflow.demo.app import build_demo, launch
from pixelflow.demo.service import DemoInputError, DemoModel, resolve_class_names, upscale_nearest
from pixelflow.model import build_model
from pixelflow.sampling.indexed import sample_seed
from pixelflow.sampling.samplers import CascadeSampler, SamplerConfig, to_uint8
from tests.hydra_utils import compose_config

REPO = Path(__file__).resolve().parents[2]
NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
FAST = dict(steps_1=2, steps_2=2, steps_3=2, steps_4=3)  # few steps: the API tests check plumbing, not quality


# ---- helpers shared with tests/demo/test_browser.py -----------------------------------------
def make_tiny_checkpoint(out_dir: Path, num_stages: int = 4, prediction: str = "v") -> Path:
    """A random Test/2 model (10 classes, 32 px, ``num_stages`` stages, predicting ``prediction``) in the released
    model.pt + config.yaml layout."""
    torch.manual_seed(0)
    model = build_model("Test/2", num_classes=10, prediction=prediction)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    return export_released_format(model, CascadeSchedule(image_size=32, num_stages=num_stages), out_dir, NAMES)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_config(ckpt: Path | str, hydra_overrides: list[str] | None = None, **overrides) -> DictConfig:
    """conf/demo.yaml composed as demo.py composes it (``hydra_overrides``, e.g. a sampler preset), pointed at
    ``ckpt`` and a free port."""
    return OmegaConf.merge(compose_config("demo", hydra_overrides), {"ckpt": str(ckpt), "port": free_port(), **overrides})


def open_client(url: str, download_dir: Path) -> Client:
    return Client(url, verbose=False, analytics_enabled=False, download_files=str(download_dir))


# ---- fixtures -----------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The tiny model gains nothing from intra-op threads, and they thrash when the CPU is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def demo_model(tiny_ckpt) -> DemoModel:
    return DemoModel.load(tiny_ckpt, device="cpu", max_images=4)


@contextmanager
def running_demo(ckpt: Path, download_dir: Path) -> Iterator[Client]:
    """The demo of ``ckpt`` served on a free port, and a client of it; both closed on exit, the port free again."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    cfg = demo_config(ckpt)
    demo = launch(cfg, prevent_thread_lock=True, quiet=True)
    client = open_client(f"http://127.0.0.1:{cfg.port}/", download_dir)
    try:
        yield client
    finally:
        client.close()
        demo.close()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{cfg.port}/", timeout=2)


@pytest.fixture(scope="module")
def client(tiny_ckpt, tmp_path_factory) -> Iterator[Client]:
    with running_demo(tiny_ckpt, tmp_path_factory.mktemp("downloads")) as client:
        yield client


def _pixels(path: str) -> bytes:
    with Image.open(path) as im:
        return im.convert("RGB").tobytes()


# ---- the plain generation function ----------------------------------------------------------
def test_generate_is_deterministic_and_previews_every_stage(demo_model):
    req = demo_model.validate("3", False, 1.0, 4.0, [2, 2, 2, 3], 11, 2)
    a, b = demo_model.generate(req), demo_model.generate(req)
    assert [im.size for im in a.images] == [(32, 32)] * 2 and a.nfe == [2, 2, 2, 3]
    assert [im.tobytes() for im in a.images] == [im.tobytes() for im in b.images]
    assert np.asarray(a.images[0]).std() > 1  # random weights still give a non-flat image
    other = demo_model.generate(demo_model.validate(3, False, 1.0, 4.0, [2, 2, 2, 3], 12, 2))
    assert other.images[0].tobytes() != a.images[0].tobytes()
    assert len(a.stage_previews) == 2 and all(len(s) == 4 for s in a.stage_previews)
    assert all(p.size == (32, 32) for s in a.stage_previews for p in s)
    assert a.stage_previews[1][-1].tobytes() == a.images[1].tobytes()  # the last stage is the final image
    first = np.asarray(a.stage_previews[0][0])  # 4 px stage upsampled x8: constant 8x8 blocks
    assert (first == np.repeat(np.repeat(first[::8, ::8], 8, 0), 8, 1)).all()


def test_a_single_stage_x_predicting_model_serves_like_any_cascade(tmp_path):
    dm = DemoModel.load(make_tiny_checkpoint(tmp_path, num_stages=1, prediction="x"), device="cpu", max_images=2)
    assert dm.stage_sides == [32] and dm.model.prediction == "x"
    out = dm.generate(dm.validate("3", False, 1.0, 4.0, [3], 5, 2))
    assert out.nfe == [3] and [im.size for im in out.images] == [(32, 32)] * 2
    assert np.asarray(out.images[0]).std() > 1
    with pytest.raises(DemoInputError, match=r"one value per stage \(1\)"):
        dm.validate("3", False, 1.0, 4.0, [3, 3], 5, 2)


@pytest.mark.parametrize("dopri5", [False, True])
def test_image_i_of_a_request_is_sample_i_of_the_run_with_its_seed(tiny_ckpt, dopri5):
    """The demo's seed means what sample.py's does: image #i draws its noise from seed * 10**7 + i."""
    loose = SamplerConfig(atol=1e-3, rtol=1e-2)  # Dopri5 in few steps
    demo_model = DemoModel(load_pixelflow(tiny_ckpt), sampler=loose)
    req = demo_model.validate(3, dopri5, 2.0, 4.0, [1, 2, 1, 2], 11, 2)
    shown = demo_model.generate(req)
    config = SamplerConfig(method="dopri5" if dopri5 else "euler", steps=(1, 2, 1, 2), shift=2.0, guidance_scale=4.0,
                           atol=1e-3, rtol=1e-2)
    sampler = CascadeSampler(demo_model.model, demo_model.schedule, config)
    images = to_uint8(sampler.sample(torch.tensor([3, 3]), seeds=[sample_seed(11, 0), sample_seed(11, 1)]).images)
    assert [np.asarray(im).tolist() for im in shown.images] == images.tolist()
    single = demo_model.generate(demo_model.validate(3, dopri5, 2.0, 4.0, [1, 2, 1, 2], 11, 1))
    if not dopri5:  # Dopri5's step control is batch-wide; the fixed-step methods give image #0 alone or beside another
        diff = np.abs(np.asarray(single.images[0], dtype=int) - np.asarray(shown.images[0], dtype=int)).max()
        assert diff <= 1  # float ulps may flip a rounding


def test_the_sampler_preset_sets_the_initial_controls_and_the_hidden_settings(tiny_ckpt):
    demo = build_demo(demo_config(tiny_ckpt, ["sampler=paper_dopri5"]))
    values = {b.elem_id: b.value for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    assert values["dopri5"] is True and values["guidance_scale"] == 2.4 and values["steps0"] == 30
    quick = {b.elem_id: b.value for b in build_demo(demo_config(tiny_ckpt)).blocks.values() if getattr(b, "elem_id", None)}
    assert quick["dopri5"] is False and quick["guidance_scale"] == 5.0 and quick["steps3"] == 10 and quick["seed"] == 42
    dm = DemoModel(load_pixelflow(tiny_ckpt), sampler=SamplerConfig(guidance_interval=(0.2, 0.8)))
    rows = []
    dm.model.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    dm.generate(dm.validate(0, False, 1.0, 4.0, [1, 1, 1, 1], 0, 1))
    assert rows == [1, 1, 2, 2]  # the preset's guidance interval applies (guided only in stages 2 and 3)
    heun = DemoModel(load_pixelflow(tiny_ckpt), sampler=SamplerConfig(method="heun", steps=2))
    assert heun.fixed_method == "heun" and dm.fixed_method == "euler"  # the Dopri5 checkbox off: the preset's method
    cfg = demo_config(tiny_ckpt)
    with open_dict(cfg):  # Hydra refuses the key on the command line; a hand-made config meets the sampler's own check
        cfg.sampler.cfg = 4.0
    with pytest.raises(ValueError, match=r"demo config sampler: unknown setting\(s\) \['cfg'\]"):
        build_demo(cfg)


def test_a_recorded_sampler_sets_the_controls_unless_a_preset_is_named(tiny_ckpt):
    recorded = {"method": "ab2", "steps": 2, "shift": 1.0, "guidance_scale": 1.0, "guidance_interval": None}
    student = replace(load_pixelflow(tiny_ckpt), sampler=recorded)  # what a distilled student's export loads as
    dm = DemoModel(student)
    assert (dm.sampler.method, dm.sampler.steps, dm.fixed_method) == ("ab2", 2, "ab2")
    rows = []
    dm.model.register_forward_hook(lambda m, args, out: rows.append(args[0].shape[0]))
    dm.generate(dm.validate(0, False, 1.0, 1.0, [2, 2, 2, 2], 0, 1))
    assert len(rows) == 8 and set(rows) == {1}  # AB2, 2 steps a stage, no guidance doubling
    preset = {"method": "euler", "steps": 10, "shift": 1.0, "guidance_scale": 5.0}
    with patch("pixelflow.demo.service.load_pixelflow", return_value=student):
        assert DemoModel.load(tiny_ckpt, device="cpu", sampler=preset).sampler.method == "ab2"
        chosen = DemoModel.load(tiny_ckpt, device="cpu", sampler=preset, sampler_overrides=["sampler=quickstart"]).sampler
        assert (chosen.method, chosen.guidance_scale) == ("euler", 5.0)
        steps = DemoModel.load(tiny_ckpt, device="cpu", sampler=preset, sampler_overrides=["sampler.steps=1"]).sampler
        assert (steps.method, steps.steps) == ("ab2", 10)  # a field from the command line applies on top


@pytest.mark.slow
def test_compiled_demo_model_gives_the_eager_pixels(tmp_path):
    dm = DemoModel.load(make_tiny_checkpoint(tmp_path, num_stages=2), device="cpu", max_images=2)  # 2 shapes: ~a minute
    req = dm.validate(3, False, 1.0, 1.0, [1, 2], 11, 2)
    eager = dm.generate(req)
    assert dm.compile(num_images=2, guidance_scale=1.0) > 0  # compiled and warmed: both stages' shapes of 2 conditional-only images
    fast = dm.generate(req)
    assert dm.model is not dm.model._orig_mod and fast.nfe == eager.nfe
    diff = [np.abs(np.asarray(f, dtype=int) - np.asarray(e, dtype=int)).max() for f, e in zip(fast.images, eager.images)]
    assert len(diff) == 2 and max(diff) <= 1  # float ulps may flip a rounding


def test_progress_callback_sees_every_step_of_every_stage(demo_model):
    seen = []
    demo_model.generate(demo_model.validate(0, False, 2.0, 1.0, [1, 2, 3, 4], 0, 1), on_step=lambda *a: seen.append(a))
    assert seen == [(k, n, s) for k, s in enumerate([1, 2, 3, 4]) for n in range(1, s + 1)]


def test_classes_resolve_by_index_name_or_dropdown_label(demo_model):
    assert demo_model.class_labels[:2] == ["0: zero", "1: one"]
    for value in (7, 7.0, "7", "seven", " Seven ", "7: seven"):
        assert demo_model.validate(value, False, 1, 4, [1] * 4, 0, 1).class_index == 7


@pytest.mark.parametrize("args, message", [
    (dict(class_value=10), "Class must be a whole number from 0 to 9, got 10"),
    (dict(class_value="ten"), "Class must be a class index from 0 to 9 or one of the model's class names"),
    (dict(class_value=None), "Class must be a whole number from 0 to 9, got None"),
    (dict(dopri5="yes"), "Dopri5 ODE must be true or false, got 'yes'"),
    (dict(shift=0.5), "Noise Shift must be a number from 1 to 100, got 0.5"),
    (dict(shift=float("inf")), "Noise Shift must be a number from 1 to 100, got inf"),
    (dict(guidance_scale=25.5), "Classifier-free Guidance Scale must be a number from 1 to 25, got 25.5"),
    (dict(guidance_scale="4"), "Classifier-free Guidance Scale must be a number from 1 to 25, got '4'"),
    (dict(steps=[10, 10, 101, 10]), "Num Inference Steps (stage 3) must be a whole number from 1 to 100, got 101"),
    (dict(steps=[10, 10, 10]), "Num Inference Steps needs one value per stage (4), got [10, 10, 10]"),
    (dict(steps=10), "Num Inference Steps needs one value per stage (4), got 10"),
    (dict(seed=1.5), "Seed must be a whole number from 0 to 4294967295, got 1.5"),
    (dict(seed=True), "Seed must be a whole number from 0 to 4294967295, got True"),
    (dict(num_images=0), "Number of Images must be a whole number from 1 to 4, got 0"),
])
def test_every_field_is_validated_with_its_name_range_and_value(demo_model, args, message):
    values = dict(class_value=1, dopri5=False, shift=1.0, guidance_scale=4.0, steps=[10] * 4, seed=42, num_images=1) | args
    with pytest.raises(DemoInputError) as err:
        demo_model.validate(**values)
    assert message in str(err.value)


def test_ambiguous_and_mismatched_class_names_are_clear_errors(tiny_ckpt):
    loaded = load_pixelflow(tiny_ckpt)
    loaded.class_names = ["crane"] * 2 + NAMES[2:]
    with pytest.raises(DemoInputError, match=r"Class 'crane' is ambiguous \(indices \[0, 1\]\)"):
        DemoModel(loaded).validate("crane", False, 1, 4, [1] * 4, 0, 1)
    loaded.class_names = NAMES[:3]
    with pytest.raises(CheckpointError, match="lists 3 class names but its model has 10 classes"):
        DemoModel(loaded)
    with pytest.raises(ValueError, match="max_images must be a positive integer, got 0"):
        DemoModel(load_pixelflow(tiny_ckpt), max_images=0)


def test_imagenet_models_get_timm_names_offline():
    names = resolve_class_names(1000, None)
    assert names[207] == "golden retriever" and names[0].startswith("tench")
    assert resolve_class_names(3, None) == ["class 0", "class 1", "class 2"]


def test_upscale_nearest_uses_whole_factors():
    im = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4))
    big = upscale_nearest(im, 30)
    assert big.size == (32, 32) and (np.asarray(big)[::8, ::8] == np.asarray(im)).all()
    assert upscale_nearest(im, 4) is im


def test_bad_device_and_config_values_are_clear_errors(tiny_ckpt):
    with pytest.raises(ValueError, match="device must be 'auto', 'cpu' or 'cuda"):
        DemoModel.load(tiny_ckpt, device="tpu")
    with pytest.raises(ValueError, match="port must be an integer from 1 to 65535, got 70000"):
        launch(demo_config(tiny_ckpt, port=70000))
    with pytest.raises(ValueError, match=r"demo config \(controls and sampler\): Noise Shift must be a number from 1 to 100, "
                                         "got 0.5"):
        build_demo(demo_config(tiny_ckpt, sampler={"shift": 0.5}))
    with pytest.raises(ValueError, match=r"demo config \(controls and sampler\): Seed must be a whole number"):
        build_demo(demo_config(tiny_ckpt, controls={"seed": -1}))
    with pytest.raises(ValueError, match="demo config sampler: sampler steps"):
        build_demo(demo_config(tiny_ckpt, sampler={"steps": [1, 2]}))


# ---- pages without a usable checkpoint ------------------------------------------------------
def _markdown(demo) -> str:
    return "\n".join(str(b.value) for b in demo.blocks.values() if type(b).__name__ == "Markdown")


def test_missing_checkpoint_serves_a_help_page_instead_of_crashing(tmp_path):
    cfg = demo_config(tmp_path / "nowhere" / "model.pt")
    demo = launch(cfg, prevent_thread_lock=True, quiet=True)
    try:
        page = httpx.get(f"http://127.0.0.1:{cfg.port}/config", timeout=10).text
    finally:
        demo.close()
    for text in ("No checkpoint found at", "nowhere/model.pt", "make train", RELEASED_URL, "ckpt=/path/to/model.pt"):
        assert text in page
    assert not demo.fns  # nothing to call


def test_an_export_folder_loads_its_model_pt(tiny_ckpt):
    demo = build_demo(demo_config(tiny_ckpt.parent))
    assert f"Model `{tiny_ckpt}` · 10 classes · cascade 4 px → 8 px → 16 px → 32 px" in _markdown(demo)
    assert "generate" in {fn.api_name for fn in demo.fns.values()}


def test_corrupt_checkpoint_explains_what_is_wrong(tmp_path, tiny_ckpt):
    (tmp_path / "model.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "config.yaml").write_text(tiny_ckpt.with_name("config.yaml").read_text())
    text = _markdown(build_demo(demo_config(tmp_path / "model.pt")))
    assert "Could not load" in text and "could not be read" in text and "make train" in text


# ---- the served API (gradio_client) ---------------------------------------------------------
def test_api_generates_images_previews_and_a_zip(client):
    gallery, previews, download, status = client.predict(class_value=3, seed=5, num_images=2, **FAST, api_name="/generate")
    assert [g["caption"] for g in gallery] == ["3: three · #0", "3: three · #1"]
    shown = [np.asarray(Image.open(g["image"]).convert("RGB")) for g in gallery]
    assert all(s.shape == (256, 256, 3) for s in shown)  # 32 px enlarged x8 for display
    assert len(previews) == 8 and previews[4]["caption"] == "#1 · stage 1 (4 px)"
    assert Image.open(previews[0]["image"]).size == (256, 256)
    with zipfile.ZipFile(download["value"]) as zf:
        assert sorted(zf.namelist()) == ["pixelflow_class3_seed5_0.png", "pixelflow_class3_seed5_1.png", "settings.json"]
        native = np.asarray(Image.open(io.BytesIO(zf.read("pixelflow_class3_seed5_1.png"))).convert("RGB"))
        settings = json.loads(zf.read("settings.json"))
    assert native.shape == (32, 32, 3) and native.std() > 1
    assert (np.repeat(np.repeat(native, 8, 0), 8, 1) == shown[1]).all()  # display = nearest-neighbour x8 of the PNG
    assert settings["seed"] == 5 and settings["class_index"] == 3 and settings["steps"] == [2, 2, 2, 3]
    assert settings["guidance_scale"] == 5.0  # the quickstart preset's, the initial control
    assert "2 image(s) of class **3: three** · seed 5" in status and "9 model calls" in status


def test_api_same_seed_same_pixels(client):
    def run(seed: int) -> bytes:
        gallery = client.predict(class_value="seven", seed=seed, guidance_scale=6.5, **FAST, api_name="/generate")[0]
        return _pixels(gallery[0]["image"])

    first = run(123)
    assert run(123) == first
    assert run(124) != first


def test_queue_serves_concurrent_users(client):
    # Distinct images: gradio caches outputs by content hash, and two identical images downloaded
    # concurrently would share (and rewrite) one cache file.
    jobs = [client.submit(class_value=c, seed=9, **FAST, api_name="/generate") for c in (1, 2, 3)]
    concurrent = [_pixels(job.result(timeout=60)[0][0]["image"]) for job in jobs]
    assert len(set(concurrent)) == 3
    sequential = _pixels(client.predict(class_value=3, seed=9, **FAST, api_name="/generate")[0][0]["image"])
    assert concurrent[2] == sequential


@pytest.mark.parametrize("bad, message", [
    (dict(shift=0), "Noise Shift must be a number from 1 to 100, got 0"),
    (dict(guidance_scale=30), "Classifier-free Guidance Scale must be a number from 1 to 25, got 30"),
    (dict(steps_2=0), "Num Inference Steps (stage 2) must be a whole number from 1 to 100, got 0"),
    (dict(seed=-1), "Seed must be a whole number from 0 to 4294967295, got -1"),
    (dict(num_images=5), "Number of Images must be a whole number from 1 to 4, got 5"),
    (dict(class_value=10), "Class must be a whole number from 0 to 9, got 10"),
    (dict(dopri5="yes"), "Dopri5 ODE must be true or false, got 'yes'"),
])
def test_api_rejects_out_of_range_values_clearly(client, bad, message):
    with pytest.raises(AppError) as err:
        client.predict(**bad, api_name="/generate")
    assert message in str(err.value)


# ---- the Hydra entrypoint -------------------------------------------------------------------
@pytest.mark.slow
def test_entrypoint_serves_the_given_checkpoint_on_the_given_port(tiny_ckpt, tmp_path):
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "TMPDIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(REPO / "demo.py"), f"ckpt={tiny_ckpt}", f"port={port}"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                httpx.get(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.3)
        assert proc.poll() is None, f"demo.py exited early:\n{proc.stdout.read()}"
        client = open_client(f"http://127.0.0.1:{port}/", tmp_path / "downloads")
        status = client.predict(class_value=2, **FAST, api_name="/generate")[3]
        client.close()
        assert "class **2: two** · seed 42" in status
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert not (tmp_path / "outputs").exists() and not (tmp_path / ".hydra").exists()


def test_demo_page_loads_a_hub_spec_from_the_local_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants as hf_constants

    exported = make_tiny_checkpoint(tmp_path / "ckpt").parent
    snapshot = tmp_path / "hub" / "models--owner--tiny" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    for name in ("model.safetensors", "config.yaml"):
        shutil.copyfile(exported / name, snapshot / name)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = DemoModel.load("hf://owner/tiny", device="cpu")
    assert loaded.source == str(snapshot / "model.safetensors")
    with pytest.raises(CheckpointError, match="allow_download=true"):
        DemoModel.load("hf://owner/absent", device="cpu")
