"""An action pressed while the page's image still loads (`workspace.shown_session`, wired in layout.py): a page's
events carry one Session from the first (gr.State's initial empty one), and an action meets the image's load on
`Session.loading` in either order — it finds the image loaded, or loads it itself and the image's change event
(`load_image`) then only sends the views. Here Generate's cases at the callback level, and in a real browser Trace,
Locate and Dense pressed as the first image loads and every action after gradio dropped the page's state; their
callback-level cases are `tests/app_callbacks/test_callbacks_shown_image.py`. Generate's browser side is
`tests/app_browser/test_browser_image_loading.py::test_generate_pressed_while_the_first_image_loads_captions_that_image`."""

from __future__ import annotations

import copy
import hashlib
import re
import shutil
import threading
import time
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

from pixelllm import image as imaging
from pixelllm.ui import callbacks as cb
from pixelllm.ui import records, render
from pixelllm.ui import workspace as ws
from tests.conftest import start_studio, stop_studio
from tests.helpers import set_slider

torch.set_num_threads(1)
VISITOR = records.Visitor("test")


@pytest.fixture
def studio(small_predictor, annotation_store, tmp_path):
    return ws.Studio(predictor=small_predictor, store=annotation_store, checkpoint="tests/small-checkpoint",
                     min_word_interval=0.0, download_root=tmp_path / "downloads")


@pytest.fixture
def page_session():
    """What a page's events carry before its first image: gr.State's initial Session, deep-copied for the page as
    gradio does (layout.py)."""
    return copy.deepcopy(ws.Session())


@pytest.fixture
def loads(monkeypatch):
    """The files decoded for a new session (`load_user_image`), in order."""
    decoded: list[str] = []
    decode = ws.load_user_image

    def counted(source):
        decoded.append(source)
        return decode(source)

    monkeypatch.setattr(ws, "load_user_image", counted)
    return decoded


def _has_image(view) -> bool:
    return isinstance(view, dict) and bool(view.get("image"))


def test_a_caption_pressed_while_the_first_image_loads_waits_for_that_load(studio, page_session, upload,
                                                                           example_images, monkeypatch):
    path = upload(example_images[0])
    gate, decode = threading.Event(), ws.load_user_image
    monkeypatch.setattr(ws, "load_user_image", lambda source: (gate.wait(10), decode(source))[1])
    answers: dict[str, object] = {}
    change = threading.Thread(target=lambda: answers.update(change=ws.load_image(studio, path, page_session)))
    change.start()
    deadline = time.monotonic() + 10
    while not page_session.loading.locked() and change.is_alive() and time.monotonic() < deadline:
        change.join(0.001)  # until the image's change event is loading it
    assert page_session.loading.locked()
    caption = threading.Thread(target=lambda: answers.update(caption=ws.shown_session(studio, path, page_session)))
    caption.start()
    gate.set()
    change.join(10)
    caption.join(10)
    session, cap, ref, dense = answers["change"]
    assert answers["caption"] is session and session.array is not None and page_session.replaced
    assert _has_image(cap) and _has_image(ref) and _has_image(dense)
    assert list(cb.generate(studio, session, None, 3, False, 1.0, 1.0, None, VISITOR))[-1][0]["status"] == "done"


def test_a_caption_that_comes_first_loads_the_image_and_its_change_event_sends_the_views(studio, page_session,
                                                                                        upload, example_images, loads):
    """Gradio's queue may start the caption first (the two events are in different concurrency groups)."""
    path = upload(example_images[0])
    session = ws.shown_session(studio, path, page_session)
    assert session is not page_session and session.source == path and page_session.replaced
    frames = list(cb.generate(studio, session, None, 3, False, 1.0, 1.0, None, VISITOR))
    assert all(_has_image(view) for view, *_ in frames)  # the caption's frames draw the image
    same, cap, ref, dense = ws.load_image(studio, path, page_session)  # the image's change event, late
    assert same is session and _has_image(ref) and _has_image(dense)
    assert cap == gr.skip()  # the caption's own view (and text, downloads) stays
    assert ws.load_image(studio, path, page_session)[1:] == (gr.skip(),) * 3  # gradio's next change: nothing new
    assert loads == [path]  # decoded once

    other = upload(example_images[1])  # a caption that loads its image, then fails to start (a text too long)
    session = ws.shown_session(studio, other, session, session.image["key"])
    with pytest.raises(gr.Error):
        list(cb.generate(studio, session, "word " * 200, 3, False, 1.0, 1.0, None, VISITOR))
    assert all(_has_image(view) for view in ws.load_image(studio, other, page_session)[1:])  # every view goes


