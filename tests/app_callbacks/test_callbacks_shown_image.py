"""The actions on the page's image (Generate, Trace, Locate, Dense) work on the image the page shows: pressed while
that image still loads, and after gradio dropped the page's state (its session cap, or an hour after the page
closed). Each is run through the handler layout.py registers, with the inputs the page sends (its `js=` hook,
`SEND_SHOWN_IMAGE`: the image input's file and the key of the image the action's view shows); the session logic is
`workspace.shown_session`. Generate's own cases: test_callbacks_first_upload.py.

The rest of tests/app_callbacks/: see test_callbacks_refer_dense.py's docstring. Fixtures: conftest.py."""

from __future__ import annotations

import copy
import hashlib
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest

from pixelllm import image as imaging
from pixelllm.ui import render
from pixelllm.ui import workspace as ws

REQUEST = SimpleNamespace(session_hash="test-page", username=None)  # what gr.Request gives the handlers
# Each action's handler, its own inputs (after the shown image's) and where its session and view are in its update
ACTIONS = {
    "generate": ("on_generate", (None, 3, False, 1.0, 1.0, -1, None), 3, 0),
    "trace": ("on_trace", ("a red circle",), 3, 0),
    "refer": ("on_refer", ("the red circle",), 0, 1),
    "dense": ("on_dense", (0.0, 2), 0, 1),
}
# the views on_image sends: its update is (session, caption view, refer view, dense view, ...)
VIEW_OF = {"generate": 1, "trace": 1, "refer": 2, "dense": 3}


def _handler(demo, name: str):
    return next(fn for fn in demo.fns.values() if fn.name == name)


def press(demo, action: str, session, source: str | None, showing: str | None) -> tuple:
    """Run an action's event as the page sends it, on `session` (the page's state when the event runs): with the
    event's js hook, the image input's file `source` and the key `showing` of the image the action's view shows;
    without one, the action's own inputs only. Returns (its last update, its session, its view)."""
    name, inputs, session_at, view_at = ACTIONS[action]
    fn = _handler(demo, name)
    args = [session, None, None, source or "", showing or "", *inputs] if fn.js else [session, *inputs]
    out = fn.fn(*args, request=REQUEST)
    if action == "generate":
        out = list(out)[-1]
    return out, out[session_at], out[view_at]


def change(demo, source: str | None, session) -> tuple:
    """The image input's change event (layout.py's on_image): (session, caption view, refer view, dense view,
    caption text, caption files, refer files, region text, dense files)."""
    return _handler(demo, "on_image").fn(source, session)


def _sha(path: Path) -> str:
    return hashlib.sha256(render.png_bytes(imaging.load_image(path.read_bytes()))).hexdigest()


def _is_skip(value) -> bool:
    return value == gr.skip()  # an empty update (a dict, as the views are)


def _worked_on(demo, action: str, session, view, image: Path) -> None:
    """The action's update carries a result for `image`, and the store logged it for that image."""
    assert session.image is not None and session.image["key"] == imaging.image_key(imaging.load_image(
        image.read_bytes()))
    assert view["status"] == "done" and view["image"]["key"] == session.image["key"]
    if action in ("refer", "dense"):
        assert view["regions"]
    else:
        assert view["words"]
    task = {"refer": "refer", "dense": "dense"}.get(action, "caption")
    assert demo.studio.store.list_generations(task=task, limit=1)[0]["image_sha"] == _sha(image)


@pytest.mark.parametrize("action", ["trace", "refer", "dense"])
@pytest.mark.parametrize("order", ["action first", "while the image loads"])
def test_an_action_pressed_as_the_first_image_is_uploaded_works_on_that_image(demo, page_session, upload,
                                                                              example_images, monkeypatch, loads,
                                                                              action, order):
    """Trace, Locate or Dense pressed in the same instant as the page's first upload answered "Upload, paste or pick
    an example image first": the page had no session yet. Gradio's queue may start the action before the image's
    change event (different concurrency groups), or while it loads: the action loads the image itself, or meets
    that load on the session's lock. The change event then sends the views the action did not draw, and leaves the
    action's own view (which carries the picture) and downloads alone."""
    path = upload(example_images[0])
    if order == "action first":
        out, session, view = press(demo, action, page_session, path, "")
        views = change(demo, path, page_session)
    else:
        gate, decode = threading.Event(), ws.load_user_image
        monkeypatch.setattr(ws, "load_user_image", lambda source: (gate.wait(10), decode(source))[1])
        answers: dict[str, object] = {}

        def run(key, call):  # in a thread of its own, as gradio runs each event; an error is raised below
            try:
                answers[key] = call()
            except Exception as err:  # noqa: BLE001
                answers[key] = err

        loading = threading.Thread(target=run, args=("views", lambda: change(demo, path, page_session)))
        loading.start()
        deadline = time.monotonic() + 10
        while not page_session.loading.locked() and loading.is_alive() and time.monotonic() < deadline:
            loading.join(0.001)  # until the image's change event is loading it
        assert page_session.loading.locked()
        pressed = threading.Thread(target=run, args=("action", lambda: press(demo, action, page_session, path, "")))
        pressed.start()
        gate.set()
        loading.join(10)
        pressed.join(10)
        for answer in answers.values():
            if isinstance(answer, Exception):
                raise answer
        out, session, view = answers["action"]
        views = answers["views"]
    _worked_on(demo, action, session, view, example_images[0])
    assert views[0] is session and loads == [path]  # one session, the image decoded once
    sent = [not _is_skip(v) for v in views[1:4]]
    if order == "action first":  # the views other than the action's go; the action's view and downloads stay
        assert view["image"]["src"]  # the picture comes with the action's view
        assert sent == [i != VIEW_OF[action] for i in (1, 2, 3)]
        files = {"trace": views[5], "refer": views[6], "dense": views[8]}[action]
        assert _is_skip(files)
    else:  # the change event sent every view before the action ran
        assert all(sent) and not _is_skip(views[6])


