"""The web demo in a real browser: Debian's chromium driven by playwright (never `playwright install`)."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from pixelflow.demo.app import launch
from tests.conftest import make_t2i_export
from tests.demo.test_service import demo_config, make_tiny_checkpoint

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def _serve(ckpt: Path) -> Iterator[str]:
    """The demo on ``ckpt``, served in-process on a free port; closed afterwards."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    cfg = demo_config(ckpt)
    demo = launch(cfg, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{cfg.port}/"
    yield url
    demo.close()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=2)


@pytest.fixture
def demo_url(tmp_path) -> Iterator[str]:
    """The demo on a tiny random class-to-image checkpoint."""
    yield from _serve(make_tiny_checkpoint(tmp_path / "ckpt"))


@pytest.fixture
def text_demo_url(tmp_path, tiny_t5_dir) -> Iterator[str]:
    """The demo on a tiny random text-to-image checkpoint (its tiny T5 beside it)."""
    yield from _serve(make_t2i_export(tmp_path / "t2i", tiny_t5_dir))


def _require_chromium() -> None:
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (`apt-get install -y chromium`, as .ci/run does); "
                    "this test never uses `playwright install`")


def _fewer_steps(page) -> None:
    for k in (1, 2, 3):  # fewer steps in the later stages, to keep the test fast
        page.locator(f"#steps{k} input[type=number]").fill("2")
        page.locator(f"#steps{k} input[type=number]").press("Enter")


def _shown_image(url: str) -> Image.Image:
    return Image.open(io.BytesIO(httpx.get(url, timeout=10).content)).convert("RGB")


@contextmanager
def _demo_page(url: str, outside: list[str]) -> Iterator:
    """A headless chromium page on the demo at ``url``; requests leaving the demo server go to ``outside``."""
    _require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.on("request", lambda r: None if r.url.startswith(url) or r.url.startswith("data:") else outside.append(r.url))
            page.goto(url)
            yield page
        finally:
            browser.close()


def test_pick_class_move_slider_generate_and_see_the_gallery(demo_url, tmp_path):
    outside: list[str] = []
    with _demo_page(demo_url, outside) as page:
        from playwright.sync_api import expect

        page.get_by_role("combobox", name="Class").click()
        page.get_by_role("option", name="7: seven").click()
        expect(page.get_by_role("combobox", name="Class")).to_have_value("7: seven")

        slider = page.locator("#steps0 input[type=range]")
        slider.fill("3")  # drag "Num Inference Steps (stage 1)" from 10 to 3
        expect(page.locator("#steps0 input[type=number]")).to_have_value("3")
        _fewer_steps(page)

        page.get_by_role("button", name="Generate").click()
        images = page.locator("#gallery img")
        expect(images.first).to_be_visible(timeout=60_000)
        expect(page.locator("#status")).to_contain_text("class 7: seven · seed 42 · Euler, steps 3/2/2/2", timeout=10_000)
        expect(page.locator("#previews img")).to_have_count(4)
        expect(page.locator("#download")).to_be_enabled()

        shot = tmp_path / "demo.png"
        page.screenshot(path=str(shot), full_page=True)
        sources = images.evaluate_all("els => els.map(e => e.src)")

    assert len(sources) == 1 and all(src.startswith(demo_url) for src in sources)
    shown = _shown_image(sources[0])
    assert shown.size == (256, 256) and np.asarray(shown).std() > 1  # 32 px enlarged x8, not a blank image
    with Image.open(shot) as im:
        assert im.width == 1280 and im.height >= 1100
    assert not outside, f"the page reached outside the demo server: {outside}"


def test_type_a_prompt_generate_and_see_the_gallery(text_demo_url):
    outside: list[str] = []
    with _demo_page(text_demo_url, outside) as page:
        from playwright.sync_api import expect

        expect(page.get_by_role("combobox", name="Class")).to_have_count(0)  # a prompt box instead
        page.get_by_label("Prompt", exact=True).fill("a handwritten seven")
        page.get_by_label("Negative Prompt").fill("blurry")
        page.locator("#steps0 input[type=number]").fill("2")
        page.locator("#steps0 input[type=number]").press("Enter")
        _fewer_steps(page)

        page.get_by_role("button", name="Generate").click()
        images = page.locator("#gallery img")
        expect(images.first).to_be_visible(timeout=60_000)
        expect(page.locator("#status")).to_contain_text("for prompt “a handwritten seven” · seed 42 · Euler, steps 2/2/2/2",
                                                        timeout=10_000)
        expect(page.locator("#previews img")).to_have_count(4)
        sources = images.evaluate_all("els => els.map(e => e.src)")

    assert len(sources) == 1 and all(src.startswith(text_demo_url) for src in sources)
    shown = _shown_image(sources[0])
    assert shown.size == (256, 256) and np.asarray(shown).std() > 1
    assert not outside, f"the page reached outside the demo server: {outside}"
