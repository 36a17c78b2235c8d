"""A load that fails with a server fault, not a refusal (an OSError or MemoryError while decoding, a RuntimeError from
the image encoder): the page keeps working on the image it showed, with a message that says the new image could not
be loaded, and the next upload works. The fault used to leave the page's session marked replaced with no successor:
every later click and action on the page was dropped without a word (Generate stuck at "Generating…"), and a caption
streaming on the old image was cut. Driven through the handlers layout.py registers, with the inputs the page sends
(`SEND_SHOWN_IMAGE`): the image input's file (the one that failed) and the key of the image the views show.

A refused file (ValueError: not an image, too large): test_callbacks_images.py. The rest of tests/app_callbacks/: see
test_callbacks_refer_dense.py's docstring. Fixtures: conftest.py."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import gradio as gr
import pytest

from pixelllm.ui import callbacks as cb
from pixelllm.ui import workspace as ws
from tests.app_callbacks.conftest import VISITOR, _loaded
from tests.app_callbacks.test_callbacks_shown_image import ACTIONS, REQUEST

FAULTS = {  # where the load fails, and with what
    "decoder OSError": ("decode", lambda: OSError(5, "Input/output error")),
    "decoder MemoryError": ("decode", MemoryError),
    "encoder RuntimeError": ("encode", lambda: RuntimeError("CUDA out of memory")),
}


@pytest.fixture
def fail_once(monkeypatch):
    """`fail_once(studio, fault, path)`: the next load of the file `path` fails with FAULTS[fault], in the decoder
    (`workspace.load_user_image`) or in the predictor's `set_image` (the image encoder); loads after it work."""
    def arm(studio, fault: str, path: str) -> None:
        where, fault_error = FAULTS[fault]
        armed = [True]
        decode, encode = ws.load_user_image, studio.predictor.set_image
        target = decode(path).array

        def decoding(source):
            if armed[0] and source == path:
                armed[0] = False
                raise fault_error()
            return decode(source)

        def encoding(image):
            if armed[0] and getattr(image, "shape", None) == target.shape and (image == target).all():
                armed[0] = False
                raise fault_error()
            return encode(image)

        if where == "decode":
            monkeypatch.setattr(ws, "load_user_image", decoding)
        else:
            monkeypatch.setattr(studio.predictor, "set_image", encoding)
    return arm


def _handler(demo, name: str):
    return next(fn for fn in demo.fns.values() if fn.name == name)


def change(demo, source, session) -> tuple:
    """The image input's change event (layout.py's on_image)."""
    return _handler(demo, "on_image").fn(source, session)


def press(demo, action: str, session, source: str, showing: str) -> tuple:
    """An action's event as the page sends it; returns (its session, its view)."""
    name, inputs, session_at, view_at = ACTIONS[action]
    out = _handler(demo, name).fn(session, None, None, source, showing, *inputs, request=REQUEST)
    if action == "generate":
        out = list(out)[-1]
    return out[session_at], out[view_at]


def pick(demo, session, x: int, y: int) -> tuple:
    """A click on the caption viewer (layout.py's on_pick, a positive point)."""
    return _handler(demo, "on_pick").fn(session, "Positive point", SimpleNamespace(_data={"x": x, "y": y}))


def _is_skip(value) -> bool:
    return value == gr.skip()


def _not_loaded(refused: pytest.ExceptionInfo) -> None:
    message = refused.value.message
    assert "could not be loaded" in message and "keeps" in message


@pytest.mark.parametrize("fault", FAULTS)
def test_a_load_that_fails_leaves_the_page_working_on_the_image_it_showed(demo, page_session, upload, example_images,
                                                                         fail_once, fault, caplog):
    first, second = upload(example_images[0]), upload(example_images[1])
    session = change(demo, first, page_session)[0]
    key = session.image["key"]
    fail_once(demo.studio, fault, second)
    with caplog.at_level(logging.ERROR, logger="pixelllm.ui.workspace"), pytest.raises(gr.Error) as refused:
        change(demo, second, session)  # the user uploads another image
    _not_loaded(refused)
    assert type(FAULTS[fault][1]()).__name__ in refused.value.message
    assert any(r.exc_info for r in caplog.records)  # a server fault: its traceback goes to the host's log
    assert not session.replaced and session.successor is None and ws.newest(session) is session

    # a prompt click on the image shown
    clicked, view = pick(demo, session, 40, 50)
    assert clicked is session and not _is_skip(view) and view["image"]["key"] == key
    assert session.prompts == [{"kind": "point", "xy": [40.0, 50.0], "label": 1}]
    ws.clear_prompts(session)
    # every action, pressed as the page sends it: its image input holds the file that failed, its views the first
    for action in ACTIONS:
        worked, view = press(demo, action, session, second, key)
        assert worked is session and not _is_skip(view), action
        assert view["status"] == "done" and view["image"]["key"] == key, action

    # the next upload works (the same file: gradio names an upload after its content), and the chain follows it
    opened, cap, ref, dense = change(demo, second, session)[:4]
    assert opened is not session and session.replaced and session.successor is opened and not opened.replaced
    assert all(isinstance(v, dict) and v["image"]["key"] == opened.image["key"] != key for v in (cap, ref, dense))
    assert press(demo, "refer", session, second, opened.image["key"])[0] is opened


