"""The Annotate tab's callbacks: open a model output (or a stored correction), edit it, re-record its trace
Localized-Narratives style, save, review, export and compare adapters. Plain data in and out, tested directly
(tests/test_annotate.py); the Gradio wiring is `annotate_tab.build_annotate_tab`.

What lives where:
- The **document** being edited (words, their pixel boxes, non-visual flags, the LN timed caption and trace) and
  its **undo/redo history** live server-side in `AnnotateState` (one per browser tab, in `gr.State`). The
  browser (`static/annotate.js`) draws it, captures drags and the mouse trace, and sends one edit operation at a
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
import dataclasses
import json
import logging
import math
import re
import secrets
import shutil
import threading
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from pixelllm import image as imaging
from pixelllm.ui import callbacks as cb
from pixelllm.ui import render

log = logging.getLogger(__name__)

EDIT_STATUSES = ("draft", "submitted")
LIST_STATUSES = ("any", "draft", "submitted", "accepted", "rejected")
MAX_WORDS = 512
MAX_WORD_CHARS = 200
MAX_ANNOTATOR_CHARS = 64
MAX_COMMENT_CHARS = 2000
MAX_TRACE_POINTS = 50_000
MAX_HISTORY = 200
LIST_SCAN = 2000       # rows scanned when filtering by sha prefix / annotator substring
LIST_SHOW = 50         # rows shown
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HEX = re.compile(r"^[0-9a-f]{1,64}$")
API_KEYS = ("image_sha", "generation_id", "parent_id", "annotator", "status", "caption", "words", "boxes",
            "non_visual", "timed_caption", "traces", "comment", "client_token", "task")


# ------------------------------------------------------------------------------------------ per-tab state

@dataclasses.dataclass
class AnnotateState:
    """One browser tab's editor (lives in gr.State).

    doc: {task, words: [{text, box (XYXY pixels), non_visual}], timed_caption, traces} or None;
    image: {sha, key, width, height} (sha None while the store has not got the image);
    head_id: the correction the next save supersedes (None: the next save starts a new chain);
    saved_doc: the document as last opened or saved (dirty = doc differs from it);
    history / future: undo and redo stacks of documents; rev: bumped by every change (client tokens, stale edits).
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

    @property
    def dirty(self) -> bool:
        return self.doc is not None and self.doc != self.saved_doc


def _state(state: AnnotateState | None) -> AnnotateState:
    return state if isinstance(state, AnnotateState) else AnnotateState()


def _require_doc(state: AnnotateState) -> dict:
    if state.doc is None:
        raise ValueError("Open the current output (or one from the list) first.")
    return state.doc


# ------------------------------------------------------------------------------------------ validation

