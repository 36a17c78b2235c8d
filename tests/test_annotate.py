"""The Annotate tab's callbacks (pixelllm/ui/annotate.py) on a real predictor (the small random checkpoint) and a
real annotation store: editor document -> save -> store row; trace -> boxes (the LN reader's rule); undo/redo;
review; idempotent saves; errors; browse; export; adapter comparison."""

from __future__ import annotations

import copy as copy_module
import hashlib
import json
import re
import threading
import zipfile

import gradio as gr
import numpy as np
import pytest
import torch

from pixelllm import PixelLLMPredictor
from pixelllm.store import StoreError
from pixelllm.ui import annotate as an
from pixelllm.ui import annotate_doc, records, render
from pixelllm.ui import annotate_panels as panels
from pixelllm.ui import callbacks as cb
from pixelllm.ui import workspace as ws
from pixelllm.ui.decoding import token_budget
from training.data.localized_narratives import utterance_targets


@pytest.fixture
def studio(small_predictor, annotation_store):
    torch.set_num_threads(1)
    return ws.Studio(predictor=small_predictor, store=annotation_store, min_word_interval=0.0)


@pytest.fixture
def captioned(studio, example_images):
    """A session whose last output is a real streamed caption (logged as a generation)."""
    session, *_ = ws.load_image(studio, str(example_images[0]), None)
    *_, (view, text, files, session) = list(cb.generate(studio, session, "", 6, False, 1.0, 1.0, None,
                                                                   records.Visitor("s1")))
    assert session.last["generation_id"] is not None and len(session.last["words"]) >= 2
    return session


def _opened(studio, session):
    state, view = an.open_current(studio, session, None)
    assert view["words"] and view["image"]["src"].startswith("data:image/png")
    return state


