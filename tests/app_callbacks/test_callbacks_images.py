"""Opening and replacing the image (pixelllm/ui/workspace.py, state.py) on a real predictor (a small random
checkpoint): the change events of one upload keep one session; a refused load leaves the page working (a load that
fails on a server fault: test_callbacks_failed_load.py); a caption, region caption or handler still running when
another image is opened logs what it had shown and sends nothing more; sessions are independent; the display image
is sent once.

The rest of tests/app_callbacks/: prompts and Inspect words: test_callbacks_prompts.py; captions, decoding options
and Trace: test_callbacks_caption.py; Refer and Dense: test_callbacks_refer_dense.py; downloads and the store:
test_callbacks_records.py; app.py and the Model panel: test_callbacks_app.py. Fixtures: conftest.py."""

from __future__ import annotations

import hashlib
import io
import warnings

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from pixelllm.ui import callbacks as cb
from pixelllm.ui import render
from pixelllm.ui import workspace as ws
from tests.app_callbacks.conftest import VISITOR, _loaded

# ------------------------------------------------------------------------------------------ one session per image

def test_the_change_events_of_one_upload_keep_one_session(studio, example_images):
    """Gradio 6 fires the image's change two or three times for one upload over another image: two at once (both
    carrying the page's old session), one after the first answer (carrying the new one). They used to make a new
    Session each, so a point clicked as soon as the new image showed vanished again. The same file keeps the
    session it made; another file still replaces it."""
    from concurrent.futures import ThreadPoolExecutor

    old = _loaded(studio, example_images[0])
    upload = str(example_images[1])
    with ThreadPoolExecutor(2) as pool:  # the two events fired at once
        answers = list(pool.map(lambda _: ws.load_image(studio, upload, old), range(2)))
    first, second = answers[0][0], answers[1][0]
    assert first is second and old.replaced and not first.replaced
    assert sum(isinstance(a[1], dict) and "image" in a[1] for a in answers) == 1  # one set of views, one skipped
    session, view = ws.click(first, "positive", {"x": 40, "y": 50})  # the user's click on the new image
    again = ws.load_image(studio, upload, old)  # the late event, still with the old session ...
    late = ws.load_image(studio, upload, session)  # ... or with the new one
    assert again[0] is late[0] is session and late[1:] == (gr.skip(),) * 3
    assert session.prompts == [{"kind": "point", "xy": [40.0, 50.0], "label": 1}] and not session.replaced
    other = ws.load_image(studio, str(example_images[2]), session)[0]  # another image replaces it as before
    assert other is not session and session.replaced and other.prompts == []


def test_an_image_refused_leaves_the_page_working_on_its_image(studio, example_images, tmp_path):
    """A file refused (not an image, too large) marked the page's session replaced before decoding: the page kept
    it, so every click was dropped and Generate stuck at "Generating…"; picking the image shown again then kept
    that dead session (the same file keeps its session). A refused file leaves the session as it was."""
    shown = str(example_images[0])
    session = _loaded(studio, shown)
    bad = tmp_path / "not-an-image.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(gr.Error, match="not an image"):
        ws.load_image(studio, str(bad), session)
    assert not session.replaced
    again = ws.load_image(studio, shown, session)[0]  # the user picks the image shown again
    assert again is session and not again.replaced
    _, view = ws.for_the_shown_image(ws.click)(again, "Positive point", {"x": 40, "y": 50})
    assert view != gr.skip() and again.prompts == [{"kind": "point", "xy": [40.0, 50.0], "label": 1}]
    assert list(cb.generate(studio, again, None, 3, False, 1.0, 1.0, None, VISITOR))[-1][0]["status"] == "done"


def test_sessions_are_independent(studio, example_images):
    a = _loaded(studio, example_images[0])
    b = _loaded(studio, example_images[0])
    a, _ = ws.click(a, "Positive point", {"x": 1, "y": 1})
    assert b.prompts == [] and a.prompts != []
    assert ws.load_image(studio, None, a)[0].image is None  # clearing the image resets the session


def test_display_image_is_sent_once_as_exact_png_when_small(studio, example_images):
    session = _loaded(studio, example_images[0])
    src = session.image["src"]
    assert src.startswith("data:image/png;base64,")
    import base64

    decoded = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))
    assert np.array_equal(decoded, session.array)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, view = ws.click(session, "Positive point", {"x": 3, "y": 4})
    assert view["image"]["src"] is None and view["image"]["key"] == session.image["key"]


# ------------------------------------------------------------------------------------------ abandoned for a new image

def _only_skips(updates) -> bool:
    rest = list(updates)
    return len(rest) == 1 and all(isinstance(x, type(gr.skip())) for x in rest[0])


