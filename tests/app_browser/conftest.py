"""Fixtures and helpers of the studio's browser tests (this folder only; headless Chromium through
pytest-playwright's `page`, the app served from this process): `studio_app` (the app serving `app_checkpoint`
(tests/conftest.py: the embedded model when present, else the small random one) with a fresh annotation store, one
per test module) and `app` (the page on it, failing the test on any page error or console error). The test modules
import `TIMEOUT` and the plain helpers from here: `_load_example`, `_open_tab`, `_click_image`, `_screen`,
`_slow_words`, `_last_generation`. Every wait is an `expect` with a timeout (no sleeps)."""

from __future__ import annotations

import re
import time

import pytest
from playwright.sync_api import Page, expect

from tests.conftest import start_studio, stop_studio

TIMEOUT = 20_000  # ms; streamed output on 2 busy cores


@pytest.fixture(scope="module")
def studio_app(app_checkpoint, example_images, tmp_path_factory):
    studio = start_studio(app_checkpoint, example_images, tmp_path_factory.mktemp("app-store") / "annotations.db")
    yield studio
    stop_studio(studio)


@pytest.fixture
def app(page: Page, studio_app):
    """The page on the app; fails the test on any page error or console error."""
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(f"pageerror: {err}"))
    page.on("console", lambda msg: errors.append(f"console.error: {msg.text}") if msg.type == "error" else None)
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT)
    page.goto(studio_app.url)
    yield page
    assert not errors, errors


def _load_example(page: Page, index: int = 0) -> None:
    page.locator("#examples button").nth(index).click()
    expect(page.locator("#caption-viewer .px-stage.px-has-image")).to_have_count(1, timeout=TIMEOUT)


def _open_tab(page: Page, name: str, viewer: str) -> None:
    """Switch tab; its viewer (mounted only now) must show the image loaded before."""
    page.get_by_role("tab", name=name).click()
    expect(page.locator(f"{viewer} .px-stage.px-has-image")).to_have_count(1, timeout=TIMEOUT)
    expect(page.locator(f"{viewer} image.px-base")).to_have_attribute("href", re.compile(r"^data:image/png;base64,"))


def _click_image(page: Page, viewer: str, x: float, y: float) -> None:
    """Click image pixel (x, y) of a viewer (through the SVG's own screen transform)."""
    sx, sy = _screen(page, viewer, x, y)
    page.mouse.click(sx, sy)


def _screen(page: Page, viewer: str, x: float, y: float) -> tuple[float, float]:
    return page.evaluate(
        """([sel, x, y]) => { const svg = document.querySelector(sel + ' svg.px-svg');
             const p = new DOMPoint(x, y).matrixTransform(svg.getScreenCTM()); return [p.x, p.y]; }""",
        [viewer, x, y])


def _slow_words(monkeypatch, predictor, seconds: float) -> None:
    """The served predictor streams each word `seconds` after the last (for this test only)."""
    real = predictor.stream_caption

    def slowed(*args, **kwargs):
        for word in real(*args, **kwargs):
            time.sleep(seconds)
            yield word

    monkeypatch.setattr(predictor, "stream_caption", slowed)


def _last_generation(store, task: str = "caption") -> dict:
    return store.list_generations(task=task, limit=1)[0]
