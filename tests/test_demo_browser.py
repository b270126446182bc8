"""The web demo in a real browser: Debian's chromium driven by playwright (never `playwright install`)."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from pixelflow.demo_app import launch
from tests.test_demo import demo_config, make_tiny_checkpoint

CHROMIUM = Path("/usr/bin/chromium")
LAUNCH_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture
def demo_url(tmp_path) -> Iterator[str]:
    """The demo on a tiny random checkpoint, served in-process on a free port; closed afterwards."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    cfg = demo_config(make_tiny_checkpoint(tmp_path / "ckpt"))
    demo = launch(cfg, prevent_thread_lock=True, quiet=True)
    url = f"http://127.0.0.1:{cfg.port}/"
    yield url
    demo.close()
    with pytest.raises(httpx.ConnectError):
        httpx.get(url, timeout=2)


def test_pick_class_move_slider_generate_and_see_the_gallery(demo_url, tmp_path):
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium (`apt-get install -y chromium`, as .ci/run does); "
                    "this test never uses `playwright install`")
    from playwright.sync_api import expect, sync_playwright

    outside: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=LAUNCH_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.on("request", lambda r: None if r.url.startswith(demo_url) or r.url.startswith("data:") else outside.append(r.url))
            page.goto(demo_url)

            page.get_by_role("combobox", name="Class").click()
            page.get_by_role("option", name="7: seven").click()
            expect(page.get_by_role("combobox", name="Class")).to_have_value("7: seven")

            slider = page.locator("#steps0 input[type=range]")
            slider.fill("3")  # drag "Num Inference Steps (stage 1)" from 10 to 3
            expect(page.locator("#steps0 input[type=number]")).to_have_value("3")
            for k in (1, 2, 3):  # fewer steps elsewhere too, to keep the test fast
                page.locator(f"#steps{k} input[type=number]").fill("2")
                page.locator(f"#steps{k} input[type=number]").press("Enter")

            page.get_by_role("button", name="Generate").click()
            images = page.locator("#gallery img")
            expect(images.first).to_be_visible(timeout=60_000)
            expect(page.locator("#status")).to_contain_text("class 7: seven · seed 42 · Euler, steps 3/2/2/2", timeout=10_000)
            expect(page.locator("#previews img")).to_have_count(4)
            expect(page.locator("#download")).to_be_enabled()

            shot = tmp_path / "demo.png"
            page.screenshot(path=str(shot), full_page=True)
            sources = images.evaluate_all("els => els.map(e => e.src)")
        finally:
            browser.close()

    assert len(sources) == 1 and all(src.startswith(demo_url) for src in sources)
    shown = Image.open(io.BytesIO(httpx.get(sources[0], timeout=10).content)).convert("RGB")
    assert shown.size == (256, 256) and np.asarray(shown).std() > 1  # 32 px enlarged x8, not a blank image
    with Image.open(shot) as im:
        assert im.width == 1280 and im.height >= 1100
    assert not outside, f"the page reached outside the demo server: {outside}"
