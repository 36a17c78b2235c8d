"""End-to-end (marker `browser`): images that load while a caption streams or waits: a new image becomes the
working image, Generate pressed while the page's first image loads or right after another captions that image, a
caption that runs before the image's change event keeps its view, and a queued Generate does not bring back the
image the page left."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from pixelllm.ui import workspace as ws
from tests.app_browser.conftest import (
    TIMEOUT,
    _click_image,
    _last_generation,
    _load_example,
    _open_tab,
    _slow_words,
)

pytestmark = pytest.mark.browser


def test_a_new_image_while_a_caption_streams_becomes_the_working_image(app: Page, studio_app, monkeypatch):
    """Picking another image while a caption still streams: the stream's later updates carried the old session
    back into the page's state, so Referring (and Dense, Annotate) worked on the previous image while the new
    one was shown. The new image stops the stream (`Session.replaced`)."""
    # words 0.25 s apart: on a busy machine the caption ended before the next image came (a caption is logged as
    # abandoned once words were shown: the next image is picked after two)
    _slow_words(monkeypatch, studio_app.predictor, 0.25)
    _load_example(app, 0)
    root = app.locator("#caption-viewer .px-root")
    app.locator("#generate").click()
    expect(root).to_have_attribute("data-status", "streaming", timeout=TIMEOUT)
    app.wait_for_function("Number(document.querySelector('#caption-viewer .px-root').dataset.words) >= 2")

    def shown(viewer: str) -> str:  # the end of the picture's data URL: enough to tell two images apart
        return app.locator(f"{viewer} image.px-base").get_attribute("href")[-48:]

    old = shown("#caption-viewer")
    before = _last_generation(studio_app.store)["id"] if studio_app.store.list_generations(limit=1) else 0
    app.locator("#examples button").nth(1).click()
    # the old stream is over once it has logged the words it showed, flagged as abandoned for another image
    deadline = time.monotonic() + TIMEOUT / 1000
    while time.monotonic() < deadline:
        rows = [g for g in studio_app.store.list_generations(task="caption", limit=5) if g["id"] > before]
        if any(g["extra"].get("abandoned") for g in rows):
            break
        app.wait_for_timeout(100)
    else:
        pytest.fail("the stream on the previous image was not stopped and logged as abandoned")
    app.wait_for_timeout(500)  # frames sent before that log line have reached the page
    new = shown("#caption-viewer")
    assert new != old, "the caption viewer went back to the previous image"
    _open_tab(app, "Referring", "#refer-viewer")
    app.locator("#refer-text textarea").fill("the red circle")
    app.locator("#refer-run").click()
    expect(app.locator("#refer-viewer .px-mask")).to_have_count(1, timeout=TIMEOUT)
    assert shown("#refer-viewer") == new  # Referring worked on the image shown
    app.get_by_role("tab", name="Caption & trace").click()
    assert shown("#caption-viewer") == new


@pytest.mark.parametrize("picked", ["uploaded", "example"])
def test_generate_pressed_while_the_first_image_loads_captions_that_image(app: Page, studio_app, example_images,
                                                                         monkeypatch, picked):
    """Generate pressed right after the page's first image was uploaded (or picked from the examples), while that
    image still loaded (its change event running), answered "Upload, paste or pick an example image first": the
    page had no session yet. The caption now meets that load (workspace.shown_session) and captions the image
    shown, which is loaded once."""
    import hashlib

    from pixelllm import image as imaging
    from pixelllm.ui import render

    decode = ws.load_user_image
    loads: list[str] = []

    def slow_load(source):  # an image that takes a second to load (a photo on a busy machine)
        loads.append(source)
        time.sleep(1.0)
        return decode(source)

    monkeypatch.setattr(ws, "load_user_image", slow_load)
    image = example_images[3]
    if picked == "uploaded":
        app.locator("#image-input input[type=file]").set_input_files(str(image))
    else:
        app.locator("#examples button").nth(3).click()
    expect(app.locator("#image-input img")).to_be_visible()  # the page holds the file; its load runs
    app.locator("#generate").click()
    root = app.locator("#caption-viewer .px-root")
    expect(root).to_have_attribute("data-status", "done", timeout=TIMEOUT)
    expect(app.locator(".toast-body")).to_have_count(0)  # no "Upload ... first"
    row = _last_generation(studio_app.store)
    pixels = render.png_bytes(imaging.load_image(image.read_bytes()))
    assert row["image_sha"] == hashlib.sha256(pixels).hexdigest()  # the caption is the uploaded image's
    assert len(loads) == 1, loads  # the caption and the image's change event met on one load
    expect(app.locator("#caption-text textarea")).to_have_value(" ".join(row["words"]))
    _open_tab(app, "Referring", "#refer-viewer")  # the image reached the other tabs too
    app.get_by_role("tab", name="Caption & trace").click()
    _click_image(app, "#caption-viewer", 150, 190)  # and the page works on it: a point is added to its session
    expect(app.locator("#caption-viewer .px-point.px-pos")).to_have_count(1)


def test_a_caption_that_runs_before_the_images_change_event_loads_the_image_and_keeps_its_view(
        app: Page, studio_app, example_images, monkeypatch):
    """Gradio's queue starts events of different concurrency groups in any order, and the image's change event may
    wait behind other visitors' uploads: Generate can run first. It loads the image itself; the change event, when
    it comes, sends the other tabs their views and leaves the caption's view, text and downloads alone."""
    load, decode = ws.load_image, ws.load_user_image
    before = len(studio_app.store.list_generations(limit=1000))
    loads: list[str] = []

    def after_the_caption(*args):  # the image's change event runs once the caption is logged
        deadline = time.monotonic() + TIMEOUT / 1000
        while len(studio_app.store.list_generations(limit=1000)) == before and time.monotonic() < deadline:
            time.sleep(0.05)
        return load(*args)

    def counted(source):
        loads.append(source)
        return decode(source)

    monkeypatch.setattr(ws, "load_image", after_the_caption)
    monkeypatch.setattr(ws, "load_user_image", counted)
    app.locator("#examples button").nth(2).click()
    expect(app.locator("#image-input img")).to_be_visible()
    app.locator("#generate").click()
    root = app.locator("#caption-viewer .px-root")
    expect(root).to_have_attribute("data-status", "done", timeout=TIMEOUT)
    row = _last_generation(studio_app.store)
    _open_tab(app, "Referring", "#refer-viewer")  # the change event's views came
    app.get_by_role("tab", name="Caption & trace").click()
    expect(root).to_have_attribute("data-status", "done")  # and left the caption as it was
    expect(root).to_have_attribute("data-words", str(len(row["words"])))
    expect(app.locator("#caption-text textarea")).to_have_value(" ".join(row["words"]))
    expect(app.locator("#caption-files a[href$='/caption.json']")).to_have_count(1)
    assert len(loads) == 1, loads
    expect(app.locator(".toast-body")).to_have_count(0)


