"""Races and forgeries around the shared `SEND_SHOWN_IMAGE` path (workspace.shown_session) for Trace, Locate and Dense:
the image's change event meeting an action that loaded the image, a forged `shown_image` on a page whose state
gradio dropped, and the HTTP API endpoints, which do not go through the page's hook. Fixtures: conftest.py and
tests/conftest.py; the handlers are run as in test_callbacks_shown_image.py."""

from __future__ import annotations

import copy
import os
import uuid
from pathlib import Path

import gradio as gr
import pytest
from gradio.utils import get_upload_folder

from pixelllm.ui import records
from pixelllm.ui import workspace as ws
from tests.app_callbacks.test_callbacks_shown_image import _handler, _is_skip, change, press


@pytest.mark.parametrize("action, view_at", [("refer", 2), ("dense", 3)])
def test_a_change_event_that_comes_while_the_action_writes_its_results_leaves_the_picture_with_the_action(
        demo, page_session, upload, example_images, monkeypatch, action, view_at):
    """Locate or Dense pressed as the first image is uploaded loads it (shown_session). Its change event may come
    at any time (gradio's queue starts the events of different concurrency groups in any order): here while the
    action writes its downloads, after it has kept its results on the session. The change event then leaves the
    action's view alone (its results are there), so the action's own view must carry the picture. It read
    `session.shown` only at its end, which the change event had just set: neither update drew the picture into
    that view (the page then showed the regions over the previous image, or over nothing)."""
    path = upload(example_images[0])
    arrived: list[tuple] = []
    write = records.write_json

    def change_arrives(*args, **kwargs):  # the image's change event, run while the action writes its downloads
        if not arrived:
            arrived.append(change(demo, path, page_session))
        return write(*args, **kwargs)

    monkeypatch.setattr(records, "write_json", change_arrives)
    out, session, view = press(demo, action, page_session, path, "")
    assert arrived, "the change event did not run"
    views = arrived[0]
    assert views[0] is session and session.shown
    assert view["status"] == "done" and view["image"]["key"] == session.image["key"]
    action_view, change_view = view, views[view_at]
    assert action_view["image"]["src"] or (not _is_skip(change_view) and change_view["image"]["src"]), \
        "no update draws the picture into the action's view"
    assert _is_skip(change_view)  # and the change event still leaves the action's results alone


@pytest.mark.parametrize("action", ["generate", "trace", "refer", "dense"])
def test_a_forged_shown_image_on_a_dropped_page_opens_no_file_outside_the_upload_folder(
        demo, upload, example_images, tmp_path, monkeypatch, action):
    """A page whose state gradio dropped opens the file its hook names again, but only a file gradio holds as an
    upload: not an absolute path elsewhere, not `..` out of the upload folder, not a link in it to a file
    outside. Each is refused with IMAGE_LOST and nothing is read."""
    shown = change(demo, upload(example_images[0]), copy.deepcopy(ws.Session()))[0]
    outside = tmp_path / "outside.png"
    outside.write_bytes(example_images[1].read_bytes())
    folder = Path(get_upload_folder()) / uuid.uuid4().hex
    folder.mkdir(parents=True)
    link = folder / "link.png"
    os.symlink(outside, link)
    read: list[str] = []
    decode = ws.load_user_image
    monkeypatch.setattr(ws, "load_user_image", lambda source: (read.append(source), decode(source))[1])
    climbing = f"{get_upload_folder()}/{folder.name}/../{os.path.relpath(outside, get_upload_folder())}"
    for source in (str(outside), climbing, str(link), "/etc/hostname", str(tmp_path)):
        with pytest.raises(gr.Error) as refused:
            press(demo, action, copy.deepcopy(ws.Session()), source, shown.image["key"])
        assert "The server no longer holds the image this page shows" in refused.value.message, source
    assert read == []


@pytest.mark.parametrize("name", ["caption", "trace", "refer", "dense"])
def test_the_api_endpoints_take_their_image_and_no_page_state(demo, example_images, name):
    """The HTTP API's /caption, /trace, /refer and /dense do not go through the page's hook (no js, no gr.State):
    they open the file the client sends, each call on its own, as before."""
    fn = _handler(demo, name)
    assert fn.js is None and fn.api_name == name and fn.concurrency_id == ws.MODEL_CALLS
    assert not any(isinstance(block, gr.State) for block in fn.inputs)
    args = {"caption": (str(example_images[0]), "", "", 3, False, 1.0, 1.0, -1, None),
            "trace": (str(example_images[0]), "", "a red circle"),
            "refer": (str(example_images[0]), "the red circle"),
            "dense": (str(example_images[0]), 0.0, 2)}[name]
    result = fn.fn(*args, request=None)
    assert isinstance(result, dict) and result