def _finite(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_annotator(name: Any) -> str:
    """The annotator (or reviewer) name: required, one line, at most 64 characters. Any other character is fine:
    it is stored as typed and escaped wherever it is shown."""
    if name is None or (isinstance(name, str) and not name.strip()):
        raise ValueError("Type your annotator name first: it is stored with every correction and review.")
    if not isinstance(name, str):
        raise ValueError("the annotator name must be text")
    name = " ".join(name.split())
    if len(name) > MAX_ANNOTATOR_CHARS:
        raise ValueError(f"the annotator name is {len(name)} characters long; the limit is {MAX_ANNOTATOR_CHARS}")
    if _CONTROL.search(name):
        raise ValueError("the annotator name contains control characters")
    return name


def _word_text(text: Any, name: str = "a word") -> str:
    if not isinstance(text, str):
        raise ValueError(f"{name} must be text, got {type(text).__name__}")
    text = " ".join(text.split())
    if not text:
        raise ValueError(f"{name} cannot be empty (delete the word instead)")
    if len(text) > MAX_WORD_CHARS:
        raise ValueError(f"{name} is {len(text)} characters long; the limit is {MAX_WORD_CHARS}")
    return text


def _box(value: Any, width: int, height: int, name: str) -> list[float]:
    """XYXY pixels: corners sorted, clipped to the image (a zero-area box is allowed: a point)."""
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise ValueError(f"{name} must be [x0, y0, x1, y1] in image pixels, got {value!r}")
    x0, y0, x1, y1 = (_finite(v, name) for v in value)
    x0, x1 = sorted((min(max(x0, 0.0), width), min(max(x1, 0.0), width)))
    y0, y1 = sorted((min(max(y0, 0.0), height), min(max(y1, 0.0), height)))
    return [x0, y0, x1, y1]


def _traces(value: Any) -> list[list[dict[str, float]]]:
    """LN traces [[{x, y, t}]] (x, y normalised to the image, may fall slightly outside [0, 1]; t seconds)."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ValueError("traces must be a list of segments [[{x, y, t}, ...], ...]")
    segments, total = [], 0
    for s, segment in enumerate(value):
        if not isinstance(segment, (list, tuple)):
            raise ValueError(f"traces[{s}] must be a list of {{x, y, t}} points")
        points = []
        for p, point in enumerate(segment):
            if not isinstance(point, Mapping) or not {"x", "y", "t"} <= set(point):
                raise ValueError(f"traces[{s}][{p}] must be {{x, y, t}}, got {point!r}")
            x, y, t = (_finite(point[k], f"traces[{s}][{p}].{k}") for k in ("x", "y", "t"))
            if not (-1.0 <= x <= 2.0 and -1.0 <= y <= 2.0):
                raise ValueError(f"traces[{s}][{p}] is far outside the image: x, y are normalised to [0, 1]")
            points.append({"x": x, "y": y, "t": t})
        total += len(points)
        if points:
            segments.append(points)
    if total > MAX_TRACE_POINTS:
        raise ValueError(f"the trace has {total} points; the limit is {MAX_TRACE_POINTS}")
    return segments


def trace_point_count(traces: Sequence[Sequence[Any]]) -> int:
    return sum(len(segment) for segment in traces or [])


def _timed_caption(value: Any, texts: Sequence[str]) -> list[dict[str, Any]]:
    """[] or one {utterance, start_time, end_time} per word, in order; utterances become the words' text."""
    if not value:
        return []
    if not isinstance(value, (list, tuple)):
        raise ValueError("timed_caption must be a list of {utterance, start_time, end_time}")
    if len(value) != len(texts):
        raise ValueError(f"timed_caption must have one entry per word: {len(value)} entries for {len(texts)} words")
    out = []
    for i, (item, text) in enumerate(zip(value, texts)):
        if not isinstance(item, Mapping):
            raise ValueError(f"timed_caption[{i}] must be {{utterance, start_time, end_time}}")
        try:
            start = _finite(item["start_time"], f"timed_caption[{i}].start_time")
            end = _finite(item["end_time"], f"timed_caption[{i}].end_time")
        except KeyError as err:
            raise ValueError(f"timed_caption[{i}] lacks {err}") from None
        if end < start:
            raise ValueError(f"timed_caption[{i}] ends before it starts ({start} > {end})")
        if out and start < out[-1]["start_time"]:
            raise ValueError(f"timed_caption[{i}] starts before the previous word: words are timed in order")
        out.append({"utterance": text, "start_time": start, "end_time": end})
    return out


def boxes_from_trace(traces: Sequence[Sequence[Mapping]], timed_caption: Sequence[Mapping], width: int,
                     height: int) -> list[list[float]]:
    """Each word's box (XYXY pixels) from an LN trace, exactly as the LN reader derives its targets: Scenic's rule
    (`utterance_targets`: sort by t, interpolate, 16 samples over the word's [start, end], min/max) on the
    normalised trace, scaled to pixels. Not clipped (LN traces may leave the image slightly)."""
    from training.data.localized_narratives import utterance_targets

    boxes, _ = utterance_targets([list(s) for s in traces], list(timed_caption))
    scale = np.array([width, height, width, height], dtype=np.float64)
    return (np.asarray(boxes, dtype=np.float64).reshape(-1, 4) * scale).tolist()


def normalise_doc(data: Mapping[str, Any], width: int, height: int) -> dict:
    """Editor / API JSON -> the canonical document. `words` is either [{text, box, non_visual}] (the editor) or
    a list of strings with parallel `boxes` and `non_visual` word indices (the API). Boxes may be omitted when a
    trace (>= 2 points) and a timed caption are given: they are then derived from the trace."""
    if not isinstance(data, Mapping):
        raise ValueError("the correction must be a JSON object")
    words = data.get("words")
    if not isinstance(words, (list, tuple)) or not words:
        raise ValueError("words must be a non-empty list (the corrected words, in order)")
    if len(words) > MAX_WORDS:
        raise ValueError(f"{len(words)} words; the limit is {MAX_WORDS}")
    if all(isinstance(w, Mapping) for w in words):
        texts = [_word_text(w.get("text"), f"words[{i}].text") for i, w in enumerate(words)]
        raw_boxes = [w.get("box") for w in words]
        non_visual = [i for i, w in enumerate(words) if w.get("non_visual")]
    elif all(isinstance(w, str) for w in words):
        texts = [_word_text(w, f"words[{i}]") for i, w in enumerate(words)]
        raw_boxes = data.get("boxes")
        if raw_boxes is None:
            raw_boxes = [None] * len(texts)
        if not isinstance(raw_boxes, (list, tuple)) or len(raw_boxes) != len(texts):
            raise ValueError(f"boxes must have one [x0, y0, x1, y1] per word ({len(texts)} words)")
        flags = data.get("non_visual") or []
        if not isinstance(flags, (list, tuple)):
            raise ValueError("non_visual must be a list of word indices")
        if flags and all(isinstance(f, bool) for f in flags):
            if len(flags) != len(texts):
                raise ValueError("non_visual flags must have one entry per word")
            non_visual = [i for i, f in enumerate(flags) if f]
        else:
            non_visual = []
            for f in flags:
                if isinstance(f, bool) or not isinstance(f, int) or not 0 <= f < len(texts):
                    raise ValueError(f"non_visual lists word indices in [0, {len(texts)}), got {f!r}")
                non_visual.append(f)
            non_visual = sorted(set(non_visual))
    else:
        raise ValueError("words must be all strings or all {text, box} objects")
    traces = _traces(data.get("traces"))
    timed = _timed_caption(data.get("timed_caption"), texts)
    if trace_point_count(traces) >= 2 and timed:
        boxes = boxes_from_trace(traces, timed, width, height)
    else:
        if any(b is None for b in raw_boxes):
            raise ValueError("every word needs a box [x0, y0, x1, y1] in image pixels (or send a recorded trace "
                             "with >= 2 points and a timed_caption, and the boxes are derived from it)")
        boxes = [_box(b, width, height, f"boxes[{i}]") for i, b in enumerate(raw_boxes)]
    task = data.get("task") or "caption"
    if task not in ("caption", "refer", "dense"):
        raise ValueError(f"task must be caption, refer or dense, got {task!r}")
    nv = set(non_visual)
    return {"task": task,
            "words": [{"text": t, "box": b, "non_visual": i in nv} for i, (t, b) in enumerate(zip(texts, boxes))],
            "timed_caption": timed, "traces": traces}


def _doc_caption(doc: dict, given: Any = None) -> str:
    if isinstance(given, str) and given.strip():
        return " ".join(given.split())
    if doc.get("task", "caption") != "caption":
        return ""
    return " ".join(w["text"] for w in doc["words"])


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
        raise ValueError("No annotation store is configured: start the app with --db PATH to save corrections.")
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
        caption=_doc_caption(doc, editor_json.get("caption")), words=words, boxes=boxes,
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


# ------------------------------------------------------------------------------------------ editing

def _set_doc(state: AnnotateState, doc: dict) -> None:
    """A new version of the document: the old one goes on the undo stack, redo is cleared."""
    state.history.append(state.doc)
    del state.history[:-MAX_HISTORY]
    state.future.clear()
    state.doc = doc
    state.rev += 1


def _rederive(doc: dict, width: int, height: int) -> None:
    """With a trace, every box follows from it (LN rule); keeps the stored boxes and trace consistent."""
    if trace_point_count(doc["traces"]) >= 2 and doc["timed_caption"]:
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
    state = _state(state)
    doc = _require_doc(state)
    if not isinstance(op, Mapping) or not isinstance(op.get("op"), str):
        raise ValueError("unknown edit")
    rev = op.get("rev")
    if rev is not None and rev != state.rev:
        raise ValueError("The editor changed meanwhile (another edit was still being applied): try again.")
    kind = op["op"]
    width, height = state.image["width"], state.image["height"]
    new = copy.deepcopy(doc)
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
        words[i]["non_visual"] = bool(op.get("value", not words[i]["non_visual"]))
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
        new["traces"] = traces
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
    if kind != "box":
        _rederive(new, width, height)
    _set_doc(state, new)
    return state, message


def undo(state: AnnotateState | None) -> tuple[AnnotateState, str]:
    state = _state(state)
    _require_doc(state)
    if not state.history:
        return state, "nothing to undo"
    state.future.append(state.doc)
    state.doc = state.history.pop()
    state.rev += 1
    return state, "undone"


def redo(state: AnnotateState | None) -> tuple[AnnotateState, str]:
    state = _state(state)
    _require_doc(state)
    if not state.future:
        return state, "nothing to redo"
    state.history.append(state.doc)
    state.doc = state.future.pop()
    state.rev += 1
    return state, "redone"


@cb.user_errors
def edit_event(state: AnnotateState | None, data: Any) -> tuple[AnnotateState, dict]:
    """The editor's "edit" event: apply_edit, then the new view."""
    state, message = apply_edit(state, data if isinstance(data, Mapping) else {})
    return state, editor_value(state, message)


@cb.user_errors
def history_event(state: AnnotateState | None, data: Any) -> tuple[AnnotateState, dict]:
    """The editor's "history" event: {op: "undo" | "redo"}."""
    op = (data or {}).get("op") if isinstance(data, Mapping) else None
    if op not in ("undo", "redo"):
        raise ValueError("unknown history operation")
    state, message = (undo if op == "undo" else redo)(state)
    return state, editor_value(state, message)


# ------------------------------------------------------------------------------------------ the editor's value

def editor_value(state: AnnotateState | None, message: str = "", *, level: str = "info", src: str | None = None,
                 store_ok: bool = True) -> dict:
    """The JSON the editor (static/annotate.js) draws. Boxes are pixels of the image, traces normalised;
    all text reaches the page through textContent."""
    state = _state(state)
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
                   "status": state.head_status, "image": sha[:12] if sha else None},
        "store": store_ok, "message": message, "level": level,
    }


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
                          head_status=head_status, saved_doc=copy.deepcopy(doc), uid=state.uid, rev=state.rev + 1)
    return fresh


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


