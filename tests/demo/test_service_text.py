"""The web demo on a text-to-image checkpoint: prompt boxes instead of the class dropdown, same controls otherwise."""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from pixelflow.demo.app import build_demo
from pixelflow.demo.service import MAX_PROMPT_CHARS, DemoInputError, DemoModel
from tests.conftest import make_t2i_export
from tests.demo.test_service import FAST, demo_config, running_demo


@pytest.fixture(scope="module")
def t2i_ckpt(tmp_path_factory, tiny_t5_dir) -> Path:
    return make_t2i_export(tmp_path_factory.mktemp("t2i") / "export", tiny_t5_dir)


@pytest.fixture(scope="module")
def text_demo(t2i_ckpt) -> DemoModel:
    return DemoModel.load(t2i_ckpt, device="cpu", max_images=4)


@pytest.fixture(scope="module")
def client(t2i_ckpt, tmp_path_factory) -> Iterator[Client]:
    with running_demo(t2i_ckpt, tmp_path_factory.mktemp("downloads")) as client:
        yield client


def test_generation_follows_the_prompt_and_the_negative_prompt(text_demo):
    assert text_demo.is_text and text_demo.encoder.max_length == 32
    req = text_demo.validate(None, False, 1.0, 4.0, [2, 2, 2, 3], 11, 2, prompt=" a handwritten seven ")
    assert req.prompt == "a handwritten seven" and req.negative_prompt == "" and req.class_index is None
    assert req.file_stem == "pixelflow_a_handwritten_seven_seed11"
    a, b = text_demo.generate(req), text_demo.generate(req)
    assert [im.tobytes() for im in a.images] == [im.tobytes() for im in b.images] and a.nfe == [2, 2, 2, 3]
    assert np.asarray(a.images[0]).std() > 1
    for change in (dict(prompt="the digit 3"), dict(prompt="a handwritten seven", negative_prompt="blurry")):
        other = text_demo.generate(text_demo.validate(None, False, 1.0, 4.0, [2, 2, 2, 3], 11, 2, **change))
        assert other.images[0].tobytes() != a.images[0].tobytes()


@pytest.mark.parametrize("args, message", [
    (dict(class_value=3), "this is a text-to-image model: give a Prompt, not a Class"),
    (dict(prompt=7), "Prompt must be text of at most"),
    (dict(prompt="x" * (MAX_PROMPT_CHARS + 1)), "Prompt must be text of at most"),
    (dict(negative_prompt=["a"]), "Negative Prompt must be text"),
])
def test_text_fields_are_validated(text_demo, args, message):
    values = dict(class_value=None, dopri5=False, shift=1.0, guidance_scale=4.0, steps=[1] * 4, seed=0, num_images=1,
                  prompt="a seven") | args
    with pytest.raises(DemoInputError, match=message):
        text_demo.validate(**values)


def test_page_has_prompt_boxes_and_no_class_dropdown(t2i_ckpt):
    demo = build_demo(demo_config(t2i_ckpt, controls={"prompt": "a handwritten seven"}))
    kinds = {(type(b).__name__, getattr(b, "elem_id", None)) for b in demo.blocks.values()}
    assert ("Textbox", "prompt") in kinds and ("Textbox", "negative_prompt") in kinds
    assert not any(elem == "class" for _, elem in kinds)
    texts = "\n".join(str(b.value) for b in demo.blocks.values() if type(b).__name__ == "Markdown")
    assert "text-to-image in pixel space" in texts and "prompts up to 32 tokens" in texts


def test_a_missing_text_encoder_gives_the_help_page(t2i_ckpt, tmp_path):
    broken = tmp_path / "export"
    shutil.copytree(t2i_ckpt.parent, broken, ignore=shutil.ignore_patterns("text_encoder"))
    demo = build_demo(demo_config(broken / "model.pt"))
    texts = "\n".join(str(b.value) for b in demo.blocks.values() if type(b).__name__ == "Markdown")
    assert "text encoder of this text-to-image checkpoint could not be loaded" in texts and "not available locally" in texts


def test_api_generates_from_a_prompt(client):
    gallery, previews, download, status = client.predict(prompt="a handwritten seven", negative_prompt="", seed=5,
                                                          num_images=2, **FAST, api_name="/generate")
    assert [g["caption"] for g in gallery] == ["“a handwritten seven” · #0", "“a handwritten seven” · #1"]
    assert len(previews) == 8 and "2 image(s) for prompt **“a handwritten seven”** · seed 5" in status
    with zipfile.ZipFile(download["value"]) as zf:
        assert "pixelflow_a_handwritten_seven_seed5_1.png" in zf.namelist()
        settings = json.loads(zf.read("settings.json"))
    assert settings["prompt"] == "a handwritten seven" and settings["class_index"] is None
    with pytest.raises(AppError, match="Prompt must be text"):
        client.predict(prompt="x" * (MAX_PROMPT_CHARS + 1), **FAST, api_name="/generate")
