"""The Annotate tab's document: one browser tab's editor state (`AnnotateState`), the edit operations with exact
undo/redo (`apply_edit`, `undo`, `redo`), and the JSON the editor draws from it (`editor_value`). The checks that
turn what the browser sent into a canonical document (`normalise_doc`, `boxes_from_trace`, the size limits) are in
`annotate_checks.py` and re-exported here. Plain data, no Gradio; `annotate.py` and `annotate_open.py` hold the
callbacks around it.
"""

from __future__ import annotations

import copy
import dataclasses
import secrets
from collections.abc import Mapping
from typing import Any

import numpy as np

from pixelllm import image as imaging
from pixelllm.ui import render
from pixelllm.ui.annotate_checks import (
    MAX_ANNOTATOR_CHARS,
    MAX_TRACE_POINTS,
    MAX_WORD_CHARS,
    MAX_WORDS,
    _flag,
    _timed_caption,
    _traces,
    _word_text,
    boxes_from_trace,
    check_annotator,
    doc_caption,
    hold_trace_ends,
    normalise_doc,
    trace_point_count,
)

__all__ = [
    "MAX_ANNOTATOR_CHARS", "MAX_HISTORY", "MAX_HISTORY_TRACE_POINTS", "MAX_TRACE_POINTS", "MAX_WORDS",
    "MAX_WORD_CHARS", "AnnotateState", "apply_edit", "as_state", "boxes_from_trace", "check_annotator",
    "check_rev", "doc_caption", "editor_value", "hold_trace_ends", "normalise_doc", "redo", "replace_doc",
    "require_doc", "trace_point_count", "undo", "with_login",
]

MAX_HISTORY = 200
MAX_HISTORY_TRACE_POINTS = 4 * MAX_TRACE_POINTS  # distinct trace points the undo stack keeps (about 4 full-size traces)


# ------------------------------------------------------------------------------------------ per-tab state

@dataclasses.dataclass
class AnnotateState:
    """One browser tab's editor (lives in gr.State).

    doc: {task, words: [{text, box (XYXY pixels), non_visual}], timed_caption, traces} or None;
    image: {sha, key, width, height, png} (sha None while the store has not got the image; png then holds its
    bytes, for the next save to add it);
    head_id: the correction the next save supersedes (None: the next save starts a new chain);
    saved_doc: the document as last opened or saved (dirty = doc differs from it);
    history / future: undo and redo stacks of documents; rev: bumped by every change (client tokens, stale edits);
    opened: the id of this opening of a document (new at every open; the page keys its browser copy of unsaved
    edits by it, static/annotate_unsaved.js).
    """

    doc: dict | None = None
    image: dict | None = None
    generation_id: int | None = None
    head_id: int | None = None
    head_status: str | None = None
    saved_doc: dict | None = None
    history: list[dict] = dataclasses.field(default_factory=list)
    future: list[dict] = dataclasses.field(default_factory=list)
    rev: int = 0
    uid: str = dataclasses.field(default_factory=lambda: secrets.token_hex(8))
    pending_open: tuple | None = None  # an open request refused once because of unsaved edits
    last_save: tuple[str, int | None] | None = None  # (client token, parent id) of the last save, for retries
    last_review: tuple[bool, int] | None = None  # (accepted, review row id) of this editor's last review
    opened: str = ""
    # a restore of kept edits made on another base (restore_kept): (the restored document, the (head_id,
    # head_status) it replaced, the (head_id, head_status) it set). Undo past that document goes back to the head
    # that was open, redo onto it takes the copy's base again (only while the head is still the one expected there).
    restored_base: tuple | None = None

    @property
    def dirty(self) -> bool:
        return self.doc is not None and self.doc != self.saved_doc


def as_state(state: AnnotateState | None) -> AnnotateState:
    return state if isinstance(state, AnnotateState) else AnnotateState()


def check_rev(state: AnnotateState, rev: Any) -> None:
    """`rev`, when the browser sends one, must be the revision it saw: a stale request is refused, never misapplied."""
    if rev is not None and (isinstance(rev, bool) or rev != state.rev):  # true == 1
        raise ValueError("The editor changed meanwhile (another edit was still being applied): try again.")