def _recording(n: int, seed: int = 0) -> tuple[list, list]:
    """A plausible recording: 2 segments of points (normalised) and one time slot per word."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0, 0.5 * n, 40))
    xy = rng.uniform(0.05, 0.95, (40, 2))
    points = [{"x": float(x), "y": float(y), "t": float(s)} for (x, y), s in zip(xy, t)]
    traces = [points[:25], points[25:]]
    edges = np.linspace(0, 0.5 * n, n + 1)
    timed = [{"utterance": f"w{i}", "start_time": float(edges[i]), "end_time": float(edges[i + 1])} for i in range(n)]
    return traces, timed


def test_editor_edits_then_save_and_submit_reach_the_store(studio, captioned, annotation_store):
    state = _opened(studio, captioned)
    n = len(state.doc["words"])
    gen_id = captioned.last["generation_id"]
    state, view = an.edit_event(state, {"op": "text", "i": 0, "text": "circle", "rev": state.rev})
    state, view = an.edit_event(state, {"op": "non_visual", "i": 1, "value": True, "rev": state.rev})
    state, view = an.edit_event(state, {"op": "box", "i": 0, "box": [50, 60, 10, 20], "rev": state.rev})
    assert view["dirty"] and view["words"][0]["box"] == [10, 20, 50, 60]  # corners sorted
    state, view = an.save(studio, state, "draft", "  ana  ", "first pass")
    row = annotation_store.list_corrections(status="draft")[0]
    assert view["source"]["correction_id"] == row["id"] and not view["dirty"]
    assert row["annotator"] == "ana" and row["comment"] == "first pass" and row["generation_id"] == gen_id
    assert row["words"][0] == "circle" and row["non_visual"] == [1] and len(row["words"]) == n
    assert row["boxes"][0] == [10, 20, 50, 60] and row["caption"] == " ".join(row["words"])
    assert row["traces"] == [] and row["timed_caption"] == []

    traces, timed = _recording(n)
    state, view = an.edit_event(state, {"op": "trace", "traces": traces, "timed_caption": timed, "rev": state.rev})
    state, view = an.save(studio, state, "submitted", "ana", None)
    head = annotation_store.list_corrections(status="submitted")[0]
    assert head["parent_id"] == row["id"]  # the submit supersedes the draft: one chain
    traces = annotate_doc.hold_trace_ends(traces, timed)  # the recording, held before its first / after its last point
    assert head["traces"] == traces
    assert [u["utterance"] for u in head["timed_caption"]] == head["words"]  # utterances follow the words
    assert [(u["start_time"], u["end_time"]) for u in head["timed_caption"]] == [
        (u["start_time"], u["end_time"]) for u in timed]
    expected = annotate_doc.boxes_from_trace(traces, head["timed_caption"], 256, 256)
    np.testing.assert_allclose(head["boxes"], expected)
    np.testing.assert_allclose([w["box"] for w in view["words"]], expected, atol=0.01)  # what the editor shows


def test_trace_to_boxes_is_the_ln_reader_rule(annotation_store):
    traces, timed = _recording(5, seed=3)
    traces[1].append({"x": 1.02, "y": -0.01, "t": 0.7})  # LN traces may leave the image a little; interleaved t
    norm, _ = utterance_targets(traces, timed)
    got = annotate_doc.boxes_from_trace(traces, timed, 200, 100)
    np.testing.assert_allclose(got, norm * np.array([200, 100, 200, 100]), rtol=0, atol=1e-9)
    # the save path derives the same boxes when only words, timing and trace are sent (no boxes)
    sha = annotation_store.add_image(render.png_bytes(np.zeros((100, 200, 3), np.uint8)), 200, 100)
    result = an.save_correction_from_editor(
        annotation_store, None, {"image_sha": sha, "words": [f"w{i}" for i in range(5)], "traces": traces,
                                 "timed_caption": timed}, "submitted", "bo")
    row = annotation_store.get_correction(result["correction_id"])
    assert result["boxes_from_trace"] is True
    np.testing.assert_allclose(row["boxes"], got, atol=1e-9)


def test_undo_redo_restore_exact_documents(studio, captioned):
    state = _opened(studio, captioned)
    original = json.loads(json.dumps(state.doc))
    assert not state.dirty and an.editor_value(state)["can_undo"] is False
    state, _ = an.edit_event(state, {"op": "text", "i": 0, "text": "alpha", "rev": state.rev})
    after_text = json.loads(json.dumps(state.doc))
    state, _ = an.edit_event(state, {"op": "delete", "i": 1, "rev": state.rev})
    assert len(state.doc["words"]) == len(original["words"]) - 1
    state, view = an.history_event(state, {"op": "undo"})
    assert state.doc == after_text and view["can_redo"]
    state, view = an.history_event(state, {"op": "undo"})
    assert state.doc == original and not view["can_undo"] and not view["dirty"]
    state, _ = an.history_event(state, {"op": "redo"})
    assert state.doc == after_text
    state, message = an.undo(state)
    state, _ = an.edit_event(state, {"op": "insert", "i": 0, "text": "big red", "rev": state.rev})
    assert [w["text"] for w in state.doc["words"][1:3]] == ["big", "red"]  # spaces make several words
    assert not state.future  # a new edit clears redo
    assert an.redo(state)[1] == "nothing to redo"


def test_the_undo_stack_shares_traces_and_is_bounded_by_their_points(studio, captioned, monkeypatch):
    """Every edit deep-copied the document, trace included: one 50 000-point recording and 200 toggles held about
    2 GB for one browser tab. Versions now share a trace, and the stack drops its oldest versions past
    MAX_HISTORY_TRACE_POINTS distinct points."""
    monkeypatch.setattr(annotate_doc, "MAX_HISTORY_TRACE_POINTS", 100)  # two 40-point recordings, not three
    state = _opened(studio, captioned)
    n = len(state.doc["words"])
    for seed in range(3):
        traces, timed = _recording(n, seed)
        state, _ = an.edit_event(state, {"op": "trace", "traces": traces, "timed_caption": timed, "rev": state.rev})
    for _ in range(5):
        state, _ = an.edit_event(state, {"op": "non_visual", "i": 0, "rev": state.rev})
    recorded = state.doc["traces"]
    assert all(version["traces"] is recorded for version in state.history[-5:])  # shared, not copied
    distinct = {id(version["traces"]): version["traces"] for version in state.history}
    assert sum(annotate_doc.trace_point_count(t) for t in distinct.values()) <= 100
    assert len(state.history) == 6  # the opened document and the first recording were dropped
    state, _ = an.undo(state)
    assert state.doc["words"][0]["non_visual"] != state.future[-1]["words"][0]["non_visual"]


def test_a_recording_that_starts_moving_late_keeps_the_first_box_on_the_image(studio, captioned):
    """The recording's clock starts at the key press; the first pointer point came 0.3 s later, followed by a fast
    move. The LN rule extrapolated that move back to t = 0 and saved a first box hundreds of pixels off a 256 px
    image. The pointer is held at its first (last) point before (after) the recording instead."""
    state = _opened(studio, captioned)
    n = len(state.doc["words"])
    points = [{"x": 0.1, "y": 0.5, "t": 0.3}, {"x": 0.9, "y": 0.5, "t": 0.4}, {"x": 0.5, "y": 0.6, "t": 0.5 * n - 0.2}]
    edges = np.linspace(0, 0.5 * n, n + 1)
    timed = [{"utterance": "w", "start_time": float(edges[i]), "end_time": float(edges[i + 1])} for i in range(n)]
    state, _ = an.edit_event(state, {"op": "trace", "traces": [points], "timed_caption": timed, "rev": state.rev})
    width, height = state.image["width"], state.image["height"]
    for word in state.doc["words"]:
        x0, y0, x1, y1 = word["box"]
        assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height, word
    first = state.doc["words"][0]["box"]
    assert first[0] == pytest.approx(0.1 * width) and first[2] == pytest.approx(0.9 * width)  # the move, held
    held = state.doc["traces"][0]
    assert (held[0]["t"], held[-1]["t"]) == (0.0, 0.5 * n) and held[1:-1] == points


def test_opening_the_current_output_again_says_its_corrections_exist(studio, captioned):
    """As opening it from the list does: a save from a fresh open starts a second chain for the same output."""
    state = _opened(studio, captioned)
    state, view = an.save(studio, state, "draft", "ana", None)
    state, view = an.open_current(studio, captioned, state)
    assert "1 correction chain(s) exist for it" in view["message"]


def test_a_recording_saved_before_its_ends_were_held_is_held_at_the_next_edit(studio, captioned):
    """What the editor shows after an edit is what a save stores: an older, unheld recording is held by the edit."""
    state = _opened(studio, captioned)
    n = len(state.doc["words"])
    late = [{"x": 0.1, "y": 0.5, "t": 0.3}, {"x": 0.9, "y": 0.5, "t": 0.4}, {"x": 0.5, "y": 0.6, "t": 0.5 * n}]
    edges = np.linspace(0, 0.5 * n, n + 1)
    state.doc["traces"] = [late]  # as a correction recorded before the fix comes back from the store
    state.doc["timed_caption"] = [{"utterance": w["text"], "start_time": float(edges[i]),
                                   "end_time": float(edges[i + 1])} for i, w in enumerate(state.doc["words"])]
    state, _ = an.edit_event(state, {"op": "text", "i": 0, "text": "circle", "rev": state.rev})
    assert state.doc["traces"][0][0] == {"x": 0.1, "y": 0.5, "t": 0.0}
    assert all(0 <= w["box"][0] <= w["box"][2] <= 256 for w in state.doc["words"])


def test_inserts_past_the_word_limit_are_refused(studio, captioned):
    state = _opened(studio, captioned)
    with pytest.raises(gr.Error, match="the limit is 512"):
        for _ in range(10):  # 60 words an insert (a typed text is at most 200 characters)
            state, _ = an.edit_event(state, {"op": "insert", "i": 0, "text": " ".join(["w"] * 60), "rev": state.rev})
    assert len(state.doc["words"]) <= 512


def test_structural_edits_keep_boxes_on_the_trace_and_a_box_move_drops_it(studio, captioned):
    state = _opened(studio, captioned)
    n = len(state.doc["words"])
    traces, timed = _recording(n, seed=1)
    state, _ = an.edit_event(state, {"op": "trace", "traces": traces, "timed_caption": timed, "rev": state.rev})
    traces = annotate_doc.hold_trace_ends(traces, timed)
    for op in ({"op": "merge", "i": 0}, {"op": "split", "i": 0, "at": 1}, {"op": "insert", "i": 0, "text": "x"},
               {"op": "delete", "i": 1}, {"op": "text", "i": 0, "text": "left side"}):
        state, _ = an.edit_event(state, {**op, "rev": state.rev})
        doc = state.doc
        assert len(doc["timed_caption"]) == len(doc["words"])
        assert [u["utterance"] for u in doc["timed_caption"]] == [w["text"] for w in doc["words"]]
        expected = annotate_doc.boxes_from_trace(traces, doc["timed_caption"], 256, 256)
        np.testing.assert_allclose([w["box"] for w in doc["words"]], expected, err_msg=op["op"])
    with_trace = json.loads(json.dumps(state.doc))
    state, view = an.edit_event(state, {"op": "box", "i": 0, "box": [1, 2, 30, 40], "rev": state.rev})
    assert state.doc["traces"] == [] and state.doc["timed_caption"] == [] and "dropped" in view["message"]
    state, _ = an.undo(state)
    assert state.doc == with_trace


def test_bad_edits_are_user_errors(studio, captioned):
    state = _opened(studio, captioned)
    with pytest.raises(gr.Error, match="changed meanwhile"):
        an.edit_event(state, {"op": "delete", "i": 0, "rev": state.rev - 1})
    with pytest.raises(gr.Error, match="cannot be empty"):
        an.edit_event(state, {"op": "text", "i": 0, "text": "   ", "rev": state.rev})
    with pytest.raises(gr.Error, match="No trace"):
        an.edit_event(state, {"op": "trace", "traces": [[{"x": 0.1, "y": 0.1, "t": 0}]], "timed_caption": [],
                              "rev": state.rev})
    with pytest.raises(gr.Error, match="no area"):
        an.edit_event(state, {"op": "box", "i": 0, "box": [5, 5, 5, 40], "rev": state.rev})
    with pytest.raises(gr.Error, match="Open the current output"):
        an.edit_event(None, {"op": "delete", "i": 0})
    for _ in range(len(state.doc["words"]) - 1):
        state, _ = an.edit_event(state, {"op": "delete", "i": 0, "rev": state.rev})
    with pytest.raises(gr.Error, match="at least one word"):
        an.edit_event(state, {"op": "delete", "i": 0, "rev": state.rev})


def test_missing_annotator_is_an_error_and_autosave_waits(studio, captioned, annotation_store):
    state = _opened(studio, captioned)
    state, _ = an.edit_event(state, {"op": "text", "i": 0, "text": "edited", "rev": state.rev})
    for name in (None, "", "   "):
        with pytest.warns(UserWarning, match="annotator name"):  # the toast (gr.Warning outside a request)
            kept, view = an.save(studio, state, "draft", name)
        # the status line says so too (a toast expires; the line showed the previous save's message)
        assert kept is state and state.dirty and view["level"] == "error"
        assert view["message"].startswith("Not saved:") and "annotator name" in view["message"]
    state, view = an.save(studio, state, "draft", "", auto=True)
    assert "waiting for your annotator name" in view["message"]
    assert annotation_store.list_corrections() == []
    state, view = an.save(studio, state, "draft", "cy", auto=True)
    assert "Autosaved" in view["message"] and len(annotation_store.list_corrections()) == 1
    assert an.save(studio, state, "draft", "cy", auto=True) == (state, None)  # clean: nothing to autosave
    with pytest.raises(gr.Error, match="annotator name"):
        an.api_save_correction(studio, {"image_sha": state.image["sha"], "words": ["a"], "boxes": [[0, 0, 1, 1]]})


def test_client_token_makes_saves_idempotent(studio, captioned, annotation_store):
    state = _opened(studio, captioned)
    state, _ = an.edit_event(state, {"op": "text", "i": 0, "text": "edited", "rev": state.rev})
    token = an.client_token_for(state, "submitted")
    first = an.save_correction_from_editor(studio.store, state, state.doc, "submitted", "dee", token)
    again = an.save_correction_from_editor(studio.store, state, state.doc, "submitted", "dee", token)
    assert first["correction_id"] == again["correction_id"]
    state, _ = an.save(studio, state, "submitted", "dee")  # the button after the same version: still one row
    assert len(annotation_store.history(first["correction_id"])) == 1
    payload = {"generation_id": captioned.last["generation_id"], "annotator": "api", "words": ["one", "two"],
               "boxes": [[0, 0, 10, 10], [10, 10, 30, 30]], "client_token": "tok-1"}
    ids = {an.api_save_correction(studio, json.dumps(payload))["correction_id"] for _ in range(3)}
    assert len(ids) == 1
    with pytest.raises(gr.Error, match="already used"):
        an.api_save_correction(studio, {**payload, "annotator": "someone else"})


def test_api_payloads(studio, captioned, annotation_store):
    sha = annotation_store.list_generations(limit=1)[0]["image_sha"]
    result = an.api_save_correction(studio, {"image_sha": sha, "annotator": "<b>x</b>", "status": "draft",
                                             "words": ["a", "b"], "boxes": [[-5, 0, 10, 260], [3, 3, 3, 3]],
                                             "non_visual": [1]})
    row = annotation_store.get_correction(result["correction_id"])
    assert row["annotator"] == "<b>x</b>" and row["status"] == "draft" and row["generation_id"] is None
    assert row["boxes"] == [[0, 0, 10, 256], [3, 3, 3, 3]] and row["non_visual"] == [1]  # clipped to the image
    # a box in another frame (e.g. the as-sent pixels of a large image stored downscaled) is refused, not clipped
    with pytest.raises(gr.Error, match=r"outside the stored image \(256x256 pixels\)"):
        an.api_save_correction(studio, {"image_sha": sha, "annotator": "a", "words": ["a"],
                                        "boxes": [[100, 120, 400, 300]]})
    # a one-point "trace" is no trace to derive boxes from: the boxes sent are kept, the point stored as sent
    one = an.api_save_correction(studio, {"image_sha": sha, "annotator": "a", "words": ["a", "b"],
                                          "boxes": [[1, 2, 30, 40], [5, 6, 7, 8]],
                                          "traces": [[{"x": 0.9, "y": 0.9, "t": 1.5}]],
                                          "timed_caption": [{"utterance": "a", "start_time": 0, "end_time": 1},
                                                            {"utterance": "b", "start_time": 1, "end_time": 2}]})
    saved = annotation_store.get_correction(one["correction_id"])
    assert saved["boxes"] == [[1, 2, 30, 40], [5, 6, 7, 8]] and saved["traces"] == [[{"x": 0.9, "y": 0.9, "t": 1.5}]]
    # an oversized trace is refused on its point count, before a point is read
    with pytest.raises(gr.Error, match="more than 50000 points"):
        an.api_save_correction(studio, {"image_sha": sha, "annotator": "a", "words": ["a"],
                                        "traces": [["not a point"] * 50_001]})
    edit = an.api_save_correction(studio, {"parent_id": row["id"], "annotator": "y", "words": ["c"],
                                           "boxes": [[1, 1, 2, 2]]})
    assert annotation_store.head(row["id"])["id"] == edit["correction_id"]
    for bad, match in (({"image_sha": sha, "annotator": "a", "words": ["a"], "boxes": [[0, 0, 1, 1]], "x": 1},
                        "unknown keys"),
                       ({"image_sha": sha, "annotator": "a", "words": ["a"]}, "needs a box"),
                       ({"image_sha": sha, "annotator": "a", "words": [], "boxes": []}, "non-empty"),
                       ({"annotator": "a", "words": ["a"], "boxes": [[0, 0, 1, 1]]}, "name the image"),
                       ({"image_sha": sha, "annotator": "a", "words": ["a"], "boxes": [[0, 0, 1, 1]],
                         "status": "accepted"}, "draft' or 'submitted"),
                       ({"parent_id": row["id"], "annotator": "a", "words": ["a"], "boxes": [[0, 0, 1, 1]]},
                        "superseded")):
        with pytest.raises(gr.Error, match=match):
            an.api_save_correction(studio, bad)
    # an echoed value reaches the page's error toast (rendered as HTML) escaped; quotes stay readable
    with pytest.raises(gr.Error) as refused:
        an.api_save_correction(studio, {"image_sha": sha, "annotator": "a", "words": ["a"], "boxes": [[0, 0, 1, 1]],
                                        "status": "<img src=x onerror=alert(1)>"})
    assert "<img" not in refused.value.message and "&lt;img src=x onerror=alert(1)&gt;" in refused.value.message
    assert "'draft' or 'submitted'" in refused.value.message
    with pytest.raises(gr.Error, match="not valid JSON"):
        an.api_save_correction(studio, "{words:")


def test_review_accept_and_reject(studio, captioned, annotation_store):
    state = _opened(studio, captioned)
    def refused(state, reviewer, match):
        with pytest.warns(UserWarning, match=match):
            kept, view = an.review(studio, state, reviewer, True, "")
        assert kept is state and view["level"] == "error" and view["message"].startswith("Review not recorded:")
        assert re.search(match, view["message"])
        return view

    refused(state, "rev", "Open a submitted correction")
    state, _ = an.save(studio, state, "draft", "eve")
    refused(state, "rev", "draft")
    state, _ = an.save(studio, state, "submitted", "eve")
    submitted = state.head_id
    refused(state, " ", "annotator name")
    assert [r["status"] for r in annotation_store.history(submitted)] == ["draft", "submitted"]  # no review stored
    state, view = an.review(studio, state, "rita", False, "box 2 is off")
    head = annotation_store.head(submitted)
    assert head["status"] == "rejected" and head["reviewer"] == "rita" and head["comment"] == "box 2 is off"
    assert head["annotator"] == "eve" and view["source"]["status"] == "rejected"
    # fix, resubmit, accept: the chain keeps the whole history
    state, _ = an.edit_event(state, {"op": "text", "i": 0, "text": "fixed", "rev": state.rev})
    refused(state, "rita", "unsaved edits")
    state, _ = an.save(studio, state, "submitted", "eve")
    state, _ = an.review(studio, state, "rita", True, "ok now")
    chain = annotation_store.history(submitted)
    assert [r["status"] for r in chain] == ["draft", "submitted", "rejected", "submitted", "accepted"]


def test_two_people_on_one_chain(studio, captioned, annotation_store):
    """An annotator and a reviewer at once: a review made meanwhile does not strand the annotator's next edit (a
    review copies the content it decided on, so the edit supersedes it and goes back to review); someone else's
    edit does (refused as superseded). Autosave never drafts over a submitted correction (it would leave review
    and the export), and a double-clicked Accept stores one review."""
    ana = _opened(studio, captioned)
    ana, _ = an.save(studio, ana, "submitted", "ana")
    submitted = ana.head_id
    bob, _ = an.open_item(studio, None, {"kind": "correction", "id": submitted})
    bob, _ = an.review(studio, bob, "bob", True, "")
    bob, view = an.review(studio, bob, "bob", True, "")  # the second click of a double click
    assert "Already accepted" in view["message"]
    assert [r["status"] for r in annotation_store.history(submitted)] == ["submitted", "accepted"]

    ana, _ = an.edit_event(ana, {"op": "text", "i": 0, "text": "later", "rev": ana.rev})
    ana, view = an.save(studio, ana, "draft", "ana", auto=True)
    assert "Not autosaved" in view["message"] and len(annotation_store.history(submitted)) == 2
    ana, view = an.save(studio, ana, "submitted", "ana")
    assert f"reviewed meanwhile (#{bob.head_id} accepted by bob)" in view["message"]
    chain = annotation_store.history(submitted)
    assert [(r["status"], r["words"][0]) for r in chain][1:] == [("accepted", chain[0]["words"][0]),
                                                                 ("submitted", "later")]

    bob, _ = an.open_item(studio, bob, {"kind": "correction", "id": ana.head_id})
    bob, _ = an.edit_event(bob, {"op": "text", "i": 0, "text": "bob's", "rev": bob.rev})
    bob, _ = an.save(studio, bob, "submitted", "bob")  # an edit, not a review
    ana, _ = an.edit_event(ana, {"op": "text", "i": 0, "text": "ana's", "rev": ana.rev})
    with pytest.warns(UserWarning, match="superseded"):
        _, view = an.save(studio, ana, "submitted", "ana")
    assert view["level"] == "error" and "superseded" in view["message"] and ana.dirty


def test_store_failure_warns_and_keeps_the_edits(studio, captioned, annotation_store, monkeypatch):
    state = _opened(studio, captioned)
    state, _ = an.edit_event(state, {"op": "text", "i": 0, "text": "kept", "rev": state.rev})

    def broken(**kwargs):
        raise StoreError("disk full")

    monkeypatch.setattr(annotation_store, "save_correction", broken)
    warnings = []
    monkeypatch.setattr(gr, "Warning", lambda message, *a, **k: warnings.append(message))
    state, view = an.save(studio, state, "submitted", "fay")
    assert warnings and "disk full" in warnings[0] and view["level"] == "error" and view["dirty"]
    assert state.doc["words"][0]["text"] == "kept" and state.head_id is None
    monkeypatch.undo()
    state, view = an.save(studio, state, "submitted", "fay")  # the retry saves it
    assert annotation_store.get_correction(state.head_id)["words"][0] == "kept"


def test_an_image_the_store_could_not_take_at_open_is_added_by_the_save(studio, captioned, annotation_store,
                                                                         monkeypatch):
    # The store was down while captioning (nothing logged) and still is when the editor opens: the editor says
    # "saving will retry", and once the store is back the save must add the image first (it failed for want of
    # an image before).
    captioned.sha = None
    captioned.last = {**captioned.last, "generation_id": None}

    def down(*args, **kwargs):
        raise StoreError("database is locked")

    monkeypatch.setattr(annotation_store, "add_image", down)
    monkeypatch.setattr(gr, "Warning", lambda *a, **k: None)
    state, view = an.open_current(studio, captioned, None)
    assert "saving will retry" in view["message"] and state.image["sha"] is None
    state, view = an.save(studio, state, "draft", "gus")  # still down: kept, retried later
    assert view["level"] == "error" and state.head_id is None
    monkeypatch.undo()
    state, view = an.save(studio, state, "draft", "gus")
    saved = annotation_store.get_correction(state.head_id)
    assert saved["image_sha"] == state.image["sha"] == hashlib.sha256(render.png_bytes(captioned.array)).hexdigest()
    assert annotation_store.get_image(saved["image_sha"]) is not None and "Saved draft" in view["message"]


def test_browse_filters_and_open(studio, captioned, annotation_store):
    state = _opened(studio, captioned)
    sha = state.image["sha"]
    state, _ = an.save(studio, state, "submitted", "Gil Smith")
    listing = panels.list_items(studio, "Corrections", sha[:6], "smith", "submitted", "")
    assert [r["id"] for r in listing["rows"]] == [state.head_id] and listing["rows"][0]["annotator"] == "Gil Smith"
    assert panels.list_items(studio, "Corrections", sha[:6], "nobody", "any", "")["rows"] == []
    assert panels.list_items(studio, "Corrections", "", "", "draft", "")["rows"] == []
    outputs = panels.list_items(studio, "Model outputs", sha, "", "any", "")
    assert outputs["rows"][0]["id"] == captioned.last["generation_id"]
    with pytest.raises(gr.Error, match="hexadecimal"):
        panels.list_items(studio, "Corrections", "xyz", "", "any", "")

    other, view = an.open_item(studio, None, {"kind": "correction", "id": state.head_id})
    assert other.head_id == state.head_id and view["image"]["src"].startswith("data:image/")
    assert [w["text"] for w in view["words"]] == annotation_store.get_correction(state.head_id)["words"]
    other, _ = an.edit_event(other, {"op": "text", "i": 0, "text": "unsaved", "rev": other.rev})
    target = {"kind": "generation", "id": captioned.last["generation_id"]}
    with pytest.raises(gr.Error, match="unsaved edits"):
        an.open_item(studio, other, target)
    other, view = an.open_item(studio, other, target)  # asked again: discard and open
    assert other.head_id is None and other.generation_id == target["id"] and "correction chain" in view["message"]


def test_export_zip(studio, captioned, annotation_store):
    state = _opened(studio, captioned)
    traces, timed = _recording(len(state.doc["words"]))
    state, _ = an.edit_event(state, {"op": "trace", "traces": traces, "timed_caption": timed, "rev": state.rev})
    state, _ = an.save(studio, state, "submitted", "hal")
    path, summary = panels.export(studio, ["submitted"])
    assert "1 LN record" in summary
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        record = json.loads(archive.read("pixelllm-corrections/corrections.ln.jsonl").decode())
    assert any(n.startswith("pixelllm-corrections/images/") for n in names)
    assert record["traces"] == annotate_doc.hold_trace_ends(traces, timed) and record["annotator_id"] == "hal"
    with pytest.raises(gr.Error, match="at least one status"):
        panels.export(studio, [])
    with pytest.raises(gr.Error, match="no accepted corrections to export"):  # not an empty zip
        panels.export(studio, ["accepted"])
    # the button: no file and why, so the page does not keep showing the previous zip as this export's
    assert panels.export_for_page(studio, ["submitted"])[0] is not None
    with pytest.warns(UserWarning, match="no accepted corrections"):  # gr.Warning outside a request
        assert panels.export_for_page(studio, ["accepted"]) == (
            None, "Nothing exported: no accepted corrections to export (an empty zip would be all you got)")


def test_compare_adapters(studio, captioned, tmp_path, example_images):
    from tests.conftest import _talkative
    from tests.helpers import small_model

    lock = threading.Lock()
    base_view, tuned_view, note = panels.compare_adapters(studio, captioned, lock)
    assert "No LoRA adapter is active" in note and tuned_view["message"] == "no LoRA adapter is active"
    assert tuned_view["image"] == base_view["image"]  # the image shown, not an "upload an image" placeholder
    model = small_model(seed=0)
    _talkative(model)  # an untrained model otherwise stops at once (see conftest)
    model.add_adapter("fix")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    own = ws.Studio(predictor=PixelLLMPredictor(model, device="cpu"), store=None)
    base_view, tuned_view, note = panels.compare_adapters(own, captioned, lock)
    assert own.predictor.adapter == "fix"  # restored
    assert "fix" in note and base_view["words"] and tuned_view["words"]
    assert base_view["message"].startswith("base model") and "fix" in tuned_view["message"]

    # a typed caption that was traced is compared as a trace: the same words, each model's boxes
    _, _, _, traced = cb.trace(own, captioned, "a large red circle", records.Visitor("s1"))
    base_view, tuned_view, note = panels.compare_adapters(own, traced, lock)
    assert "tracing the same caption" in note and own.predictor.adapter == "fix"
    assert [w["text"] for w in base_view["words"]] == [w["text"] for w in tuned_view["words"]] == \
        ["a", "large", "red", "circle"]
    assert [w["box"] for w in base_view["words"]] != [w["box"] for w in tuned_view["words"]]
    own.predictor.set_adapter(None)
    assert [w["box"] for w in base_view["words"]] == [w.to_dict()["box"] for w in own.predictor.trace(
        own.predictor.set_image(traced.array), "a large red circle").words]

    # a caption made under a box prompt is compared under that box, by both models
    own.predictor.set_adapter("fix")
    boxed, _ = ws.drag_box(ws.load_image(own, str(example_images[0]), None)[0], {"box": [10, 20, 110, 90]})
    *_, (_, _, _, boxed) = list(cb.generate(own, boxed, "", 6, False, 1.0, 1.0, None, records.Visitor("s1")))
    base_view, tuned_view, note = panels.compare_adapters(own, boxed, lock)
    predictor, state = own.predictor, own.predictor.set_image(boxed.array)
    budget = {"max_new_tokens": token_budget(own.default_max_words)}
    box = boxed.caption["prompts"]["box"]
    assert box == [10, 20, 110, 90]
    def words(**kwargs):  # this small random model says "we we ..." whatever it is shown: compare the boxes too
        return [(w.text, w.to_dict()["box"]) for w in predictor.caption(state, **budget, **kwargs).words]

    def shown(view):
        return [(w["text"], w["box"]) for w in view["words"]]

    assert shown(tuned_view) == words(box=box)
    with predictor.using_adapter(None):
        assert shown(base_view) == words(box=box) != words()  # the box mattered


def test_autosave_does_not_draft_over_a_rejection_accepted_meanwhile(studio, captioned, annotation_store):
    """An annotator fixing a rejected correction while a reviewer re-reviews it and accepts it: autosave follows the
    review but must not then store a draft over the accepted row (that takes it out of review and the export)."""
    ana = _opened(studio, captioned)
    ana, _ = an.save(studio, ana, "submitted", "ana")
    first = ana.head_id
    rita, _ = an.open_item(studio, None, {"kind": "correction", "id": first})
    rita, _ = an.review(studio, rita, "rita", False, "box 2 is off")
    ana, _ = an.open_item(studio, ana, {"kind": "correction", "id": rita.head_id})
    assert ana.head_status == "rejected"
    ana, _ = an.edit_event(ana, {"op": "text", "i": 0, "text": "fixing", "rev": ana.rev})
    rita, _ = an.open_item(studio, rita, {"kind": "correction", "id": rita.head_id})
    rita, _ = an.review(studio, rita, "rita", True, "on second thought, fine")
    ana, view = an.save(studio, ana, "draft", "ana", auto=True)
    assert annotation_store.head(first)["status"] == "accepted", view["message"]
    assert "Not autosaved" in view["message"] and ana.dirty
    assert [r["id"] for r in annotation_store.training_examples()] == [rita.head_id]


def test_a_document_the_server_lost_is_saved_from_the_page_unless_superseded(studio, captioned, annotation_store):
    """The session's state expired (state None) while the page still shows its edits: a save (and autosave) stores
    the page's document on the correction it had open; when someone else saved on that correction meanwhile the
    restored save is refused as superseded, nothing overwritten. A page without a stored source is refused clearly."""
    state = _opened(studio, captioned)
    state, _ = an.save(studio, state, "draft", "ana")
    first = state.head_id
    state, _ = an.edit_event(state, {"op": "text", "i": 0, "text": "restored"})
    shown = an.editor_value(state)  # what the page holds
    lost, view = an.save(studio, None, "draft", "ana", auto=True, view=shown)  # autosave after the state expired
    assert "Autosaved draft" in view["message"] and "restored from the page" in view["message"]
    assert not view["dirty"] and view["source"]["correction_id"] == lost.head_id
    rows = annotation_store.history(first)
    assert [r["id"] for r in rows] == [first, lost.head_id]
    assert rows[1]["parent_id"] == first and rows[1]["annotator"] == "ana"
    assert rows[1]["words"] == [w["text"] for w in shown["words"]] and rows[1]["words"][0] == "restored"
    np.testing.assert_allclose(rows[1]["boxes"], [w["box"] for w in shown["words"]], atol=0.01)

    # someone else saved on the correction the page had open: refused, their row stays the head
    other = an.open_item(studio, None, {"kind": "correction", "id": rows[1]["id"]})[0]
    other, _ = an.edit_event(other, {"op": "text", "i": 1, "text": "bob"})
    other, _ = an.save(studio, other, "draft", "bob")
    _, view = an.save(studio, None, "submitted", "ana", view=view)  # the page's view after its autosave
    assert "superseded" in view["message"]
    assert annotation_store.head(first)["id"] == other.head_id

    _, view = an.save(studio, None, "draft", "ana", view={**shown, "source": {}})
    assert "cannot be matched to a stored output" in view["message"]

    # the head's status comes from the store, not the page: autosave still never drafts over a submitted one
    mine = an.open_item(studio, None, {"kind": "correction", "id": other.head_id})[0]
    mine, _ = an.save(studio, mine, "submitted", "bob")
    mine, _ = an.edit_event(mine, {"op": "text", "i": 0, "text": "later"})
    page = an.editor_value(mine)
    page = {**page, "source": {**page["source"], "status": "draft"}}  # a page claiming the head is a draft
    _, view = an.save(studio, None, "draft", "bob", auto=True, view=page)
    assert "Not autosaved" in view["message"] and annotation_store.head(first)["id"] == mine.head_id


def _kept_copy(view: dict) -> dict:
    """What static/annotate.js keeps in localStorage for a page showing `view` (and sends back on Restore)."""
    src = view["source"]
    return {"opened": view["opened"], "login": view["login"], "task": view["task"],
            "timed_caption": view["timed_caption"],
            "traces": view["traces"],
            "source": {"image_sha": src["image_sha"], "generation_id": src["generation_id"],
                       "correction_id": src["correction_id"]},
            "words": [{"text": w["text"], "box": w["box"], "non_visual": w["non_visual"]} for w in view["words"]]}


def test_unsaved_edits_kept_by_the_page_are_restored_only_onto_their_output_and_base(studio, captioned,
                                                                                       annotation_store):
    """A reload drops the server-side document; the page keeps a copy of its unsaved edits and sends it back when the
    output is opened again (restore_kept). It is restored onto that same output only, as unsaved edits (undo goes back
    to the stored version), on the correction it was made on: a save is refused as superseded when someone else saved
    on that correction meanwhile, and the head's status comes from the store, not from the copy."""
    state = _opened(studio, captioned)
    assert len(state.opened) >= 8 and an.editor_value(state)["opened"] == state.opened
    state, _ = an.save(studio, state, "draft", "ana")
    first = state.head_id
    state, _ = an.edit_event(state, {"op": "text", "i": 0, "text": "kept"})
    state, _ = an.edit_event(state, {"op": "non_visual", "i": 1, "value": True})
    copy_ = _kept_copy(an.editor_value(state))
    assert copy_["source"]["correction_id"] == first

    # the page reloaded: a new session opens the same correction and restores the copy
    fresh, view = an.open_item(studio, None, {"kind": "correction", "id": first})
    assert view["opened"] and view["opened"] != copy_["opened"] and not view["dirty"]
    fresh, view = an.restore_kept(studio, fresh, copy_)
    assert view["dirty"] and view["restored"] == copy_["opened"] and view["words"][0]["text"] == "kept"
    assert view["source"]["correction_id"] == first and "Restored the unsaved edits" in view["message"]
    undone, _ = an.history_event(copy_module.deepcopy(fresh), {"op": "undo"})
    assert not undone.dirty  # undo goes back to the version just opened
    # edits made after the offer appeared are not overwritten by a restore (the page's copy of them neither)
    edited, _ = an.edit_event(copy_module.deepcopy(undone), {"op": "text", "i": 0, "text": "mine"})
    with pytest.raises(gr.Error, match="unsaved edits of its own"):
        an.restore_kept(studio, edited, copy_)
    assert edited.doc["words"][0]["text"] == "mine"
    undone.rev = 1
    with pytest.raises(gr.Error, match="changed meanwhile"):  # a bool is not a revision (True == 1)
        an.restore_kept(studio, undone, {**copy_, "rev": True})
    fresh, view = an.save(studio, fresh, "draft", "ana")
    head = annotation_store.head(first)
    assert head["parent_id"] == first and head["words"][0] == "kept" and head["non_visual"] == [1]

    # another output (another generation of the same image): refused, never restored onto it
    gen = annotation_store.get_generation(captioned.last["generation_id"])
    other_id = annotation_store.log_generation(gen["image_sha"], gen["task"], gen["words"], gen["boxes"],
                                               model_id="test", model_version="0")
    other, _ = an.open_item(studio, None, {"kind": "generation", "id": other_id})
    with pytest.raises(gr.Error, match="another output"):
        an.restore_kept(studio, other, copy_)
    wrong = {**copy_, "source": {**copy_["source"], "image_sha": "0" * 64}}
    with pytest.raises(gr.Error, match="another output"):
        an.restore_kept(studio, an.open_item(studio, None, {"kind": "correction", "id": first})[0], wrong)

    # a copy made on `first`, restored after the chain moved on (someone else saved on it): the restore says so,
    # and the save is refused as superseded — the other row stays the head
    late, view = an.open_item(studio, None, {"kind": "correction", "id": first})
    assert view["source"]["correction_id"] == fresh.head_id != first
    late_copy = {**copy_, "words": [{**copy_["words"][0], "text": "late"}, *copy_["words"][1:]]}
    late, view = an.restore_kept(studio, late, late_copy)
    assert f"made on correction #{first}" in view["message"] and view["source"]["correction_id"] == first
    late, view = an.save(studio, late, "draft", "ana")
    assert "superseded" in view["message"] and late.dirty
    assert annotation_store.head(first)["id"] == fresh.head_id

    # opening another output over the restored edits: refused once, then discarded — the answer names the opening
    # whose kept copy the page drops
    with pytest.raises(gr.Error, match="unsaved edits"):
        an.open_item(studio, late, {"kind": "generation", "id": other_id})
    dropped = late.opened
    late, view = an.open_item(studio, late, {"kind": "generation", "id": other_id})
    assert view["discarded"] == dropped and view["opened"] != dropped

    # a copy equal to the version opened restores nothing (and does not move the editor onto its base)
    same, _ = an.open_item(studio, None, {"kind": "correction", "id": first})
    same, view = an.restore_kept(studio, same, copy_)
    assert not view["dirty"] and "nothing to restore" in view["message"]
    assert view["source"]["correction_id"] == fresh.head_id and view["restored"] == copy_["opened"]

    # the head's status comes from the store: a copy made on a submitted correction is not autosaved over it
    sub, _ = an.open_item(studio, None, {"kind": "correction", "id": fresh.head_id})
    sub, _ = an.save(studio, sub, "submitted", "ana")
    sub, _ = an.edit_event(sub, {"op": "text", "i": 0, "text": "after"})
    page = _kept_copy(an.editor_value(sub))
    page["source"]["status"] = "draft"  # a copy claiming otherwise is not believed
    again, _ = an.open_item(studio, None, {"kind": "correction", "id": sub.head_id})
    again, view = an.restore_kept(studio, again, page)
    assert view["source"]["status"] == "submitted"
    again, view = an.save(studio, again, "draft", "ana", auto=True)
    assert "Not autosaved" in view["message"] and annotation_store.head(first)["id"] == sub.head_id


