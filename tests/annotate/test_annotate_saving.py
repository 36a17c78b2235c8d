"""Saving from the Annotate tab (pixelllm/ui/annotate.py) into a real annotation store: the annotator name and
autosave; idempotent client tokens; the HTTP API's payloads (`api_save_correction`); review; two people on one
chain and superseded saves; store failures keep the edits; a document the server lost is saved from the page.
The editor document: test_annotate_editing.py; opening, kept copies and the side panels: test_annotate_opening.py."""

from __future__ import annotations

import hashlib
import json
import re

import gradio as gr
import numpy as np
import pytest

from pixelllm.store import StoreError
from pixelllm.ui import annotate as an
from pixelllm.ui import render
from tests.annotate.conftest import opened


def test_missing_annotator_is_an_error_and_autosave_waits(studio, captioned, annotation_store):
    state = opened(studio, captioned)
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
    state = opened(studio, captioned)
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
    state = opened(studio, captioned)
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
    ana = opened(studio, captioned)
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
    state = opened(studio, captioned)
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


def test_autosave_does_not_draft_over_a_rejection_accepted_meanwhile(studio, captioned, annotation_store):
    """An annotator fixing a rejected correction while a reviewer re-reviews it and accepts it: autosave follows the
    review but must not then store a draft over the accepted row (that takes it out of review and the export)."""
    ana = opened(studio, captioned)
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
    state = opened(studio, captioned)
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
