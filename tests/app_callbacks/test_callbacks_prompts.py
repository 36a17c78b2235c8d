"""The studio's prompt callbacks (pixelllm/ui/prompts.py, workspace.py, callbacks.py) driving a real predictor on a
small random checkpoint: clicked, dragged and typed prompts reach the decoder in the image's pixels; undo and clear;
prompt edits wait for a streaming caption; Inspect words; user mistakes become gr.Error (and leave a DEBUG trace).

The rest of tests/app_callbacks/: captions, decoding options and Trace: test_callbacks_caption.py; opening and
replacing images: test_callbacks_images.py; Refer and Dense: test_callbacks_refer_dense.py; downloads and the store:
test_callbacks_records.py; app.py and the Model panel: test_callbacks_app.py. Fixtures: conftest.py."""

from __future__ import annotations

import contextlib
import logging

import gradio as gr
import pytest
import torch

from pixelllm.ui import api
from pixelllm.ui import callbacks as cb
from pixelllm.ui import workspace as ws
from tests.app_callbacks.conftest import VISITOR, _loaded, _run

# ------------------------------------------------------------------------------------------ prompts → decoder

def test_box_prompt_from_two_clicks_reaches_the_decoder(studio, example_images, prefix_calls):
    session = _loaded(studio, example_images[0])
    _, glob_view, _, _, session = _run(studio, session)
    assert prefix_calls[-1].get("boxes") is None and prefix_calls[-1].get("points") is None

    session, view = ws.click(session, "Box (2 clicks)", {"x": 200, "y": 60})
    assert view["pending"] == [200.0, 60.0] and view["box"] is None
    session, view = ws.click(session, "Box (2 clicks)", {"x": 90, "y": 150})  # corners in any order
    assert view["box"] == [90.0, 60.0, 200.0, 150.0] and view["pending"] is None
    _, box_view, _, _, session = _run(studio, session)

    w, h = session.image["width"], session.image["height"]
    sent = prefix_calls[-1]["boxes"]
    torch.testing.assert_close(sent, torch.tensor([[90 / w, 60 / h, 200 / w, 150 / h]]), atol=1e-6, rtol=0)
    assert [x["box"] for x in box_view["words"]] != [x["box"] for x in glob_view["words"]]
    assert box_view["box"] == [90.0, 60.0, 200.0, 150.0]  # the prompt stays drawn with the result


def test_points_with_labels_and_text_prompt_reach_the_decoder(studio, example_images, prefix_calls):
    session = _loaded(studio, example_images[1])
    session, _ = ws.click(session, "Positive point", {"x": 40, "y": 50})
    session, view = ws.click(session, "Negative point", {"x": 120.5, "y": 30})
    assert view["points"] == [[40.0, 50.0, 1], [120.5, 30.0, 0]]
    _run(studio, session, text="In this picture")
    call = prefix_calls[-1]
    w, h = session.image["width"], session.image["height"]
    torch.testing.assert_close(call["points"], torch.tensor([[[40 / w, 50 / h], [120.5 / w, 30 / h]]]).float())
    assert call["point_labels"].tolist() == [[1, 0]]
    ids = studio.predictor.tokenizer(" ".join("In this picture".split()), add_special_tokens=False)["input_ids"]
    assert call["text_ids"][0].tolist() == ids


def test_drag_undo_and_clear(studio, example_images):
    session = _loaded(studio, example_images[0])
    session, view = ws.drag_box(session, {"box": [10, 20, 110, 90]})
    assert view["box"] == [10.0, 20.0, 110.0, 90.0]
    session, view = ws.click(session, "Positive point", {"x": 5, "y": 5})
    session, view = ws.click(session, "Box (2 clicks)", {"x": 50, "y": 50})
    session, view = ws.undo_prompt(session)  # first undo drops the half-drawn box
    assert view["pending"] is None and len(view["points"]) == 1
    session, view = ws.undo_prompt(session)
    assert view["points"] == [] and view["box"] == [10.0, 20.0, 110.0, 90.0]
    session, view = ws.clear_prompts(session)
    assert view["points"] == [] and view["box"] is None
    assert view["image"]["src"] is None  # prompt edits never resend the picture


def test_prompt_edits_wait_for_the_caption_streaming(studio, example_images):
    """A point clicked (or Undo, Clear, a box) while a caption streamed was drawn beside the finished caption, made
    without it (its download and store row had the true prompts). Prompt edits are refused with a message until the
    caption is kept, so the finished view shows the prompts it was made with; a stream that ends early frees them.
    Trace (the typed caption, same view) waits too."""
    session = _loaded(studio, example_images[0])
    session, _ = ws.click(session, "Positive point", {"x": 40, "y": 50})
    edits = [lambda: ws.click(session, "Positive point", {"x": 100, "y": 100}),
             lambda: ws.click(session, "Box (2 clicks)", {"x": 10, "y": 10}),
             lambda: ws.drag_box(session, {"box": [10, 20, 110, 90]}),
             lambda: ws.undo_prompt(session), lambda: ws.clear_prompts(session)]
    with contextlib.closing(cb.generate(studio, session, None, 6, False, 1.0, 1.0, None, VISITOR)) as updates:
        [next(updates) for _ in range(3)]  # "Generating…", then two words
        for edit in edits:
            with pytest.raises(gr.Error, match="A caption is streaming with the prompts shown: wait for it to finish"):
                edit()
        with pytest.raises(gr.Error, match="A caption is streaming: wait for it to finish, then trace"):
            cb.trace(studio, session, "a red circle", VISITOR)  # its frames would overwrite the trace
        view = list(updates)[-1][0]
    row = studio.store.list_generations(task="caption", limit=1)[0]
    assert view["status"] == "done" and view["points"] == [[40.0, 50.0, 1]]
    assert row["prompts"]["points"] == [[40.0, 50.0]] and view["box"] is None and view["pending"] is None
    session, view = ws.click(session, "Positive point", {"x": 100, "y": 100})  # the caption is kept: edits apply
    assert view["points"] == [[40.0, 50.0, 1], [100.0, 100.0, 1]]
    updates = cb.generate(studio, session, None, 6, False, 1.0, 1.0, None, VISITOR)
    [next(updates) for _ in range(2)]
    updates.close()  # the page went away mid-caption
    assert ws.undo_prompt(session)[1]["points"] == [[40.0, 50.0, 1]]