def test_a_caption_abandoned_for_another_image_logs_the_words_shown(studio, example_images):
    """Picking another image while a caption streams stops the stream; the words the page had received were an
    output shown to the user, so they are logged, flagged abandoned and cut, under the image they describe."""
    session = _loaded(studio, example_images[0])
    updates = cb.generate(studio, session, None, 12, False, 1.0, 1.0, None, VISITOR)
    shown = [next(updates) for _ in range(4)][-1]  # "Generating…", then three words
    new_session = ws.load_image(studio, str(example_images[1]), session)[0]
    assert session.replaced and not new_session.replaced
    assert _only_skips(updates)  # nothing more reaches the page
    row = studio.store.list_generations(task="caption", limit=1)[0]
    assert row["words"] == shown[1].split() and len(row["words"]) == 3
    old_sha, new_sha = (hashlib.sha256(render.png_bytes(s.array)).hexdigest() for s in (session, new_session))
    assert row["image_sha"] == old_sha != new_sha
    assert row["extra"]["abandoned"] and row["extra"]["cut"] is True


def test_a_caption_stream_closed_midway_logs_the_words_shown(studio, example_images):
    """The page went away mid-caption (gradio closes or drops the generator): the words shown are logged too."""
    session = _loaded(studio, example_images[0])
    updates = cb.generate(studio, session, None, 12, False, 1.0, 1.0, None, VISITOR)
    shown = [next(updates) for _ in range(3)][-1]  # "Generating…", then two words
    updates.close()
    row = studio.store.list_generations(task="caption", limit=1)[0]
    assert row["words"] == shown[1].split() and len(row["words"]) == 2
    assert row["extra"]["abandoned"] == "the stream was closed" and row["extra"]["cut"] is True


def test_a_handler_finishing_after_a_new_image_leaves_the_page_to_it(studio, example_images, monkeypatch):
    """Referring (Dense, Trace, a prompt click) still running when the user picks another image: its result wrote
    the previous image's session back into the page, and the next caption then streamed nothing (the session was
    marked replaced), stuck on "Generating…". Its updates are now dropped; the work is still logged."""
    session = _loaded(studio, example_images[0])
    refer = studio.predictor.refer

    def the_user_moves_on_meanwhile(*args, **kwargs):
        ws.load_image(studio, str(example_images[1]), session)
        return refer(*args, **kwargs)

    monkeypatch.setattr(studio.predictor, "refer", the_user_moves_on_meanwhile)
    on_refer = ws.for_the_shown_image(lambda state, text: cb.refer(studio, state, text))
    out = on_refer(session, "the red circle")
    assert session.replaced and len(out) == 3 and all(isinstance(x, type(gr.skip())) for x in out)
    assert len(studio.store.list_generations(task="refer")) == 1  # the request was served: still logged
    monkeypatch.undo()
    fresh = _loaded(studio, example_images[0])
    assert on_refer(fresh, "the red circle")[0] is fresh  # an image still shown gets its updates

    def streams(state):
        yield state, 1
        state.successor = ws.Session()  # a new image replaced it
        yield state, 2

    assert list(ws.for_the_shown_image(streams)(fresh)) == [(fresh, 1), (gr.skip(), gr.skip())]


def test_a_region_caption_abandoned_for_another_image_logs_the_words_shown(studio, example_images):
    """As in the Caption tab: the Dense tab's region caption, stopped by a new image, logs what it had shown."""
    session = _loaded(studio, example_images[0])
    session, _, _ = cb.dense(studio, session, 0.0, 2)
    @ws.for_the_shown_image
    def on_select(state, data):  # as layout.py wires it
        yield from cb.dense_select(studio, state, data, VISITOR)

    updates = on_select(session, {"i": 0})
    shown = [next(updates) for _ in range(3)][-1]  # "Tracing…", then two words
    ws.load_image(studio, str(example_images[1]), session)
    assert _only_skips(updates)
    row = studio.store.list_generations(task="caption", limit=1)[0]
    assert row["words"] == shown[2].split() and len(row["words"]) == 2
    assert row["extra"]["abandoned"] == "another image was opened" and row["extra"]["region_box"]
    assert len(studio.store.list_generations(task="caption")) == 1  # logged once


def test_a_new_image_waits_for_the_caption_streaming_on_the_old_one_to_stop(studio, example_images):
    """The page's image change and a streaming caption are two events: a frame the caption sent just before the
    change could reach the page after the new image's views and put the old picture back. load_image now returns
    only once the old stream has ended (its last update a no-op)."""
    import threading

    studio.min_word_interval = 0.05
    session = _loaded(studio, example_images[0])
    seen: list = []
    two_words = threading.Event()

    def page():
        for update in cb.generate(studio, session, None, 40, False, 1.0, 1.0, None, VISITOR):
            seen.append(update)
            if len(seen) >= 3:
                two_words.set()

    reader = threading.Thread(target=page)
    reader.start()
    assert two_words.wait(60)
    ws.load_image(studio, str(example_images[1]), session)
    assert session.streams == 0 and all(isinstance(x, type(gr.skip())) for x in seen[-1])
    reader.join(10)
    assert studio.store.list_generations(task="caption", limit=1)[0]["extra"]["abandoned"]


def test_a_caption_abandoned_before_its_first_word_logs_nothing(studio, example_images):
    session = _loaded(studio, example_images[0])
    updates = cb.generate(studio, session, None, 12, False, 1.0, 1.0, None, VISITOR)
    next(updates)  # "Generating…"
    ws.load_image(studio, str(example_images[1]), session)
    assert _only_skips(updates)
    assert studio.store.list_generations() == []