@cb.user_errors
def open_current(studio: cb.Studio, session: cb.Session | None, state: AnnotateState | None
                 ) -> tuple[AnnotateState, dict]:
    """Open the session's last output (Session.last: caption, referring or dense) in the editor."""
    state = _state(state)
    session = session if isinstance(session, cb.Session) else None
    if session is None or not session.last or session.image is None:
        raise ValueError("Nothing to correct yet: caption an image (or run Referring / Dense) first.")
    last = session.last
    target = ("current", last.get("generation_id"))
    _guard_unsaved(state, target)
    doc = _doc_from_output(last)
    sha = session.sha
    note = ""
    if sha is None and studio.store is not None and session.array is not None:
        try:
            sha = studio.store.add_image(render.png_bytes(session.array), int(session.array.shape[1]),
                                         int(session.array.shape[0]))
        except Exception as err:  # noqa: BLE001 - the editor still works; saving will retry
            log.exception("annotation store: could not add the image")
            gr.Warning(f"The annotation store is unavailable ({render.escape(err)}); you can edit, and saving "
                       "will retry.")
            note = " (store unavailable: saving will retry)"
    image = {"sha": sha, "key": session.image["key"], "width": session.image["width"],
             "height": session.image["height"]}
    state = _open(state, doc, image, generation_id=last.get("generation_id"), head_id=None, head_status=None)
    gen = f"generation #{last['generation_id']}" if last.get("generation_id") else "the last output (not logged)"
    return state, editor_value(state, f"Opened {gen}: {len(doc['words'])} {_unit(doc)}{note}.",
                               src=session.image.get("src") or None)