def require_doc(state: AnnotateState) -> dict:
    if state.doc is None:
        raise ValueError("Open the current output (or one from the list) first.")
    return state.doc


# ------------------------------------------------------------------------------------------ editing

def _set_doc(state: AnnotateState, doc: dict) -> None:
    """A new version of the document: the old one goes on the undo stack, redo is cleared. Versions share their
    trace lists (edits replace a trace, never change one in place); the stack keeps at most MAX_HISTORY versions
    and at most MAX_HISTORY_TRACE_POINTS points of distinct traces, dropping the oldest versions first."""
    state.history.append(state.doc)
    del state.history[:-MAX_HISTORY]
    seen: set[int] = set()
    points = 0
    for k in range(len(state.history) - 1, -1, -1):
        traces = state.history[k]["traces"]
        if id(traces) not in seen:
            seen.add(id(traces))
            points += trace_point_count(traces)
        if points > MAX_HISTORY_TRACE_POINTS:
            del state.history[:k + 1]
            break
    state.future.clear()
    state.doc = doc
    state.rev += 1


def replace_doc(state: AnnotateState, doc: dict) -> None:
    """Put a whole document in the editor as one undoable step (a restore of unsaved edits kept by the page)."""
    _set_doc(state, doc)


def _rederive(doc: dict, width: int, height: int) -> None:
    """With a trace, every box follows from it (LN rule); keeps the stored boxes and trace consistent (a recording
    saved before its ends were held is held here too, as saving it would)."""
    if trace_point_count(doc["traces"]) >= 2 and doc["timed_caption"]:
        doc["traces"] = hold_trace_ends(doc["traces"], doc["timed_caption"])
        for word, box in zip(doc["words"], boxes_from_trace(doc["traces"], doc["timed_caption"], width, height)):
            word["box"] = box


def _index(op: Mapping, doc: dict, key: str = "i") -> int:
    i = op.get(key)
    if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(doc["words"]):
        raise ValueError("select a word first")
    return i


def _split_text(text: str, at: Any) -> list[str]:
    parts = text.split()
    if len(parts) > 1:
        return parts
    if isinstance(at, int) and not isinstance(at, bool) and 0 < at < len(text):
        return [text[:at], text[at:]]
    if len(text) < 2:
        raise ValueError("a one-character word cannot be split")
    mid = len(text) // 2
    return [text[:mid], text[mid:]]


def _replace_word(doc: dict, i: int, texts: list[str]) -> None:
    """Word i becomes len(texts) words sharing its box (and splitting its time slot equally)."""
    word = doc["words"][i]
    new = [{"text": t, "box": list(word["box"]), "non_visual": word["non_visual"]} for t in texts]
    doc["words"][i:i + 1] = new
    if doc["timed_caption"]:
        slot = doc["timed_caption"][i]
        edges = np.linspace(slot["start_time"], slot["end_time"], len(texts) + 1).tolist()
        doc["timed_caption"][i:i + 1] = [{"utterance": t, "start_time": edges[k], "end_time": edges[k + 1]}
                                         for k, t in enumerate(texts)]