# ------------------------------------------------------------------------------------------ inspector

def test_inspect_lists_the_words_whose_boxes_cover_a_pixel(studio, example_images):
    session = _loaded(studio, example_images[0])
    _, view, _, _, session = _run(studio, session, max_words=6)
    box = view["words"][2]["box"]
    x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    session, inspected = ws.click(session, "Inspect words", {"x": x, "y": y})
    expected = [i for i, w in enumerate(view["words"])
                if w["box"][0] <= x <= w["box"][2] and w["box"][1] <= y <= w["box"][3]]
    assert 2 in inspected["inspect"]["hits"] and inspected["inspect"]["hits"] == expected
    session, corner = ws.click(session, "Inspect words", {"x": 0, "y": 0})
    assert corner["inspect"]["hits"] == ws.words_at(view["words"], 0, 0)
    assert session.prompts == []  # inspecting does not add prompts


def test_a_pixel_inspected_while_a_caption_streams_reads_the_words_shown(studio, example_images):
    """Inspect words during a stream computed the hits from the previous caption (none before the first) and left
    them on the finished one ("No word box covers (x, y)" under boxes that covered it). The hits are now those of
    the words shown: the words streamed so far, then the finished caption's."""
    session = _loaded(studio, example_images[0])
    with contextlib.closing(cb.generate(studio, session, None, 6, False, 1.0, 1.0, None, VISITOR)) as updates:
        shown = [next(updates) for _ in range(3)][-1][0]  # "Generating…", then two words
        box = shown["words"][0]["box"]
        x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
        session, inspected = ws.click(session, "Inspect words", {"x": x, "y": y})
        assert 0 in inspected["inspect"]["hits"] and inspected["inspect"]["hits"] == ws.words_at(shown["words"], x, y)
        assert inspected["status"] == "streaming" and len(inspected["words"]) == 2
        done = list(updates)[-1][0]
    assert done["status"] == "done" and len(done["words"]) > 2
    assert done["inspect"] == {"x": x, "y": y, "hits": ws.words_at(done["words"], x, y)}


# ------------------------------------------------------------------------------------------ errors

def test_user_mistakes_become_gr_errors(studio, example_images, tmp_path):
    with pytest.raises(gr.Error, match="image first"):
        _run(studio, None)
    with pytest.raises(gr.Error, match="image first"):
        ws.click(None, "Positive point", {"x": 1, "y": 1})
    session = _loaded(studio, example_images[0])
    with pytest.raises(gr.Error, match="no area"):
        ws.drag_box(session, {"box": [10, 10, 10.2, 80]})
    session, _ = ws.click(session, "Negative point", {"x": 10, "y": 10})
    with pytest.raises(gr.Error, match="positive point"):
        _run(studio, session)
    session, _ = ws.clear_prompts(session)
    with pytest.raises(gr.Error, match="max words"):
        _run(studio, session, max_words=0)
    with pytest.raises(gr.Error, match="seed"):
        _run(studio, session, sampling=True, seed=1.5)
    with pytest.raises(gr.Error, match="referring expression"):
        cb.refer(studio, session, " \n  \n")
    with pytest.raises(gr.Error, match="threshold"):
        cb.dense(studio, session, 1.5, 10)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(gr.Error, match="not an image|could not be decoded"):
        ws.load_image(studio, str(broken), None)
    with pytest.raises(gr.Error, match="JSON"):
        api.caption(studio, str(example_images[0]), "{points: oops", "", 5, False, 1, 1, None)
    with pytest.raises(gr.Error, match="box"):
        api.caption(studio, str(example_images[0]), '{"box": [1, 2, 3]}', "", 5, False, 1, 1, None)
    assert studio.store.list_generations() == []  # nothing was shown, nothing logged


def test_a_refused_call_keeps_its_traceback_at_debug_for_the_host(caplog):
    """A refused call prints no traceback (user_errors: print_exception=False), so a ValueError raised by a bug
    rather than by the user would leave no trace: its traceback is logged at DEBUG, found by raising the level."""
    with caplog.at_level(logging.DEBUG, logger="pixelllm.ui.state"):
        with pytest.raises(gr.Error, match="Upload, paste or pick an example image first"):
            ws.click(ws.Session(), "Positive point", {"x": 1, "y": 1})
    refused = [r for r in caplog.records if r.name == "pixelllm.ui.state" and r.levelno == logging.DEBUG]
    assert refused and "click refused: Upload, paste" in refused[0].getMessage() and refused[0].exc_info