def test_a_caption_pressed_right_after_another_upload_captions_the_new_image(studio, page_session, upload,
                                                                            example_images, loads):
    first = ws.load_image(studio, upload(example_images[0]), page_session)[0]
    second = upload(example_images[1])
    # the page still carries the first image's session, and its views show that image
    session = ws.shown_session(studio, second, first, first.image["key"])
    assert session.source == second and first.replaced and first.successor is session
    assert ws.load_image(studio, second, first)[0] is session and len(loads) == 2


def test_a_caption_keeps_to_the_image_shown_for_a_refused_file_or_a_path_that_is_no_upload(studio, page_session,
                                                                                         upload, example_images,
                                                                                         tmp_path, loads):
    """The page keeps working on its image after a refused upload (docs/app.md), and a caption loads nothing but a
    file gradio holds as an upload: not a path the page made up, not one gone with gradio's cache."""
    session = ws.load_image(studio, upload(example_images[0]), page_session)[0]
    bad = Path(upload(example_images[0])).with_name("not-an-image.png")
    bad.write_bytes(b"not an image")
    with pytest.raises(gr.Error, match="not an image"):
        ws.load_image(studio, str(bad), session)
    outside = shutil.copy(example_images[1], tmp_path / "elsewhere.png")
    gone = Path(upload(example_images[1]))
    gone.unlink()
    for source in (str(bad), outside, str(gone), "/etc/hostname", "", None):
        assert ws.shown_session(studio, source, session, session.image["key"]) is session
        assert not session.replaced
    assert len(loads) == 2  # the first image and the refused file, each once


def test_the_page_state_starts_as_one_empty_session_per_page(small_predictor):
    """gr.State's initial value is an empty Session: gradio serialises the State's config through
    dataclasses.asdict and deep-copies the value for each page; each copy has a lock of its own."""
    from pixelllm.ui import build_demo

    demo = build_demo(small_predictor)
    state = next(b for b in demo.blocks.values() if isinstance(b, gr.State) and isinstance(b.value, ws.Session))
    demo.get_config_file()  # the page's config (a lock in a field failed here: it cannot be copied)
    one, two = copy.deepcopy(state.value), copy.deepcopy(state.value)
    assert one.image is None and one.loading is not two.loading and one.loading is not state.value.loading


def test_a_caption_that_waited_while_the_page_moved_on_keeps_to_the_new_image(studio, page_session, upload,
                                                                             example_images, loads):
    """Generate pressed on image A waits in the queue (the model's slots busy) while the user picks image B, whose
    change event loads it: the caption then runs on B's session with A's file (and A's view key) sent. It must not
    load A over B (the image input, Referring and Dense show B); it captions B, as it did before shown_session.
    Nor after the image was cleared. A file picked again after another (A, B, A: its upload path is the same) is
    loaded: the views showed B when Generate was pressed."""
    first_path, second_path = upload(example_images[0]), upload(example_images[1])
    first = ws.load_image(studio, first_path, page_session)[0]
    second = ws.load_image(studio, second_path, first)[0]
    assert ws.shown_session(studio, first_path, second, first.image["key"]) is second and not second.replaced
    cleared = ws.load_image(studio, None, second)[0]
    assert ws.shown_session(studio, first_path, cleared, first.image["key"]) is cleared
    assert ws.shown_session(studio, first_path, cleared, "").source == first_path  # after the clear: loaded
    again = ws.load_image(studio, second_path, page_session)[0]  # B again, over A (newest of the page)
    picked = ws.shown_session(studio, first_path, again, again.image["key"])  # A picked again, still loading
    assert picked.source == first_path and again.replaced


# ------------------------------------------------------------------------------------------ in a real browser

TIMEOUT = 20_000  # ms; model calls on 2 busy cores


@pytest.fixture(scope="module")
def studio_app(app_checkpoint, example_images, tmp_path_factory):
    studio = start_studio(app_checkpoint, example_images, tmp_path_factory.mktemp("app-store") / "annotations.db")
    yield studio
    stop_studio(studio)


@pytest.fixture
def app(page, studio_app):
    """The page on the app; fails the test on any page error or console error."""
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(f"pageerror: {err}"))
    page.on("console", lambda msg: errors.append(f"console.error: {msg.text}") if msg.type == "error" else None)
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.set_default_timeout(TIMEOUT)
    page.goto(studio_app.url)
    yield page
    assert not errors, errors


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
