"""The Annotate tab's callbacks: open a model output (or a stored correction), edit it, re-record its trace
Localized-Narratives style, save and review. Plain data in and out, tested directly (tests/annotate/); the
document, its edits and the editor's value are in `annotate_doc.py`, opening an output (and restoring edits the page
kept) in `annotate_open.py`, the browse list, export and adapter comparison in `annotate_panels.py`, the Gradio
wiring is `annotate_tab.build_annotate_tab`. This module re-exports the tab's callbacks from `annotate_open.py`
(`open_current`, `open_item`, `restore_kept`, `restore_from_view`) and `editor_value`, `undo`, `redo`, so
`annotate.X` is the one place the wiring, scripts and tests call.

What lives where:
- The **document** being edited (words, their pixel boxes, non-visual flags, the LN timed caption and trace) and
  its **undo/redo history** live server-side in `AnnotateState` (one per browser tab, in `gr.State`). The
  browser (`static/annotate*.js`) draws it, captures drags and the mouse trace, and sends one edit operation at a
  time (`apply_edit`); each answer is the whole new document. Undo/redo are therefore exact and testable here.
- A recorded trace is the ground truth of a word's location, as in LN: after a recording (and after any edit
  that changes the words while a trace exists) every word's box is re-derived from the trace with the LN
  reader's own rule (`training.data.localized_narratives.utterance_targets`, see `boxes_from_trace`). Moving a
  box by hand therefore drops the recorded trace (undo brings it back): the stored boxes and trace never
  disagree, and the export (which trusts a recorded trace over the boxes) exports what the annotator saw.
- **Every save** — the Save/Submit buttons, autosave, the `/save_correction` API, scripts and tests — goes through
  `save_correction_from_editor`. Coordinates: boxes are pixels of the stored image (the model frame), traces are
  normalised to it (LN), times are seconds from the start of the recording.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gradio as gr

from pixelllm.ui import render
from pixelllm.ui import workspace as ws
from pixelllm.ui.annotate_doc import (
    AnnotateState,
    apply_edit,
    as_state,
    check_annotator,
    doc_caption,
    editor_value,
    normalise_doc,
    redo,
    require_doc,
    trace_point_count,
    undo,
    with_login,
)
from pixelllm.ui.annotate_open import open_current, open_item, restore_from_view, restore_kept

__all__ = [
    "API_KEYS", "EDIT_STATUSES", "MAX_COMMENT_CHARS", "api_save_correction", "client_token_for", "edit_event",
    "editor_value", "follow_reviews", "history_event", "open_current", "open_item", "redo", "refused",
    "restore_from_view", "restore_kept", "review", "save", "save_correction_from_editor", "signed_in_name",
    "static_dir", "undo", "with_login",
]

log = logging.getLogger(__name__)

EDIT_STATUSES = ("draft", "submitted")
MAX_COMMENT_CHARS = 2000
API_KEYS = ("image_sha", "generation_id", "parent_id", "annotator", "status", "caption", "words", "boxes",
            "non_visual", "timed_caption", "traces", "comment", "client_token", "task")


# ------------------------------------------------------------------------------------------ the ONE save path

def save_correction_from_editor(store: Any, session_state: AnnotateState | None, editor_json: Mapping | str,
                                status: str, annotator: str, client_token: str | None = None) -> dict:
    """Validate an edited document and append it to the store as one correction; every save goes through here
    (the Save draft / Submit buttons, autosave, the `/save_correction` API, scripts, tests).

    Args:
        store: the AnnotationStore (None: ValueError, nothing configured).
        session_state: the editor's AnnotateState, or None (API / scripts). When given, it supplies the image,
            generation and head correction not named in `editor_json`, and is updated after the save (its head
            becomes the new row, the document counts as saved).
        editor_json: a dict or JSON text: `words` ([{text, box, non_visual}] or strings + `boxes` +
            `non_visual` indices), `timed_caption`, `traces` (LN-normalised), and optionally `image_sha`,
            `generation_id`, `parent_id` (the head correction this edit supersedes), `caption`, `comment`.
            With a trace of >= 2 points and a timed caption the boxes are derived from the trace (LN rule).
        status: "draft" or "submitted".
        annotator: required (ValueError when blank).
        client_token: saving again with the same token returns the first row's id (idempotent retries).

    Returns:
        {correction_id, parent_id, image_sha, generation_id, status, annotator, words, boxes, non_visual,
        boxes_from_trace, client_token}.

    Raises:
        ValueError: bad input (shown as gr.Error); pixelllm.store.StoreError: the store failed (the caller
        keeps the document: retry with the same client_token).
    """
    if store is None:
        raise ValueError("No annotation store: the app was started with --no-store, so corrections cannot be "
                         "saved (restart it without --no-store).")
    annotator = check_annotator(annotator)
    if status not in EDIT_STATUSES:
        raise ValueError(f"status must be 'draft' or 'submitted', got {status!r} (reviews use Accept / Reject)")
    if isinstance(editor_json, str):
        try:
            editor_json = json.loads(editor_json)
        except json.JSONDecodeError as err:
            raise ValueError(f"the correction is not valid JSON: {err.msg}") from err
    if not isinstance(editor_json, Mapping):
        raise ValueError("the correction must be a JSON object")
    if client_token is not None and (not isinstance(client_token, str) or not client_token.strip()
                                     or len(client_token) > 200):
        raise ValueError("client_token must be a non-empty string of at most 200 characters")
    state = session_state if isinstance(session_state, AnnotateState) else None

    def pick(key: str, fallback: Any) -> Any:
        value = editor_json.get(key)
        return fallback if value is None else value

    image_sha = pick("image_sha", state.image.get("sha") if state and state.image else None)
    generation_id = pick("generation_id", state.generation_id if state else None)
    head = state.head_id if state else None
    if state is not None and client_token is not None and state.last_save and state.last_save[0] == client_token:
        head = state.last_save[1]  # a retry of the last save: same parent, so the store returns the same row
    parent_id = pick("parent_id", head)
    for name, value in (("generation_id", generation_id), ("parent_id", parent_id)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer id, got {value!r}")
    sha = image_sha
    if parent_id is not None:
        parent = store.get_correction(parent_id)
        if parent is None:
            raise ValueError(f"no correction with id {parent_id}")
        sha = sha or parent["image_sha"]
        generation_id = generation_id if generation_id is not None else parent["generation_id"]
    elif generation_id is not None:
        generation = store.get_generation(generation_id)
        if generation is None:
            raise ValueError(f"no generation with id {generation_id}")
        sha = sha or generation["image_sha"]
    if not isinstance(sha, str) or not sha:
        raise ValueError("name the image: image_sha, generation_id or parent_id")
    image = store.get_image(sha)
    if image is None:
        raise ValueError(f"unknown image {sha}: it is not in the annotation store")
    doc = normalise_doc(editor_json, int(image["width"]), int(image["height"]))
    derived = trace_point_count(doc["traces"]) >= 2 and bool(doc["timed_caption"])
    comment = editor_json.get("comment")
    if comment is not None and (not isinstance(comment, str) or len(comment) > MAX_COMMENT_CHARS):
        raise ValueError(f"comment must be text of at most {MAX_COMMENT_CHARS} characters")
    words = [w["text"] for w in doc["words"]]
    boxes = [w["box"] for w in doc["words"]]
    non_visual = [i for i, w in enumerate(doc["words"]) if w["non_visual"]]
    correction_id = store.save_correction(
        annotator=annotator, image_sha=sha, generation_id=generation_id, parent_id=parent_id, status=status,
        caption=doc_caption(doc, editor_json.get("caption")), words=words, boxes=boxes,
        timed_caption=doc["timed_caption"], traces=doc["traces"], non_visual=non_visual,
        comment=comment or None, client_token=client_token)
    if state is not None:
        state.head_id, state.head_status = correction_id, status
        state.last_save = (client_token, parent_id) if client_token is not None else None
        state.generation_id = generation_id
        if state.doc is not None:
            state.saved_doc = copy.deepcopy(state.doc)
    return {"correction_id": correction_id, "parent_id": parent_id, "image_sha": sha, "generation_id": generation_id,
            "status": status, "annotator": annotator, "words": words, "boxes": boxes, "non_visual": non_visual,
            "boxes_from_trace": derived, "client_token": client_token}


@ws.user_errors
def edit_event(state: AnnotateState | None, data: Any) -> tuple[AnnotateState, dict]:
    """The editor's "edit" event: apply_edit, then the new view."""
    state, message = apply_edit(state, data if isinstance(data, Mapping) else {})
    return state, editor_value(state, message)


