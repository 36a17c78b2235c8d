"""Bringing a document into the Annotate editor: open the session's last output (`open_current`) or a stored
generation or correction (`open_item`), and restore edits the server lost (`restore_from_view`, used by
`annotate.save`) or the page kept in the browser (`restore_kept`). Each open starts a fresh `AnnotateState` (the
document is in `annotate_doc.py`) and answers with the editor's value; `annotate.py` saves and reviews it.
"""

from __future__ import annotations

import copy
import logging
import secrets
from collections.abc import Mapping
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from pixelllm.ui import render
from pixelllm.ui import workspace as ws
from pixelllm.ui.annotate_doc import (
    MAX_WORDS,
    AnnotateState,
    as_state,
    check_rev,
    editor_value,
    normalise_doc,
    replace_doc,
    require_doc,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ opening outputs

def _image_from_store(store: Any, sha: str) -> tuple[dict, str]:
    row = store.get_image(sha)
    if row is None:
        raise ValueError(f"image {sha[:12]}… is not in the annotation store")
    try:
        with Image.open(row["abs_path"]) as img:
            array = np.asarray(img.convert("RGB"))
    except OSError as err:
        raise ValueError(f"the stored image {sha[:12]}… cannot be read: {err}") from err
    meta = {"sha": sha, "key": sha, "width": int(row["width"]), "height": int(row["height"])}
    return meta, render.display_data_url(array)


def _open(state: AnnotateState, doc: dict, image: dict, *, generation_id: int | None, head_id: int | None,
          head_status: str | None) -> AnnotateState:
    fresh = AnnotateState(doc=doc, image=image, generation_id=generation_id, head_id=head_id,
                          head_status=head_status, saved_doc=copy.deepcopy(doc), uid=state.uid, rev=state.rev + 1,
                          opened=secrets.token_hex(8))
    return fresh


def _discarding(state: AnnotateState) -> str:
    """The opening whose unsaved edits an open replaces (the user opened again to discard them), else ""."""
    return state.opened if state.dirty else ""


def _guard_unsaved(state: AnnotateState, target: tuple) -> None:
    """Opening something else over unsaved edits: refused once with an explanation, allowed when repeated."""
    if state.dirty and state.pending_open != target:
        state.pending_open = target
        raise ValueError("This editor has unsaved edits: save a draft (s) or submit them first — or open again "
                         "to discard them.")


def _doc_from_output(last: dict) -> dict:
    task = last.get("task")
    if task == "caption":
        items = [(w["text"], w["box"]) for w in last.get("words") or []]
    elif task == "refer":
        items = [(r["expression"], r["box"]) for r in last.get("results") or []]
    elif task == "dense":
        items = [(r.get("caption") or "(no caption)", r["box"]) for r in last.get("regions") or []]
    else:
        raise ValueError(f"cannot annotate a {task!r} output")
    items = [(" ".join(str(t).split()) or "(empty)", b) for t, b in items]
    if not items:
        raise ValueError("The last output has no words to correct: generate a caption with some words first.")
    return {"task": task, "words": [{"text": t, "box": [float(c) for c in b], "non_visual": False} for t, b in items],
            "timed_caption": [], "traces": []}


@ws.user_errors
def open_current(studio: ws.Studio, session: ws.Session | None, state: AnnotateState | None
                 ) -> tuple[AnnotateState, dict]:
    """Open the session's last output (Session.last: caption, referring or dense) in the editor."""
    state = as_state(state)
    session = session if isinstance(session, ws.Session) else None
    if session is None or not session.last or session.image is None:
        raise ValueError("Nothing to correct yet: caption an image (or run Referring / Dense) first.")
    last = session.last
    target = ("current", last.get("generation_id"))
    _guard_unsaved(state, target)
    doc = _doc_from_output(last)
    sha = session.sha
    note = ""
    pending = None  # the image's PNG while the store has not got it: saving adds it first
    if sha is None and studio.store is not None and session.array is not None:
        pending = render.png_bytes(session.array)
        try:
            sha = studio.store.add_image(pending, int(session.array.shape[1]), int(session.array.shape[0]))
            pending = None
        except Exception as err:  # noqa: BLE001 - the editor still works; saving will retry
            log.exception("annotation store: could not add the image")
            gr.Warning(f"The annotation store is unavailable ({render.notice(err)}); you can edit, and saving "
                       "will retry.")
            note = " (store unavailable: saving will retry)"
    image = {"sha": sha, "key": session.image["key"], "width": session.image["width"],
             "height": session.image["height"], "png": pending}
    discarded = _discarding(state)
    state = _open(state, doc, image, generation_id=last.get("generation_id"), head_id=None, head_status=None)
    gen = f"generation #{last['generation_id']}" if last.get("generation_id") else "the last output (not logged)"
    note += _chains_note(studio.store, sha, last.get("generation_id"))
    return state, editor_value(state, f"Opened {gen}: {len(doc['words'])} {_unit(doc)}{note}.",
                               src=session.image.get("src") or None, discarded=discarded)


def _unit(doc: dict) -> str:
    return {"caption": "words", "refer": "expressions", "dense": "region captions"}.get(doc["task"], "items")


def _chains_note(store: Any, image_sha: str | None, generation_id: int | None) -> str:
    """" · N correction chain(s) exist for it …" when corrections of this generation exist (a save from here
    would start another chain), else ""."""
    if store is None or image_sha is None or generation_id is None:
        return ""
    try:
        others = store.list_corrections(image_sha=image_sha, limit=MAX_WORDS)
    except Exception:  # noqa: BLE001 - a note; the editor opens without it
        log.exception("annotation store: could not list corrections")
        return ""
    mine = [c for c in others if c["generation_id"] == generation_id]
    return (f" · {len(mine)} correction chain(s) exist for it: open one from “Corrections” to continue it"
            if mine else "")


@ws.user_errors
def open_item(studio: ws.Studio, state: AnnotateState | None, data: Any) -> tuple[AnnotateState, dict]:
    """Open a stored output: data = {kind: "generation" | "correction", id}. A correction opens at the head of its
    chain (the next save supersedes it)."""
    state = as_state(state)
    store = studio.store
    if store is None:
        raise ValueError("No annotation store is configured.")
    kind, item_id = (data or {}).get("kind"), (data or {}).get("id")
    if kind not in ("generation", "correction") or isinstance(item_id, bool) or not isinstance(item_id, int):
        raise ValueError("pick a row of the list")
    _guard_unsaved(state, (kind, item_id))
    discarded = _discarding(state)
    if kind == "generation":
        gen = store.get_generation(item_id)
        if gen is None:
            raise ValueError(f"no generation #{item_id}")
        doc = {"task": gen["task"], "timed_caption": [], "traces": [],
               "words": [{"text": t, "box": [float(c) for c in b], "non_visual": False}
                         for t, b in zip(gen["words"], gen["boxes"])]}
        if not doc["words"]:
            raise ValueError(f"generation #{item_id} has no words to correct")
        image, src = _image_from_store(store, gen["image_sha"])
        state = _open(state, doc, image, generation_id=item_id, head_id=None, head_status=None)
        note = _chains_note(store, gen["image_sha"], item_id)
        return state, editor_value(state, f"Opened generation #{item_id} ({gen['task']}){note}.", src=src,
                                   discarded=discarded)
    head = store.head(item_id)
    task = "caption"
    if head["generation_id"] is not None:
        gen = store.get_generation(head["generation_id"])
        task = gen["task"] if gen else "caption"
    nv = set(head["non_visual"])
    doc = {"task": task, "timed_caption": list(head["timed_caption"]), "traces": list(head["traces"]),
           "words": [{"text": t, "box": [float(c) for c in b], "non_visual": i in nv}
                     for i, (t, b) in enumerate(zip(head["words"], head["boxes"]))]}
    for item, word in zip(doc["timed_caption"], doc["words"]):
        item["utterance"] = word["text"]
    image, src = _image_from_store(store, head["image_sha"])
    state = _open(state, doc, image, generation_id=head["generation_id"], head_id=head["id"],
                  head_status=head["status"])
    who = f" by {head['annotator']}" + (f", reviewed by {head['reviewer']}" if head.get("reviewer") else "")
    return state, editor_value(state, f"Opened correction #{head['id']} ({head['status']}{who}).", src=src,
                               discarded=discarded)


# ------------------------------------------------------------------------------------------ restoring edits

def restore_from_view(studio: ws.Studio, state: AnnotateState, view: Any) -> tuple[AnnotateState, str]:
    """The editor's document rebuilt from what the page shows (`view`: the last editor value the server sent), when
    the server no longer has it: the app restarted, or the session's state expired (an hour after the page lost
    its connection, or evicted by STATE_SESSION_CAPACITY newer sessions). The page still shows the document and
    says "unsaved edits"; without this, autosave did nothing and a save answered "Open the current output first",
    losing the edits. The restored document is dirty and supersedes the correction the page had open (a save is
    still refused if someone else superseded it meanwhile). Returns (state, note); state unchanged when there is
    nothing to restore."""
    if state.doc is not None or studio.store is None or not isinstance(view, Mapping) or not view.get("words"):
        return state, ""
    source = view.get("source") if isinstance(view.get("source"), Mapping) else {}
    head_id, generation_id = source.get("correction_id"), source.get("generation_id")
    sha, head_status = None, None
    if isinstance(head_id, int) and not isinstance(head_id, bool):
        row = studio.store.get_correction(head_id)
        sha, head_status = (row["image_sha"], row["status"]) if row else (None, None)  # the store's, not the page's
    elif isinstance(generation_id, int) and not isinstance(generation_id, bool):
        row = studio.store.get_generation(generation_id)
        sha = row["image_sha"] if row else None
        head_id = None
    if sha is None:
        raise ValueError("The server no longer has this editor's document (the app restarted or the session "
                         "expired) and it cannot be matched to a stored output: copy your corrections, then open "
                         "the output again.")
    image = studio.store.get_image(sha)
    if image is None:
        raise ValueError(f"unknown image {sha}: it is not in the annotation store")
    width, height = int(image["width"]), int(image["height"])
    doc = normalise_doc({key: view.get(key) for key in ("words", "timed_caption", "traces", "task")}, width, height)
    opened = view.get("opened")  # the page's copy of these edits (kept in the browser) stays under its key
    restored = AnnotateState(doc=doc, image={"sha": sha, "key": sha, "width": width, "height": height},
                             generation_id=generation_id, head_id=head_id,
                             head_status=head_status, uid=state.uid,
                             rev=max(state.rev, int(view.get("rev") or 0)) + 1,
                             opened=opened if isinstance(opened, str) and 0 < len(opened) <= 64
                             else secrets.token_hex(8))
    return restored, " (restored from the page: the server had lost this editor — the app restarted or the " \
                     "session expired; undo history starts here)"


def _positive_id(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


@ws.user_errors
def restore_kept(studio: ws.Studio, state: AnnotateState | None, data: Any, login: str | None = None
                 ) -> tuple[AnnotateState, dict]:
    """The editor's "restore" event: unsaved edits the page kept in the browser (localStorage) before a reload or
    a server restart, offered when their output is opened again, become this editor's unsaved edits (one undoable
    step: undo goes back to the version just opened); Save draft / Submit then store them as usual.

    `data` is the kept copy: {source: {image_sha, generation_id, correction_id}, opened, task, words,
    timed_caption, traces}. It must belong to the output that is open (same image and generation; without a
    generation, the same correction), else it is refused: never restored onto another output. Its base is kept:
    the next save supersedes the correction the edits were made on (`correction_id`, its status read from the
    store), as it would have before the reload — a review made since is followed and an edit saved by someone
    else since makes the save fail as superseded, as for any save; when that base differs from the open head the
    message says so.

    `login` is who is signed in (None without --auth): a copy the page kept under another login (its `login`, ""
    when made without one) is refused. The page offers none (the copy is the browser's, the login the server's)."""
    state = as_state(state)
    doc = require_doc(state)
    if studio.store is None:
        raise ValueError("No annotation store is configured.")
    if not isinstance(data, Mapping) or not isinstance(data.get("source"), Mapping):
        raise ValueError("nothing to restore")
    check_rev(state, data.get("rev"))
    if (data.get("login") or "") != (login or ""):
        raise ValueError("These unsaved edits were kept in this browser under another login: they are not restored.")
    if state.dirty:  # the offer stays on the page while the user edits: restoring would overwrite those edits
        raise ValueError("This editor has unsaved edits of its own: save or undo them before restoring the kept "
                         "ones (restoring would replace them).")
    source = data["source"]
    sha = (state.image or {}).get("sha")
    generation_id = _positive_id(source.get("generation_id"))
    base = _positive_id(source.get("correction_id"))
    if source.get("correction_id") is not None and base is None:
        raise ValueError("the kept edits name no valid correction")
    same_output = (sha is not None and source.get("image_sha") == sha and generation_id == state.generation_id
                   and (generation_id is not None or (base is not None and base == state.head_id)))
    if not same_output:
        raise ValueError("These unsaved edits were made on another output: open that output to restore them.")
    head_status = None
    if base is not None:
        row = studio.store.get_correction(base)
        if row is None or row["image_sha"] != sha or row["generation_id"] != state.generation_id:
            raise ValueError(f"These unsaved edits were made on correction #{base}, which is not a correction of "
                             "this output.")
        head_status = row["status"]  # the store's, not the page's
    restored = normalise_doc({key: data.get(key) for key in ("words", "timed_caption", "traces", "task")},
                             int(state.image["width"]), int(state.image["height"]))
    if restored["task"] != doc["task"]:
        raise ValueError(f"These unsaved edits are a {restored['task']} correction; the open output is a "
                         f"{doc['task']} one.")
    kept = data.get("opened")
    kept = kept if isinstance(kept, str) and len(kept) <= 64 else ""
    if restored == doc:  # the kept edits are what is open (e.g. saved from another tab since): nothing to restore
        return state, editor_value(state, "The unsaved edits kept in this browser are the same as the version "
                                   "open: nothing to restore.", restored=kept)
    opened_head = state.head_id
    replace_doc(state, restored)
    # undo past the restore goes back to the open head too (not only to its document), redo to the copy's base
    state.restored_base = ((state.doc, (state.head_id, state.head_status), (base, head_status))
                           if base != opened_head else None)
    state.head_id, state.head_status = base, head_status
    state.last_save = state.pending_open = None
    where = f"correction #{base}" if base is not None else f"generation #{generation_id} (a new chain)"
    note = ""
    if base != opened_head:
        opened_label = f"correction #{opened_head}" if opened_head is not None else "the generation (a new chain)"
        note = (f" They were made on {where}, not on the open {opened_label}: saving them goes on {where}, as it "
                "would have before (a review made since is followed; an edit saved by someone else since makes "
                "the save fail as superseded).")
    message = f"Restored the unsaved edits kept in this browser: save a draft (s) or submit them.{note}"
    return state, editor_value(state, message, level="warn" if note else "info", restored=kept)