@pytest.mark.parametrize("action", ["generate", "trace", "refer", "dense"])
def test_after_the_page_state_was_dropped_an_action_reopens_the_image_shown(demo, page_session, upload, example_images,
                                                                            loads, action):
    """Gradio keeps the states of the app's most recent pages only (STATE_SESSION_CAPACITY), and a closed page's for
    an hour; a page whose state it dropped gets a fresh empty Session while it still shows its image. Every action
    then answered "Upload, paste or pick an example image first". The file the page shows is opened again while
    gradio still holds it as an upload: the action works on it, and the views, which show it already, stay."""
    path = upload(example_images[0])
    shown = change(demo, path, page_session)[0]
    dropped = copy.deepcopy(ws.Session())  # what gradio gives the page's next event
    out, session, view = press(demo, action, dropped, path, shown.image["key"])
    _worked_on(demo, action, session, view, example_images[0])
    assert session is not shown and loads == [path, path]  # reopened
    if action in ("refer", "dense"):
        assert view["image"]["src"] is None  # the page shows the picture already
    assert all(_is_skip(v) for v in change(demo, path, session)[1:])  # a late change event resends nothing
    out, again, view = press(demo, action, session, path, shown.image["key"])
    assert again is session and len(loads) == 2  # the next action keeps to it


@pytest.mark.parametrize("action", ["generate", "trace", "refer", "dense"])
def test_after_the_page_state_was_dropped_with_its_file_gone_an_action_says_so(demo, page_session, upload,
                                                                               example_images, action):
    """The page's file gone too (gradio's cache cleanup removes uploads after an hour; or never an upload): a message
    that says the server lost the image, not the "Upload ... first" of a page that shows none."""
    path = upload(example_images[0])
    shown = change(demo, path, page_session)[0]
    Path(path).unlink()
    for source in (path, str(example_images[0]), ""):
        with pytest.raises(gr.Error) as refused:
            press(demo, action, copy.deepcopy(ws.Session()), source, shown.image["key"])
        assert "The server no longer holds the image this page shows" in refused.value.message


def test_after_the_page_state_was_dropped_a_newer_file_in_the_image_input_is_loaded(demo, page_session, upload,
                                                                                    example_images):
    """State dropped while the image input already holds a newer file than the views show (its change event still to
    come): the action loads that file, as it would over the session's image, and the change event sends its views."""
    first, second = upload(example_images[0]), upload(example_images[1])
    shown = change(demo, first, page_session)[0]
    dropped = copy.deepcopy(ws.Session())
    out, session, view = press(demo, "refer", dropped, second, shown.image["key"])
    _worked_on(demo, "refer", session, view, example_images[1])
    assert view["image"]["src"]
    views = change(demo, second, dropped)
    assert views[0] is session and not _is_skip(views[1]) and not _is_skip(views[3]) and _is_skip(views[2])


@pytest.mark.parametrize("action", ["trace", "refer", "dense"])
def test_a_queued_action_keeps_to_the_image_the_page_moved_on_to(demo, page_session, upload, example_images, loads,
                                                                 action):
    """An action pressed on image A that waited in the queue (the model's slots busy) while the user picked B sends
    A's file and A's key: it works on B, the image the page shows, and does not load A back over it. Nor after the
    image was cleared (that session was sent to the page: not a dropped state)."""
    first, second = upload(example_images[0]), upload(example_images[1])
    a = change(demo, first, page_session)[0]
    b = change(demo, second, a)[0]
    out, session, view = press(demo, action, b, first, a.image["key"])
    assert session is b and not b.replaced
    _worked_on(demo, action, session, view, example_images[1])
    cleared = change(demo, None, b)[0]
    with pytest.raises(gr.Error) as refused:
        press(demo, action, cleared, first, a.image["key"])
    assert refused.value.message == render.notice(ValueError(ws.NO_IMAGE))
    assert loads == [first, second]