@ws.user_errors
def history_event(state: AnnotateState | None, data: Any) -> tuple[AnnotateState, dict]:
    """The editor's "history" event: {op: "undo" | "redo"}."""
    op = (data or {}).get("op") if isinstance(data, Mapping) else None
    if op not in ("undo", "redo"):
        raise ValueError("unknown history operation")
    state, message = (undo if op == "undo" else redo)(state)
    return state, editor_value(state, message)


# ------------------------------------------------------------------------------------------ saving (UI)

def client_token_for(state: AnnotateState, status: str) -> str:
    """The token of a UI save: the same document version saved twice (a retry, a double click) is one row."""
    return f"ui-{state.uid}-{state.rev}-{status}"


def follow_reviews(store: Any, state: AnnotateState) -> str:
    """When the correction this editor supersedes was reviewed meanwhile (a review row copies its parent's
    content), the next save supersedes the review instead: nothing the reviewer decided on is lost, and the edit
    goes back to review. Returns a note for the status line ("" when nothing was reviewed). An edit made by
    someone else since is not followed: that save is refused as superseded."""
    if store is None or state.head_id is None:
        return ""
    later = [row for row in store.history(state.head_id) if row["id"] > state.head_id]
    if not later or not all(row.get("reviewer") for row in later):
        return ""
    state.head_id, state.head_status = later[-1]["id"], later[-1]["status"]
    decisions = ", ".join(f"#{row['id']} {row['status']} by {row['reviewer']}" for row in later)
    return f" It had been reviewed meanwhile ({decisions}); this save supersedes the review."