def test_undo_after_restoring_kept_edits_made_on_another_base_goes_back_to_the_open_head(studio, captioned,
                                                                                           annotation_store):
    """Restore is one undoable step back to the version just opened; the base must follow. A copy made on the
    generation (a new chain), restored over an open correction of it, then undone: the editor shows that correction
    again, and an edit saved from there supersedes it (it started a second chain of the generation); redo takes the
    copy's base back."""
    state = _opened(studio, captioned)
    state, _ = an.edit_event(state, {"op": "text", "i": 0, "text": "kept"})
    copy_ = _kept_copy(an.editor_value(state))
    assert copy_["source"]["correction_id"] is None  # made on the generation: a new chain
    other = _opened(studio, captioned)  # meanwhile a chain of the generation is saved (another tab)
    other, _ = an.save(studio, other, "draft", "bob")
    head = other.head_id

    fresh, _ = an.open_item(studio, None, {"kind": "correction", "id": head})
    fresh, view = an.restore_kept(studio, fresh, copy_)
    assert view["source"]["correction_id"] is None and view["dirty"]
    fresh, view = an.history_event(fresh, {"op": "undo"})
    assert not view["dirty"] and view["source"]["correction_id"] == head  # back on the open head
    fresh, view = an.history_event(fresh, {"op": "redo"})
    assert view["dirty"] and view["source"]["correction_id"] is None  # the copy's base again
    fresh, _ = an.history_event(fresh, {"op": "undo"})
    fresh, _ = an.edit_event(fresh, {"op": "text", "i": 0, "text": "undone"})
    fresh, view = an.save(studio, fresh, "draft", "ana")
    saved = annotation_store.head(head)
    assert saved["parent_id"] == head and saved["words"][0] == "undone"