def apply_edit(state: AnnotateState | None, op: Mapping[str, Any]) -> tuple[AnnotateState, str]:
    """Apply one editor operation; returns (state, message). Operations (`i` = word index):
    text {i, text} (spaces split the word) · insert {i, text} (after word i; i = -1: first) · delete {i} ·
    merge {i} (with word i+1, joined without a space) · split {i, at?} (at spaces, else at character `at`,
    else in the middle) · box {i, box} (pixels; drops a recorded trace) · non_visual {i, value} ·
    trace {traces, timed_caption} (a new recording: boxes are derived from it) · clear_trace.
    `rev`, when given, must be the revision the browser saw (a stale edit is refused, never misapplied)."""
    state = as_state(state)
    doc = require_doc(state)
    if not isinstance(op, Mapping) or not isinstance(op.get("op"), str):
        raise ValueError("unknown edit")
    check_rev(state, op.get("rev"))
    kind = op["op"]
    width, height = state.image["width"], state.image["height"]
    # the trace (up to MAX_TRACE_POINTS points) is shared with the previous version, not copied
    new = {**doc, "words": copy.deepcopy(doc["words"]), "timed_caption": copy.deepcopy(doc["timed_caption"])}
    words, timed = new["words"], new["timed_caption"]
    message = ""
    if kind == "text":
        i = _index(op, new)
        text = _word_text(op.get("text"))
        parts = text.split(" ")
        if len(parts) > 1:
            _replace_word(new, i, parts)
            message = f"word {i + 1} split into {len(parts)} words"
        else:
            words[i]["text"] = text
            if timed:
                timed[i]["utterance"] = text
            message = f"word {i + 1} is now “{text}”"
    elif kind == "insert":
        i = op.get("i", len(words) - 1)
        if isinstance(i, bool) or not isinstance(i, int) or not -1 <= i < len(words):
            raise ValueError("insert after which word?")
        text = _word_text(op.get("text") if op.get("text") is not None else "word")
        ref = words[i] if i >= 0 else (words[0] if words else None)
        box = list(ref["box"]) if ref else [0.0, 0.0, float(width), float(height)]
        for k, piece in enumerate(text.split(" ")):
            words.insert(i + 1 + k, {"text": piece, "box": list(box), "non_visual": False})
            if timed:
                at = timed[i + k]["end_time"] if i + k >= 0 else timed[0]["start_time"]
                nxt = timed[i + 1 + k]["start_time"] if i + 1 + k < len(timed) else at
                timed.insert(i + 1 + k, {"utterance": piece, "start_time": at, "end_time": max(at, nxt)})
        message = f"inserted “{text}” after word {i + 1}" if i >= 0 else f"inserted “{text}” first"
    elif kind == "delete":
        i = _index(op, new)
        gone = words.pop(i)
        if timed:
            timed.pop(i)
        message = f"deleted “{gone['text']}”"
    elif kind == "merge":
        i = _index(op, new)
        if i + 1 >= len(words):
            raise ValueError("the last word has no next word to merge with")
        a, b = words[i], words[i + 1]
        text = _word_text(a["text"] + b["text"])
        words[i:i + 2] = [{"text": text, "box": [min(a["box"][0], b["box"][0]), min(a["box"][1], b["box"][1]),
                                                 max(a["box"][2], b["box"][2]), max(a["box"][3], b["box"][3])],
                           "non_visual": a["non_visual"] and b["non_visual"]}]
        if timed:
            timed[i:i + 2] = [{"utterance": text, "start_time": timed[i]["start_time"],
                               "end_time": timed[i + 1]["end_time"]}]
        message = f"merged into “{text}”"
    elif kind == "split":
        i = _index(op, new)
        parts = _split_text(words[i]["text"], op.get("at"))
        _replace_word(new, i, parts)
        message = f"split into {' · '.join(parts)}"
    elif kind == "box":
        i = _index(op, new)
        box = imaging.check_box(op.get("box"), width, height).tolist()
        words[i]["box"] = [float(c) for c in box]
        if new["traces"]:
            new["traces"], new["timed_caption"] = [], []
            message = (f"moved the box of “{words[i]['text']}”; the recorded trace was dropped "
                       "(boxes no longer follow it — undo to restore it)")
        else:
            message = f"moved the box of “{words[i]['text']}”"
    elif kind == "non_visual":
        i = _index(op, new)
        value = _flag(op.get("value"), "the non_visual value") if op.get("value") is not None else None
        words[i]["non_visual"] = (not words[i]["non_visual"]) if value is None else value
        message = f"“{words[i]['text']}” is {'non-visual' if words[i]['non_visual'] else 'visual'}"
    elif kind == "trace":
        if new["task"] != "caption":
            raise ValueError("Trace recording is for captions; referring and dense outputs are corrected by box.")
        traces = _traces(op.get("traces"))
        if trace_point_count(traces) < 2:
            raise ValueError("No trace was captured: move the mouse over the image while the words advance.")
        new["timed_caption"] = _timed_caption(op.get("timed_caption"), [w["text"] for w in words])
        if not new["timed_caption"]:
            raise ValueError("the recording has no word timing")
        new["traces"] = traces  # held at its ends by _rederive below
        message = (f"recorded {trace_point_count(traces)} trace points over "
                   f"{new['timed_caption'][-1]['end_time']:.1f} s; boxes derived from the trace")
    elif kind == "clear_trace":
        if not new["traces"]:
            raise ValueError("there is no recorded trace")
        new["traces"], new["timed_caption"] = [], []
        message = "trace cleared (boxes kept)"
    else:
        raise ValueError(f"unknown edit {kind!r}")
    if not words:
        raise ValueError("a correction needs at least one word")
    if len(words) > MAX_WORDS:
        raise ValueError(f"{len(words)} words; the limit is {MAX_WORDS}")
    if kind != "box":
        _rederive(new, width, height)
    _set_doc(state, new)
    return state, message


