"""In a real browser: Trace, Locate and Dense pressed as the page's first image loads, and every action after gradio
dropped the page's state (`workspace.shown_session`, layout.py's `SEND_SHOWN_IMAGE`). Their callback-level cases:
tests/app_callbacks/test_callbacks_shown_image.py; Generate's browser case: test_browser_image_loading.py.
Fixtures: conftest.py."""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelllm import image as imaging
from pixelllm.ui import render
from pixelllm.ui import workspace as ws
from tests.app_browser.conftest import TIMEOUT
from tests.helpers import set_slider


def _sha(pixels: np.ndarray) -> str:
    return hashlib.sha256(render.png_bytes(pixels)).hexdigest()


def _last_generation(store, task: str) -> dict:
    return store.list_generations(task=task, limit=1)[0]


# Each action: its tab, what to fill before pressing it, its button, its view, the task it is logged under
BROWSER_ACTIONS = {
    "trace": ("Caption & trace", "#caption-viewer", "#trace-run", "caption"),
    "refer": ("Referring", "#refer-viewer", "#refer-run", "refer"),
    "dense": ("Dense captions", "#dense-viewer", "#dense-run", "dense"),
    "generate": ("Caption & trace", "#caption-viewer", "#generate", "caption"),
}


def _ready(page, action: str) -> None:
    """Open the action's tab and fill what it needs."""
    from playwright.sync_api import expect

    page.get_by_role("tab", name=BROWSER_ACTIONS[action][0]).click()
    if action == "trace":
        page.locator("#trace button").first.click()  # the accordion
        page.locator("#trace-text textarea").fill("a large red circle")
    elif action == "refer":
        page.locator("#refer-text textarea").fill("the large blue triangle")
    elif action == "dense":
        set_slider(page, "dense-threshold", "0")
    expect(page.locator(BROWSER_ACTIONS[action][2])).to_be_visible()


def _logged(studio_app, task: str) -> int:
    return len(studio_app.store.list_generations(task=task, limit=10_000))


def _done(page, studio_app, action: str, pixels: np.ndarray, before: int) -> None:
    """The action's view shows its result on the picture, no message popped up, and it worked on `pixels` (its
    output is logged after `before` outputs of its task)."""
    from playwright.sync_api import expect

    _, view, _, task = BROWSER_ACTIONS[action]
    deadline = time.monotonic() + TIMEOUT / 1000
    while _logged(studio_app, task) == before and time.monotonic() < deadline:
        time.sleep(0.05)
    expect(page.locator(f"{view} .px-root")).to_have_attribute("data-status", "done", timeout=TIMEOUT)
    expect(page.locator(f"{view} image.px-base")).to_have_attribute("href", re.compile(r"^data:image/"))
    expect(page.locator(".toast-body")).to_have_count(0)  # no "Upload ... first"
    assert _logged(studio_app, task) == before + 1
    assert _last_generation(studio_app.store, task)["image_sha"] == _sha(pixels)


@pytest.mark.browser
@pytest.mark.parametrize("action", ["trace", "refer", "dense"])
def test_an_action_pressed_as_the_first_image_loads_works_on_that_image(app, studio_app, example_images,
                                                                        monkeypatch, action):
    """Trace, Locate or Dense pressed right after the page's first image was picked, while that image still loads,
    answered "Upload, paste or pick an example image first". The action meets that load and works on the image,
    which is decoded once and reaches every tab."""
    from playwright.sync_api import expect

    decode, loads = ws.load_user_image, []

    def slow_load(source):  # an image that takes a second to load (a photo on a busy machine)
        loads.append(source)
        time.sleep(1.0)
        return decode(source)

    _ready(app, action)
    monkeypatch.setattr(ws, "load_user_image", slow_load)
    before = _logged(studio_app, BROWSER_ACTIONS[action][3])
    app.locator("#examples button").nth(3).click()
    expect(app.locator("#image-input img")).to_be_visible()  # the page holds the file; its load runs
    app.locator(BROWSER_ACTIONS[action][2]).click()
    _done(app, studio_app, action, imaging.load_image(example_images[3].read_bytes()), before)
    assert len(loads) == 1, loads
    for tab, view in [("Caption & trace", "#caption-viewer"), ("Referring", "#refer-viewer"),
                      ("Dense captions", "#dense-viewer")]:
        app.get_by_role("tab", name=tab).click()
        expect(app.locator(f"{view} .px-stage.px-has-image")).to_have_count(1, timeout=TIMEOUT)


def _drop_page_states(studio_app) -> None:
    """What gradio does past the app's session cap (STATE_SESSION_CAPACITY): the states of the pages used least
    recently are gone (here every page's), and their next event starts from gr.State's initial value."""
    holder = studio_app.demo.state_holder
    with holder.lock:
        holder.session_data.clear()
        holder.time_last_used.clear()


@pytest.mark.browser
def test_every_action_works_on_the_image_shown_after_the_page_state_was_dropped(app, studio_app, example_images,
                                                                               tmp_path):
    """A page whose state gradio dropped (its session cap, or an hour after the page closed) still shows its image:
    every action answered "Upload, paste or pick an example image first". The file the page shows is opened again
    (gradio still holds it as an upload) and each action works on it."""
    from playwright.sync_api import expect

    pixels = np.ascontiguousarray(imaging.load_image(example_images[0].read_bytes())[:, ::-1])  # a file of its own
    path = tmp_path / "mirrored.png"
    Image.fromarray(pixels).save(path)
    app.locator("#image-input input[type=file]").set_input_files(str(path))
    expect(app.locator("#caption-viewer .px-stage.px-has-image")).to_have_count(1, timeout=TIMEOUT)
    for action in ("refer", "dense", "trace", "generate"):
        _drop_page_states(studio_app)
        _ready(app, action)
        before = _logged(studio_app, BROWSER_ACTIONS[action][3])
        app.locator(BROWSER_ACTIONS[action][2]).click()
        _done(app, studio_app, action, pixels, before)


@pytest.mark.browser
def test_after_the_page_state_was_dropped_with_its_upload_gone_an_action_says_so(app, studio_app, example_images,
                                                                                 tmp_path):
    """The page's upload gone as well (gradio's cache cleanup removes uploads an hour old): the action says the server
    lost the image, not the "Upload ... first" of a page that shows none."""
    from playwright.sync_api import expect

    pixels = np.ascontiguousarray(imaging.load_image(example_images[1].read_bytes())[::-1])
    path = tmp_path / "flipped.png"
    Image.fromarray(pixels).save(path)
    app.locator("#image-input input[type=file]").set_input_files(str(path))
    expect(app.locator("#caption-viewer .px-stage.px-has-image")).to_have_count(1, timeout=TIMEOUT)
    sessions = [v for s in studio_app.demo.state_holder.session_data.values() for v in s.state_data.values()
                if isinstance(v, ws.Session) and v.source]
    uploaded = {Path(ws.newest(v).source) for v in sessions if ws.newest(v).source.endswith("flipped.png")}
    assert len(uploaded) == 1
    uploaded.pop().unlink()
    _drop_page_states(studio_app)
    _ready(app, "refer")
    app.locator("#refer-run").click()
    expect(app.locator(".toast-body").first).to_contain_text("The server no longer holds the image", timeout=TIMEOUT)