def _sha(path: Path) -> str:
    import hashlib

    from pixelllm import image as imaging
    from pixelllm.ui import render

    return hashlib.sha256(render.png_bytes(imaging.load_image(path.read_bytes()))).hexdigest()


def test_a_queued_generate_does_not_bring_back_the_image_the_page_left(app: Page, studio_app, example_images,
                                                                      monkeypatch):
    """Generate pressed on image A waited in the queue (the shared model slots busy: here this page's own Locate and
    Dense) while the user picked image B, whose change event loaded it. The caption then ran on B's session with
    A's file, and caption_session (now shown_session) loaded A over B: the image input, Referring and Dense showed
    B, the session A. It captions B, the image the page shows (as before caption_session)."""
    import gradio as gr

    from pixelllm.ui import callbacks as cb

    def busy(*args, **kwargs):  # a model call that holds its slot for a while
        time.sleep(4.0)
        return (gr.skip(),) * 3

    monkeypatch.setattr(cb, "refer", busy)
    monkeypatch.setattr(cb, "dense", busy)
    _load_example(app, 0)
    app.get_by_role("tab", name="Referring").click()
    app.locator("#refer-run").click()
    app.get_by_role("tab", name="Dense captions").click()
    app.locator("#dense-run").click()
    app.get_by_role("tab", name="Caption & trace").click()
    app.locator("#generate").click()  # queued: both model slots are busy
    app.locator("#examples button").nth(1).click()  # the user moves on to image B, loaded at once
    expect(app.locator("#caption-viewer .px-root")).to_have_attribute("data-status", "done", timeout=TIMEOUT)
    assert _last_generation(studio_app.store)["image_sha"] == _sha(example_images[1])


def test_generate_pressed_right_after_another_image_captions_that_image(app: Page, studio_app, example_images,
                                                                       monkeypatch):
    """Generate pressed while a second image loads (the views still show the first): the caption loads the second
    (the page sends the key of the image its views show, and that is still the session's)."""
    _load_example(app, 0)
    decode, loads = ws.load_user_image, []

    def slow_load(source):
        loads.append(source)
        time.sleep(1.0)
        return decode(source)

    monkeypatch.setattr(ws, "load_user_image", slow_load)
    app.locator("#examples button").nth(1).click()
    app.locator("#generate").click()
    expect(app.locator("#caption-viewer .px-root")).to_have_attribute("data-status", "done", timeout=TIMEOUT)
    assert _last_generation(studio_app.store)["image_sha"] == _sha(example_images[1])
    assert len(loads) == 1, loads
    expect(app.locator(".toast-body")).to_have_count(0)