def _unit(doc: dict) -> str:
    return {"caption": "words", "refer": "expressions", "dense": "region captions"}.get(doc["task"], "items")


@cb.user_errors
def open_item(studio: cb.Studio, state: AnnotateState | None, data: Any) -> tuple[AnnotateState, dict]:
    """Open a stored output: data = {kind: "generation" | "correction", id}. A correction opens at the head of its
    chain (the next save supersedes it)."""
    state = _state(state)
    store = studio.store
    if store is None:
        raise ValueError("No annotation store is configured.")
    kind, item_id = (data or {}).get("kind"), (data or {}).get("id")
    if kind not in ("generation", "correction") or isinstance(item_id, bool) or not isinstance(item_id, int):
        raise ValueError("pick a row of the list")
    _guard_unsaved(state, (kind, item_id))
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
        others = store.list_corrections(image_sha=gen["image_sha"], limit=MAX_WORDS)
        mine = [c for c in others if c["generation_id"] == item_id]
        note = (f" · {len(mine)} correction chain(s) exist for it: open one from “Corrections” to continue it"
                if mine else "")
        return state, editor_value(state, f"Opened generation #{item_id} ({gen['task']}){note}.", src=src)
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
    return state, editor_value(state, f"Opened correction #{head['id']} ({head['status']}{who}).", src=src)