def test_a_copy_kept_under_another_login_is_not_restored(studio, captioned):
    """Behind --auth the page keeps its unsaved edits under the signed-in login (the editor value names it,
    `with_login`) and offers only that login's copies; the server also refuses a copy kept under another login
    (or made without one), and without --auth one made under a login."""
    state = _opened(studio, captioned)
    assert an.editor_value(state)["login"] == ""
    state, view = an.with_login(an.edit_event(state, {"op": "text", "i": 0, "text": "ritas"}), "rita")
    assert view["login"] == "rita"
    copy_ = _kept_copy(view)
    assert copy_["login"] == "rita"
    for login, kept in (("sam", "rita"), ("sam", ""), (None, "rita"), ("rita", None)):
        fresh, _ = an.open_item(studio, None, {"kind": "generation", "id": captioned.last["generation_id"]})
        with pytest.raises(gr.Error, match="another login"):
            an.restore_kept(studio, fresh, {**copy_, "login": kept}, login)
        assert not fresh.dirty
    fresh, _ = an.open_item(studio, None, {"kind": "generation", "id": captioned.last["generation_id"]})
    fresh, view = an.restore_kept(studio, fresh, copy_, "rita")
    assert view["dirty"] and view["words"][0]["text"] == "ritas"
    fresh, _ = an.open_item(studio, None, {"kind": "generation", "id": captioned.last["generation_id"]})
    fresh, view = an.restore_kept(studio, fresh, {**copy_, "login": ""}, None)  # no --auth, no login: restored
    assert view["dirty"]


