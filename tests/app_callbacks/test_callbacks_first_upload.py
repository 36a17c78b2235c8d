"""Generate pressed while the page's image still loads (`workspace.shown_session`, wired in layout.py): a page's
events carry one Session from the first (gr.State's initial empty one), and the caption meets the image's load on
`Session.loading` in either order — it finds the image loaded, or loads it itself and the image's change event
(`load_image`) then only sends the views. Trace, Locate and Dense: test_callbacks_shown_image.py; in a real browser:
tests/app_browser/test_browser_image_loading.py (Generate) and tests/app_browser/test_browser_early_actions.py.
Fixtures: conftest.py."""

from __future__ import annotations

import copy
import shutil
import threading
import time
from pathlib import Path

import gradio as gr
import pytest

from pixelllm.ui import callbacks as cb
from pixelllm.ui import workspace as ws
from tests.app_callbacks.conftest import VISITOR


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