# ------------------------------------------------------------------------------------------ saving (UI)

def client_token_for(state: AnnotateState, status: str) -> str:
    """The token of a UI save: the same document version saved twice (a retry, a double click) is one row."""
    return f"ui-{state.uid}-{state.rev}-{status}"


def save(studio: cb.Studio, state: AnnotateState | None, status: str, annotator: Any, comment: Any = None, *,
         auto: bool = False) -> tuple[AnnotateState, dict | None]:
    """Save draft / Submit / autosave from the editor. Bad input -> gr.Error; a store failure -> gr.Warning and
    the document stays in the editor (dirty), so saving again (same client token) retries without duplicating."""
    state = _state(state)
    try:
        doc = _require_doc(state)
        if auto:
            if not state.dirty:
                return state, None  # nothing to do (the wiring leaves the editor as it is)
            if not (isinstance(annotator, str) and annotator.strip()):
                return state, editor_value(state, "Autosave is waiting for your annotator name.", level="warn")
        payload = {**doc, "comment": comment if isinstance(comment, str) and comment.strip() else None}
        result = save_correction_from_editor(studio.store, state, payload, status, annotator,
                                             client_token_for(state, status))
    except ValueError as err:
        if auto:
            return state, editor_value(state, f"Autosave failed: {err}", level="error")
        raise gr.Error(render.escape(err)) from err
    except Exception as err:  # noqa: BLE001 - StoreError or worse: keep the edits, tell the user
        log.exception("annotation store: could not save a correction")
        gr.Warning(f"Not saved — the annotation store failed: {render.escape(err)}. Your edits are kept in this "
                   "tab; save again to retry.")
        return state, editor_value(state, "Not saved: the annotation store failed; your edits are kept — "
                                          "save again to retry.", level="error", store_ok=False)
    verb = {"draft": "Autosaved draft" if auto else "Saved draft", "submitted": "Submitted"}[status]
    return state, editor_value(state, f"{verb} as correction #{result['correction_id']}.")