def test_a_non_visual_flag_that_is_not_a_boolean_is_refused(studio, captioned):
    """The editor's word objects and its non_visual edit took any truthy value: the string "false" (or 0.5, "no")
    marked a word non-visual. true/false/absent only, as the API's index list already was strict."""
    words = [{"text": "a", "box": [0, 0, 4, 4], "non_visual": True}, {"text": "b", "box": [1, 1, 5, 5]}]
    doc = annotate_doc.normalise_doc({"words": words}, 8, 8)
    assert [w["non_visual"] for w in doc["words"]] == [True, False]
    for bad in ("false", 1, "no"):
        with pytest.raises(ValueError, match=r"words\[1\].non_visual must be true or false"):
            annotate_doc.normalise_doc({"words": [words[0], {**words[1], "non_visual": bad}]}, 8, 8)
    state = _opened(studio, captioned)
    with pytest.raises(ValueError, match="non_visual value must be true or false"):
        annotate_doc.apply_edit(state, {"op": "non_visual", "i": 0, "value": "false"})
    state, _ = annotate_doc.apply_edit(state, {"op": "non_visual", "i": 0, "value": False})
    assert state.doc["words"][0]["non_visual"] is False
    state, _ = annotate_doc.apply_edit(state, {"op": "non_visual", "i": 0})  # no value: a toggle
    assert state.doc["words"][0]["non_visual"] is True