def save(studio: ws.Studio, state: AnnotateState | None, status: str, annotator: Any, comment: Any = None, *,
         auto: bool = False, view: Any = None) -> tuple[AnnotateState, dict | None]:
    """Save draft / Submit / autosave from the editor. A refused save (bad input) and a store failure are shown in
    the status line and as a toast; the document stays in the editor (dirty), so saving again (same client token)
    retries without duplicating.
    Autosave never stores a draft over a submitted or accepted correction (that would take it out of review and
    out of the export): the edits wait for Save draft or Submit.
    `view` is the editor's value as the page shows it: when the server lost the document (a restart, an expired
    session) it is restored from there (`restore_from_view`) and saved."""
    state = as_state(state)
    followed = ""
    try:
        state, restored_note = restore_from_view(studio, state, view)
        doc = require_doc(state)
        if auto:
            if not state.dirty:
                return state, None  # nothing to do (the wiring leaves the editor as it is)
            if not (isinstance(annotator, str) and annotator.strip()):
                return state, editor_value(state, "Autosave is waiting for your annotator name.", level="warn")
            head = copy.copy(state)  # the head this save would supersede, reviews made meanwhile followed
            follow_reviews(studio.store, head)
            if head.head_status in ("submitted", "accepted"):
                return state, editor_value(state, f"Not autosaved: correction #{head.head_id} is "
                                           f"{head.head_status}, and a draft over it would take it out of review. "
                                           "Save draft or Submit to store your edits.", level="warn")
        followed = follow_reviews(studio.store, state)
        payload = {**doc, "comment": comment if isinstance(comment, str) and comment.strip() else None}
        image = state.image or {}
        if image.get("sha") is None and image.get("png") is not None and studio.store is not None:
            # the store was unavailable when the editor opened: add the image now (a failure is handled below)
            sha = studio.store.add_image(image["png"], int(image["width"]), int(image["height"]))
            state.image = {**image, "sha": sha, "png": None}
        result = save_correction_from_editor(studio.store, state, payload, status, annotator,
                                             client_token_for(state, status))
    except ValueError as err:
        if auto:
            return state, editor_value(state, f"Autosave failed: {err}", level="error")
        return state, refused(state, "Not saved", err)
    except Exception as err:  # noqa: BLE001 - StoreError or worse: keep the edits, tell the user
        log.exception("annotation store: could not save a correction")
        gr.Warning(f"Not saved — the annotation store failed: {render.notice(err)}. Your edits are kept in this "
                   "tab; save again to retry.")
        return state, editor_value(state, "Not saved: the annotation store failed; your edits are kept — "
                                          "save again to retry.", level="error", store_ok=False)
    verb = {"draft": "Autosaved draft" if auto else "Saved draft", "submitted": "Submitted"}[status]
    return state, editor_value(state, f"{verb} as correction #{result['correction_id']}{restored_note}.{followed}")


