"""The checks that turn what the browser (or the `/save_correction` API) sent into the Annotate tab's canonical
document (`normalise_doc`, `check_annotator`, the size limits `MAX_WORDS`, `MAX_TRACE_POINTS`, ...), and the LN
trace geometry the boxes of a recorded trace follow (`boxes_from_trace`, `hold_trace_ends`, `trace_point_count`).
Plain data, no Gradio; `annotate_doc.py` holds the editor state and its edits, and re-exports these names.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

MAX_WORDS = 512
MAX_WORD_CHARS = 200
MAX_ANNOTATOR_CHARS = 64
MAX_TRACE_POINTS = 50_000
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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
    """XYXY pixels of the stored image: corners sorted, clipped to the image (a zero-area box is allowed: a point).
    A corner further outside than 2 % of the image side (at least 2 px) is refused, not clipped: such a box is
    in another frame (e.g. the as-sent pixels of an image the store keeps downscaled), and clipping it would save
    a wrong box as ground truth."""
    if not isinstance(value, (list, tuple)) or len(value) != 4:
        raise ValueError(f"{name} must be [x0, y0, x1, y1] in image pixels, got {value!r}")
    x0, y0, x1, y1 = (_finite(v, name) for v in value)
    slack_x, slack_y = max(2.0, 0.02 * width), max(2.0, 0.02 * height)
    if min(x0, x1) < -slack_x or max(x0, x1) > width + slack_x or min(y0, y1) < -slack_y \
            or max(y0, y1) > height + slack_y:
        raise ValueError(f"{name} {[x0, y0, x1, y1]} lies outside the stored image ({width}x{height} pixels): "
                         "corrections use the stored image's pixels (an image larger than 2048 px is stored "
                         "downscaled; docs/annotate.md)")
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
        total += len(segment)
        if total > MAX_TRACE_POINTS:  # counted before any point is read: an oversized trace costs nothing
            raise ValueError(f"the trace has more than {MAX_TRACE_POINTS} points; that is the limit")
        points = []
        for p, point in enumerate(segment):
            if not isinstance(point, Mapping) or not {"x", "y", "t"} <= set(point):
                raise ValueError(f"traces[{s}][{p}] must be {{x, y, t}}, got {point!r}")
            x, y, t = (_finite(point[k], f"traces[{s}][{p}].{k}") for k in ("x", "y", "t"))
            if not (-1.0 <= x <= 2.0 and -1.0 <= y <= 2.0):
                raise ValueError(f"traces[{s}][{p}] is far outside the image: x, y are normalised to [0, 1]")
            points.append({"x": x, "y": y, "t": t})
        if points:
            segments.append(points)
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


def hold_trace_ends(traces: list[list[dict]], timed_caption: Sequence[Mapping]) -> list[list[dict]]:
    """A recording whose first word starts before its first captured point (the clock starts at the key press,
    the first pointer event comes a moment later), or whose last word ends after its last point, gets that first
    (last) point repeated at the word's start (end): the pointer did not move outside the recording. The LN rule
    then interpolates within it; extrapolating the first fast movement backwards put a word's box hundreds of
    pixels off the image. Traces already covering the words, or of fewer than 2 points (not a trace to derive
    boxes from), come back unchanged."""
    if trace_point_count(traces) < 2 or not timed_caption:
        return traces
    where = [(p["t"], s, p) for s, segment in enumerate(traces) for p in segment]
    (t_first, s_first, first), (t_last, s_last, last) = min(where, key=lambda w: w[0]), max(where, key=lambda w: w[0])
    start = min(float(w["start_time"]) for w in timed_caption)
    end = max(float(w["end_time"]) for w in timed_caption)
    if start >= t_first and end <= t_last:
        return traces  # the same object: versions of a document keep sharing it
    out = [list(segment) for segment in traces]
    if start < t_first:
        out[s_first].insert(0, {"x": first["x"], "y": first["y"], "t": start})
    if end > t_last:
        out[s_last].append({"x": last["x"], "y": last["y"], "t": end})
    return out


def _flag(value: Any, what: str) -> bool:
    """A yes/no from JSON: true, false or absent (null). Anything else is refused: the string "false" is truthy, and
    it marked a word non-visual."""
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false, got {value!r}")
    return value


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
        non_visual = [i for i, w in enumerate(words) if _flag(w.get("non_visual"), f"words[{i}].non_visual")]
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
    traces = hold_trace_ends(traces, timed)
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


def doc_caption(doc: dict, given: Any = None) -> str:
    if isinstance(given, str) and given.strip():
        return " ".join(given.split())
    if doc.get("task", "caption") != "caption":
        return ""
    return " ".join(w["text"] for w in doc["words"])