@cb.user_errors
def review(studio: cb.Studio, state: AnnotateState | None, reviewer: Any, accept: bool, comment: Any
           ) -> tuple[AnnotateState, dict]:
    """Accept or reject the open correction (the head of its chain; it must be submitted) with a comment."""
    state = _state(state)
    if studio.store is None:
        raise ValueError("No annotation store is configured.")
    reviewer = check_annotator(reviewer)
    if state.head_id is None:
        raise ValueError("Open a submitted correction to review it (Browse → Corrections).")
    if state.dirty:
        raise ValueError("The editor has unsaved edits: submit them (or undo them) before reviewing.")
    if comment is not None and (not isinstance(comment, str) or len(comment) > MAX_COMMENT_CHARS):
        raise ValueError(f"the comment must be at most {MAX_COMMENT_CHARS} characters")
    try:
        new_id = studio.store.review(state.head_id, reviewer, bool(accept), (comment or "").strip() or None,
                                     client_token=f"review-{state.uid}-{state.rev}-{state.head_id}")
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001
        log.exception("annotation store: could not record a review")
        gr.Warning(f"The review was not recorded — the annotation store failed: {render.escape(err)}. "
                   "Press the button again to retry.")
        return state, editor_value(state, "Review not recorded: store failure — retry.", level="error",
                                   store_ok=False)
    decision = "accepted" if accept else "rejected"
    old = state.head_id
    state.head_id, state.head_status = new_id, decision
    state.rev += 1
    return state, editor_value(state, f"Correction #{old} {decision} (review row #{new_id}).")


# ------------------------------------------------------------------------------------------ browsing

@cb.user_errors
def list_items(studio: cb.Studio, show: str, sha_prefix: Any, annotator: Any, status: Any, search: Any) -> dict:
    """The browse list: corrections (heads of chains) or model outputs, newest first, filtered by image sha
    prefix, annotator (case-insensitive substring), status and a text search. Returns the list component's
    JSON ({kind, rows, message}); every value is shown as text."""
    store = studio.store
    kind = "generation" if show == "Model outputs" else "correction"
    if store is None:
        return {"kind": kind, "rows": [], "message": "No annotation store is configured."}
    prefix = (sha_prefix or "").strip().lower()
    if prefix and not _HEX.match(prefix):
        raise ValueError("the image id is a hexadecimal sha256 prefix (0-9, a-f)")
    who = " ".join((annotator or "").split()).casefold()
    text = " ".join((search or "").split())
    if len(text) > 200:
        raise ValueError("the search text is limited to 200 characters")
    exact = prefix if len(prefix) == 64 else None
    rows: list[dict] = []
    if kind == "correction":
        wanted = None if status in (None, "", "any") else status
        if wanted is not None and wanted not in LIST_STATUSES:
            raise ValueError(f"unknown status {wanted!r}")
        found = store.list_corrections(status=wanted, image_sha=exact, search=text or None, limit=LIST_SCAN)
        for c in found:
            if prefix and not c["image_sha"].startswith(prefix):
                continue
            if who and who not in c["annotator"].casefold():
                continue
            rows.append({"kind": "correction", "id": c["id"], "image": c["image_sha"][:12],
                         "status": c["status"], "annotator": c["annotator"], "reviewer": c.get("reviewer") or "",
                         "text": (c["caption"] or " · ".join(c["words"]))[:120], "when": c["created_at"][:19]})
    else:
        found = store.list_generations(image_sha=exact, limit=LIST_SCAN)
        needle = text.casefold()
        for g in found:
            if prefix and not g["image_sha"].startswith(prefix):
                continue
            joined = " ".join(g["words"]) if g["task"] == "caption" else " · ".join(g["words"])
            if needle and needle not in joined.casefold():
                continue
            rows.append({"kind": "generation", "id": g["id"], "image": g["image_sha"][:12], "status": g["task"],
                         "annotator": g.get("adapter") or "", "reviewer": "", "text": joined[:120],
                         "when": g["created_at"][:19]})
    shown = rows[:LIST_SHOW]
    message = (f"{len(rows)} {'correction' if kind == 'correction' else 'model output'}(s)"
               + (f", showing the newest {LIST_SHOW}" if len(rows) > LIST_SHOW else "")
               + (" — click a row to open it" if rows else ""))
    return {"kind": kind, "rows": shown, "message": message}


# ------------------------------------------------------------------------------------------ export

