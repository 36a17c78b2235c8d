"""The Annotate tab's editor document (pixelllm/ui/annotate.py, annotate_doc.py) on a real predictor (the small
random checkpoint) and a real annotation store: edits -> save -> store row; trace -> boxes (the LN reader's rule);
held trace ends; undo/redo and its bounded stack; structural edits keep boxes on the trace; refused edits.
Saving and review: test_annotate_saving.py; opening, kept copies and the side panels: test_annotate_opening.py."""

from __future__ import annotations

import json

import gradio as gr
import numpy as np
import pytest

from pixelllm.ui import annotate as an
from pixelllm.ui import annotate_doc, render
from tests.annotate.conftest import opened, recording
from training.data.localized_narratives import utterance_targets


def test_editor_edits_then_save_and_submit_reach_the_store(studio, captioned, annotation_store):
    state = opened(studio, captioned)
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

    traces, timed = recording(n)
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
    traces, timed = recording(5, seed=3)
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
    state = opened(studio, captioned)
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
    state = opened(studio, captioned)
    n = len(state.doc["words"])
    for seed in range(3):
        traces, timed = recording(n, seed)
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
    state = opened(studio, captioned)
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


def test_a_recording_saved_before_its_ends_were_held_is_held_at_the_next_edit(studio, captioned):
    """What the editor shows after an edit is what a save stores: an older, unheld recording is held by the edit."""
    state = opened(studio, captioned)
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
    state = opened(studio, captioned)
    with pytest.raises(gr.Error, match="the limit is 512"):
        for _ in range(10):  # 60 words an insert (a typed text is at most 200 characters)
            state, _ = an.edit_event(state, {"op": "insert", "i": 0, "text": " ".join(["w"] * 60), "rev": state.rev})
    assert len(state.doc["words"]) <= 512


def test_structural_edits_keep_boxes_on_the_trace_and_a_box_move_drops_it(studio, captioned):
    state = opened(studio, captioned)
    n = len(state.doc["words"])
    traces, timed = recording(n, seed=1)
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
    state = opened(studio, captioned)
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


def test_a_non_visual_flag_that_is_not_a_boolean_is_refused(studio, captioned):
    """The editor's word objects and its non_visual edit took any truthy value: the string "false" (or 0.5, "no")
    marked a word non-visual. true/false/absent only, as the API's index list already was strict."""
    words = [{"text": "a", "box": [0, 0, 4, 4], "non_visual": True}, {"text": "b", "box": [1, 1, 5, 5]}]
    doc = annotate_doc.normalise_doc({"words": words}, 8, 8)
    assert [w["non_visual"] for w in doc["words"]] == [True, False]
    for bad in ("false", 1, "no"):
        with pytest.raises(ValueError, match=r"words\[1\].non_visual must be true or false"):
            annotate_doc.normalise_doc({"words": [words[0], {**words[1], "non_visual": bad}]}, 8, 8)
    state = opened(studio, captioned)
    with pytest.raises(ValueError, match="non_visual value must be true or false"):
        annotate_doc.apply_edit(state, {"op": "non_visual", "i": 0, "value": "false"})
    state, _ = annotate_doc.apply_edit(state, {"op": "non_visual", "i": 0, "value": False})
    assert state.doc["words"][0]["non_visual"] is False
    state, _ = annotate_doc.apply_edit(state, {"op": "non_visual", "i": 0})  # no value: a toggle
    assert state.doc["words"][0]["non_visual"] is True