def _travel(state: AnnotateState | None, back: bool) -> tuple[AnnotateState, str]:
    """One step through the history: undo (`back`) pops `history` onto `future`, redo the reverse."""
    state = as_state(state)
    require_doc(state)
    source, target = (state.history, state.future) if back else (state.future, state.history)
    if not source:
        return state, "nothing to undo" if back else "nothing to redo"
    leaving = state.doc
    target.append(state.doc)
    state.doc = source.pop()
    state.rev += 1
    mark = state.restored_base
    if mark is not None:
        restored, opened_head, restored_head = mark
        current = (state.head_id, state.head_status)
        if back and leaving is restored and current[0] == restored_head[0]:
            state.head_id, state.head_status = opened_head
        elif not back and state.doc is restored and current[0] == opened_head[0]:
            state.head_id, state.head_status = restored_head
    return state, "undone" if back else "redone"


def undo(state: AnnotateState | None) -> tuple[AnnotateState, str]:
    return _travel(state, back=True)


def redo(state: AnnotateState | None) -> tuple[AnnotateState, str]:
    return _travel(state, back=False)


# ------------------------------------------------------------------------------------------ the editor's value

def editor_value(state: AnnotateState | None, message: str = "", *, level: str = "info", src: str | None = None,
                 store_ok: bool = True, discarded: str = "", restored: str = "", restore_refused: str = "") -> dict:
    """The JSON the editor (static/annotate.js) draws. Boxes are pixels of the image, traces normalised;
    all text reaches the page through textContent. `opened` identifies this opening of the document (the page keeps
    its unsaved edits in the browser under it); `discarded` names the opening whose unsaved edits an open just
    discarded (the page drops their copy), `restored` the copy a restore just took over, `restore_refused` says the
    server refused the restore the page sent (the page stops waiting for it): a token new for each refusal, as the
    page redraws only a value that changed (a second refusal in a row was otherwise the same value, never drawn).
    `login` is who is signed in ("" without --auth; the Annotate tab's handlers fill it in, `with_login`): the page
    offers only copies kept under it."""
    state = as_state(state)
    doc = state.doc
    image = None
    if state.image is not None:
        image = {"key": state.image["key"], "width": state.image["width"], "height": state.image["height"],
                 "src": src}
    words = []
    if doc is not None:
        colours = render.gradient_colors(len(doc["words"]))
        words = [{"i": i, "text": w["text"], "box": [round(float(c), 2) for c in w["box"]],
                  "non_visual": bool(w["non_visual"]), "color": colours[i], "ink": render.ink_for(colours[i])}
                 for i, w in enumerate(doc["words"])]
    sha = (state.image or {}).get("sha")
    return {
        "image": image, "words": words, "task": doc["task"] if doc else None,
        "timed_caption": doc["timed_caption"] if doc else [], "traces": doc["traces"] if doc else [],
        "recordable": bool(doc and doc["task"] == "caption"),
        "rev": state.rev, "dirty": state.dirty, "can_undo": bool(state.history), "can_redo": bool(state.future),
        "source": {"generation_id": state.generation_id, "correction_id": state.head_id,
                   "status": state.head_status, "image": sha[:12] if sha else None, "image_sha": sha},
        "opened": state.opened, "discarded": discarded, "restored": restored, "restore_refused": restore_refused,
        "login": "",
        "store": store_ok, "message": message, "level": level,
    }


def with_login(out: Any, login: str | None) -> Any:
    """A handler's (state, editor value) with the signed-in login ("" without --auth) put in the editor value: the
    page keeps its unsaved edits under it and offers only that login's copies (static/annotate_unsaved.js)."""
    if isinstance(out, tuple) and len(out) >= 2 and isinstance(out[1], dict) and "opened" in out[1]:
        out[1]["login"] = login or ""
    return out