@cb.user_errors
def export(studio: cb.Studio, statuses: Any) -> tuple[str, str]:
    """Export corrections with `training.export.export_corrections` and zip the folder. Returns (zip path,
    summary text)."""
    if studio.store is None:
        raise ValueError("No annotation store is configured.")
    try:
        from training.export import export_corrections
    except ImportError as err:
        raise gr.Error(f"export module missing (training/export.py: {render.escape(err)})") from err
    chosen = [s for s in (statuses or []) if isinstance(s, str)]
    if not chosen:
        raise ValueError("tick at least one status to export")
    folder = cb._download_dir(studio)
    out = folder / "pixelllm-corrections"
    try:
        summary = export_corrections(studio.store, out, chosen)
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001
        log.exception("export failed")
        raise gr.Error(f"The export failed: {render.escape(err)}") from err
    target = folder / "pixelllm-corrections.zip"
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(out.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder).as_posix())
    shutil.rmtree(out, ignore_errors=True)
    text = (f"{summary.get('ln_records', 0)} LN record(s) ({summary.get('recorded_traces', 0)} recorded, "
            f"{summary.get('synthesised_traces', 0)} synthesised traces), {summary.get('regions', 0)} region(s), "
            f"{summary.get('images', 0)} image(s); statuses: {', '.join(chosen)}")
    return str(target), text


# ------------------------------------------------------------------------------------------ compare adapters

@cb.user_errors
def compare_adapters(studio: cb.Studio, session: cb.Session | None, lock: threading.Lock) -> tuple[dict, dict, str]:
    """The current image captioned by the base model (adapter None) and by the active adapter, side by side.
    Adapter switches are serialised by `lock` and restored afterwards. Returns (base view, adapter view, note)."""
    session = session if isinstance(session, cb.Session) else None
    if session is None or session.array is None or session.image is None:
        raise ValueError("Upload, paste or pick an example image first.")
    predictor = studio.predictor
    prompts = session.caption.get("prompts", {}) if session.caption else {}
    kwargs = {"box": prompts.get("box"), "text": prompts.get("text"), "max_new_tokens": min(512, 4 * cb.DEFAULT_MAX_WORDS + 8)}
    if prompts.get("points"):
        kwargs["points"] = np.asarray(prompts["points"], dtype=np.float64)
        kwargs["point_labels"] = np.asarray(prompts["point_labels"], dtype=np.int64)
    with lock:
        active = predictor.adapter
        available = list(studio.model.adapters)
        if active is None:
            note = ("No LoRA adapter is active" + (f" (loaded: {', '.join(available)})" if available else
                                                   " and none is loaded")
                    + ": finetune on corrections and load the adapter to compare before / after.")
            empty = render.viewer_value(session.image, mode="caption", include_src=True, clickable=False,
                                        message="base model")
            return empty, render.viewer_value(None, mode="caption"), note
        state = predictor.set_image(session.array)
        tuned = predictor.caption(state, **kwargs)
        try:
            predictor.set_adapter(None)
            base = predictor.caption(state, **kwargs)
        finally:
            predictor.set_adapter(active)
    base_words = [w.to_dict() for w in base.words]
    tuned_words = [w.to_dict() for w in tuned.words]
    views = (render.viewer_value(session.image, mode="caption", words=base_words, clickable=False, status="done",
                                 message=f"base model: {base.text}"),
             render.viewer_value(session.image, mode="caption", words=tuned_words, clickable=False, status="done",
                                 message=f"adapter “{active}”: {tuned.text}"))
    same = base.text == tuned.text
    note = f"Base vs adapter “{active}” (greedy, same prompts)" + (": identical words." if same else ".")
    return views[0], views[1], note


# ------------------------------------------------------------------------------------------ API

@cb.user_errors
def api_save_correction(studio: cb.Studio, payload: Any) -> dict:
    """/save_correction: one JSON object — {image_sha | generation_id | parent_id, annotator, status (draft |
    submitted, default submitted), words, boxes, non_visual, timed_caption, traces, caption, comment,
    client_token} — saved through save_correction_from_editor. Returns its result."""
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
    try:
        return save_correction_from_editor(studio.store, None, payload, payload.get("status") or "submitted",
                                           payload.get("annotator"), payload.get("client_token"))
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - the store failed: the client keeps its JSON and retries
        log.exception("annotation store: /save_correction failed")
        raise gr.Error(f"the annotation store failed ({render.escape(err)}); nothing was saved — retry with the "
                       "same client_token") from err


def static_dir() -> Path:
    return Path(__file__).parent / "static"