@pytest.mark.parametrize("fault", ["decoder OSError", "encoder RuntimeError"])
def test_a_failed_first_upload_says_so_and_the_next_upload_works(demo, page_session, upload, example_images,
                                                                 fail_once, fault):
    path = upload(example_images[0])
    fail_once(demo.studio, fault, path)
    with pytest.raises(gr.Error) as refused:
        change(demo, path, page_session)
    _not_loaded(refused)
    assert not page_session.replaced and page_session.successor is None
    with pytest.raises(gr.Error, match="Upload, paste or pick an example image first"):
        press(demo, "generate", page_session, path, "")  # not silence: the page shows no image
    opened = change(demo, path, page_session)[0]
    assert opened.image is not None and page_session.successor is opened
    assert press(demo, "dense", page_session, path, opened.image["key"])[1]["status"] == "done"


@pytest.mark.parametrize("fault", ["decoder OSError", "encoder RuntimeError"])
def test_an_action_that_loads_the_image_itself_and_fails_says_so(demo, page_session, upload, example_images,
                                                                fail_once, fault):
    """Generate pressed while the new image's change event has not run yet loads the file itself (shown_session):
    a fault there refuses the action with the same message, and the page keeps its image."""
    first, second = upload(example_images[0]), upload(example_images[1])
    session = change(demo, first, page_session)[0]
    key = session.image["key"]
    fail_once(demo.studio, fault, second)
    with pytest.raises(gr.Error) as refused:
        press(demo, "generate", session, second, key)
    _not_loaded(refused)
    assert not session.replaced and session.successor is None
    worked, view = press(demo, "trace", session, second, key)
    assert worked is session and view["status"] == "done" and view["image"]["key"] == key


def test_a_load_that_fails_while_a_caption_streams_leaves_the_caption_streaming(studio, example_images, monkeypatch):
    """load_image stops a caption streaming on the old image (and waits for it) before the new image's views go: a
    fault in the new image's encoder then cut that caption for nothing, its view stuck on "Generating… n words". The
    image is now encoded before the old session is given up: the caption goes on to the end and is kept."""
    session = _loaded(studio, example_images[0])
    updates = cb.generate(studio, session, None, 12, False, 1.0, 1.0, None, VISITOR)
    shown = [next(updates) for _ in range(3)][-1]  # "Generating…", then two words
    encode = studio.predictor.set_image

    def failing(image):
        if image is not session.array:
            raise RuntimeError("CUDA out of memory")
        return encode(image)

    monkeypatch.setattr(studio.predictor, "set_image", failing)
    with pytest.raises(gr.Error) as refused:
        ws.load_image(studio, str(example_images[1]), session)
    _not_loaded(refused)
    assert not session.replaced and session.streams == 1
    rest = list(updates)
    view, text, files, kept = rest[-1]
    assert kept is session and view["status"] == "done" and text.split()[:2] == shown[1].split()
    assert session.caption is not None and session.caption["text"] == text
    row = studio.store.list_generations(task="caption", limit=1)[0]
    assert "abandoned" not in row["extra"] and row["words"] == text.split()


def test_picking_the_image_shown_again_after_a_failed_load_keeps_its_session(studio, example_images, monkeypatch):
    """(Was: the given-up session opened afresh for the same file.) The page's session was never given up: picking
    its image again keeps it, with its prompts, and sends no views (the page shows them)."""
    shown = str(example_images[0])
    session = _loaded(studio, shown)
    session, _ = ws.click(session, "Positive point", {"x": 40, "y": 50})
    monkeypatch.setattr(studio.predictor, "set_image", lambda image: (_ for _ in ()).throw(RuntimeError("OOM")))
    with pytest.raises(gr.Error):
        ws.load_image(studio, str(example_images[1]), session)
    monkeypatch.undo()
    again, *views = ws.load_image(studio, shown, session)
    assert again is session and not again.replaced and all(_is_skip(v) for v in views)
    assert again.prompts == [{"kind": "point", "xy": [40.0, 50.0], "label": 1}]


def test_a_failed_load_on_a_page_without_a_session_object_says_so(studio, example_images, monkeypatch):
    """The state is not a Session (an API call, an old page): the fault still leaves as the message."""
    monkeypatch.setattr(studio.predictor, "set_image", lambda image: (_ for _ in ()).throw(MemoryError()))
    with pytest.raises(gr.Error) as refused:
        ws.load_image(studio, str(example_images[0]), None)
    _not_loaded(refused)