def refused(state: AnnotateState, what: str, err: ValueError) -> dict:
    """A refused save or review: a toast and the editor's status line both say why (the toast expires, and the
    status line would otherwise still show the previous save's "Saved draft as correction #…")."""
    gr.Warning(render.notice(f"{what}: {err}"))
    return editor_value(state, f"{what}: {err}", level="error")


def review(studio: ws.Studio, state: AnnotateState | None, reviewer: Any, accept: bool, comment: Any
           ) -> tuple[AnnotateState, dict]:
    """Accept or reject the open correction (the head of its chain; it must be submitted) with a comment. A
    refusal (nothing open, unsaved edits, a draft, no name) is shown in the status line and changes nothing."""
    state = as_state(state)
    try:
        return _review(studio, state, reviewer, accept, comment)
    except ValueError as err:
        return state, refused(state, "Review not recorded", err)


def _review(studio: ws.Studio, state: AnnotateState, reviewer: Any, accept: bool, comment: Any
            ) -> tuple[AnnotateState, dict]:
    if studio.store is None:
        raise ValueError("No annotation store is configured.")
    reviewer = check_annotator(reviewer)
    if state.head_id is None:
        raise ValueError("Open a submitted correction to review it (Browse → Corrections).")
    if state.dirty:
        raise ValueError("The editor has unsaved edits: submit them (or undo them) before reviewing.")
    if state.last_review is not None and state.last_review == (bool(accept), state.head_id):  # a repeated click
        decision = "accepted" if accept else "rejected"
        return state, editor_value(state, f"Already {decision} (review row #{state.head_id}).")
    if comment is not None and (not isinstance(comment, str) or len(comment) > MAX_COMMENT_CHARS):
        raise ValueError(f"the comment must be at most {MAX_COMMENT_CHARS} characters")
    try:
        new_id = studio.store.review(state.head_id, reviewer, bool(accept), (comment or "").strip() or None,
                                     client_token=f"review-{state.uid}-{state.rev}-{state.head_id}")
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001
        log.exception("annotation store: could not record a review")
        gr.Warning(f"The review was not recorded — the annotation store failed: {render.notice(err)}. "
                   "Press the button again to retry.")
        return state, editor_value(state, "Review not recorded: store failure — retry.", level="error",
                                   store_ok=False)
    decision = "accepted" if accept else "rejected"
    old = state.head_id
    state.head_id, state.head_status = new_id, decision
    state.last_review = (bool(accept), new_id)
    state.rev += 1
    return state, editor_value(state, f"Correction #{old} {decision} (review row #{new_id}).")


# ------------------------------------------------------------------------------------------ API

def signed_in_name(typed: Any, login: str | None) -> Any:
    """The name a save or review is stored under: the login when the app runs behind `--auth` (a typed name
    could be anyone's), else the name typed in the Annotate tab."""
    return login if login else typed


@ws.user_errors
def api_save_correction(studio: ws.Studio, payload: Any, login: str | None = None) -> dict:
    """/save_correction: one JSON object — {image_sha | generation_id | parent_id, annotator, status (draft |
    submitted, default submitted), words, boxes, non_visual, timed_caption, traces, caption, comment,
    client_token} — saved through save_correction_from_editor. Returns its result. Behind `--auth` (``login``)
    the correction is saved under the login: ``annotator`` may be left out, and another name is refused."""
    if isinstance(payload, str):
        try:
            payload = json.loads(payload)
        except json.JSONDecodeError as err:
            raise ValueError(f"the correction is not valid JSON: {err.msg}") from err
    if not isinstance(payload, Mapping):
        raise ValueError("send one JSON object: {image_sha or generation_id, annotator, status, words, ...}")
    unknown = sorted(set(payload) - set(API_KEYS))
    if unknown:
        raise ValueError(f"unknown keys {unknown}; allowed: {', '.join(API_KEYS)}")
    annotator = payload.get("annotator")
    if login:
        if annotator is not None and (not isinstance(annotator, str) or " ".join(annotator.split()) != login):
            raise ValueError(f"you are signed in as {login!r}: a correction is saved under your login (leave "
                             "'annotator' out or send the login)")
        annotator = login
    try:
        return save_correction_from_editor(studio.store, None, payload, payload.get("status") or "submitted",
                                           annotator, payload.get("client_token"))
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - the store failed: the client keeps its JSON and retries
        log.exception("annotation store: /save_correction failed")
        raise gr.Error(f"the annotation store failed ({render.notice(err)}); nothing was saved — retry with the "
                       "same client_token") from err


def static_dir() -> Path:
    return Path(__file__).parent / "static"
