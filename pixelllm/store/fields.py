"""Input checks of the annotation store: each takes what a caller passed and returns the canonical value that is
stored, or raises ``ValueError`` with a message a user understands; plus ``change_summary`` (what an edit changed)
and the JSON (de)coding of rows. Internal to ``pixelllm.store``; plain Python, no torch.
"""

from __future__ import annotations

import datetime
import difflib
import json
import math
import numbers
import re
from collections.abc import Sequence
from typing import Any

BOX_MOVE_TOLERANCE_PX = 0.5  # a box counts as moved in change_summary when a corner moved by more than this




def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _dumps(value: Any, name: str) -> str:
    try:
        return json.dumps(value, allow_nan=False, ensure_ascii=False, separators=(",", ":"),
                          default=_json_default)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be JSON-serialisable without NaN or infinity: {exc}") from exc


def _text(value: Any, name: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise ValueError(f"{name} must not be empty")
    return value


def _opt_text(value: Any, name: str, *, allow_empty: bool = False) -> str | None:
    return None if value is None else _text(value, name, allow_empty=allow_empty)


def _name(value: Any, name: str) -> str:
    return _text(value, name).strip()


#: SQLite's INTEGER is 64-bit signed: a larger Python int would raise OverflowError inside sqlite3.
SQLITE_MAX_INT = 2**63 - 1


def _row_id(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 1 <= value <= SQLITE_MAX_INT:
        raise ValueError(f"{name} must be a positive integer id, got {value!r}")
    return int(value)


def _opt_row_id(value: Any, name: str) -> int | None:
    return None if value is None else _row_id(value, name)


def _count(value: Any, name: str, *, low: int = 0, high: int | None = None) -> int:
    high = SQLITE_MAX_INT if high is None else min(high, SQLITE_MAX_INT)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not low <= value <= high:
        bound = f"in [{low}, {high}]" if high < SQLITE_MAX_INT else f">= {low}"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    return int(value)


def _sha(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value):
        raise ValueError(f"image_sha must be a 64-character lowercase sha256 hex digest, got {value!r}")
    return value


def _number(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _as_list(value: Any, name: str) -> list:
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):  # numpy arrays
        value = value.tolist()
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple)):
        raise ValueError(f"{name} must be a list, got {type(value).__name__}")
    return list(value)


def _choice(value: Any, name: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _choices(value: Any, name: str, allowed: Sequence[str]) -> list[str]:
    values = [value] if isinstance(value, str) else _as_list(value, name)
    if not values:
        raise ValueError(f"{name} must not be empty")
    return [_choice(v, name, allowed) for v in values]


def _words(value: Any, name: str = "words") -> list[str]:
    words = _as_list(value, name)
    for i, word in enumerate(words):
        if not isinstance(word, str) or not word.strip():
            raise ValueError(f"{name}[{i}] must be a non-empty string, got {word!r}")
    return words


def _boxes(value: Any, name: str = "boxes") -> list[list[float]]:
    boxes = []
    for i, box in enumerate(_as_list(value, name)):
        coords = _as_list(box, f"{name}[{i}]")
        if len(coords) != 4:
            raise ValueError(f"{name}[{i}] must be [x0, y0, x1, y1] in image pixels, got {box!r}")
        x0, y0, x1, y1 = (_number(c, f"{name}[{i}]") for c in coords)
        if x1 < x0 or y1 < y0:
            raise ValueError(f"{name}[{i}] must have x0 <= x1 and y0 <= y1 (XYXY), got {coords}")
        boxes.append([x0, y0, x1, y1])
    return boxes


def _timed_caption(value: Any) -> list[dict[str, Any]]:
    items = []
    for i, item in enumerate(_as_list(value, "timed_caption")):
        if not isinstance(item, dict) or set(item) != {"utterance", "start_time", "end_time"}:
            raise ValueError(f"timed_caption[{i}] must be {{utterance, start_time, end_time}}, got {item!r}")
        start = _number(item["start_time"], f"timed_caption[{i}].start_time")
        end = _number(item["end_time"], f"timed_caption[{i}].end_time")
        if end < start:
            raise ValueError(f"timed_caption[{i}] ends before it starts ({start} > {end})")
        utterance = _text(item["utterance"], f"timed_caption[{i}].utterance", allow_empty=True)
        items.append({"utterance": utterance, "start_time": start, "end_time": end})
    return items


def _traces(value: Any) -> list[list[dict[str, float]]]:
    segments = []
    for s, segment in enumerate(_as_list(value, "traces")):
        points = []
        for p, point in enumerate(_as_list(segment, f"traces[{s}]")):
            if not isinstance(point, dict) or set(point) != {"x", "y", "t"}:
                raise ValueError(f"traces[{s}][{p}] must be {{x, y, t}}, got {point!r}")
            points.append({k: _number(point[k], f"traces[{s}][{p}].{k}") for k in ("x", "y", "t")})
        segments.append(points)
    return segments


def _non_visual(value: Any, num_words: int) -> list[int]:
    indices = _as_list(value, "non_visual")
    for i, index in enumerate(indices):
        if isinstance(index, bool) or not isinstance(index, numbers.Integral) or not 0 <= index < num_words:
            raise ValueError(f"non_visual[{i}] = {index!r} is not a word index in [0, {num_words})")
    if len(set(indices)) != len(indices):
        raise ValueError("non_visual has repeated word indices")
    return sorted(int(i) for i in indices)


def _content(caption: Any, words: Any, boxes: Any, timed_caption: Any, traces: Any, non_visual: Any) -> dict:
    """Validate and canonicalise the editable fields of a correction."""
    content = {
        "caption": _text(caption, "caption", allow_empty=True),
        "words": _words(words),
        "boxes": _boxes(boxes),
        "timed_caption": _timed_caption(timed_caption),
        "traces": _traces(traces),
    }
    n = len(content["words"])
    if len(content["boxes"]) != n:
        raise ValueError(f"boxes must have one box per word: {len(content['boxes'])} boxes for {n} words")
    if content["timed_caption"] and len(content["timed_caption"]) != n:
        raise ValueError(f"timed_caption must have one entry per word (or none): "
                         f"{len(content['timed_caption'])} entries for {n} words")
    content["non_visual"] = _non_visual(non_visual, n)
    return content


def change_summary(old: dict[str, Any] | None, new: dict[str, Any], *, against: str | None = None,
                   against_id: int | None = None) -> dict[str, Any]:
    """What changed from ``old`` (a parent correction, a generation's output, or nothing) to ``new``.

    Words are aligned with ``difflib``: a replaced run counts as edits (plus inserts/deletes for the length
    difference); ``boxes_moved`` lists new word indices whose word is unchanged but whose box moved by more
    than ``BOX_MOVE_TOLERANCE_PX``; ``ops`` are the non-equal opcodes ``[tag, i0, i1, j0, j1]``.
    """
    old = old or {}
    old_words, new_words = old.get("words", []), new["words"]
    old_boxes, new_boxes = old.get("boxes", []), new["boxes"]
    edited = inserted = deleted = 0
    ops, moved = [], []
    matcher = difflib.SequenceMatcher(a=old_words, b=new_words, autojunk=False)
    for tag, i0, i1, j0, j1 in matcher.get_opcodes():
        if tag == "equal":
            for k in range(i1 - i0):
                i, j = i0 + k, j0 + k
                if i < len(old_boxes) and j < len(new_boxes) and max(
                    abs(a - b) for a, b in zip(old_boxes[i], new_boxes[j])
                ) > BOX_MOVE_TOLERANCE_PX:
                    moved.append(j)
            continue
        ops.append([tag, i0, i1, j0, j1])
        edited += min(i1 - i0, j1 - j0)
        inserted += max((j1 - j0) - (i1 - i0), 0)
        deleted += max((i1 - i0) - (j1 - j0), 0)
    old_status, new_status = old.get("status"), new.get("status")
    return {
        "against": against,
        "against_id": against_id,
        "words": {"edited": edited, "inserted": inserted, "deleted": deleted, "ops": ops},
        "boxes_moved": moved,
        "caption_changed": old.get("caption", "") != new["caption"],
        "timed_caption_changed": old.get("timed_caption", []) != new["timed_caption"],
        "trace_rerecorded": old.get("traces", []) != new["traces"],
        "non_visual_changed": old.get("non_visual", []) != new["non_visual"],
        "status": None if old_status == new_status else [old_status, new_status],
    }


def _decode(row: dict[str, Any] | None, json_columns: Sequence[str]) -> dict[str, Any] | None:
    if row is None:
        return None
    for column in json_columns:
        if row.get(column) is not None:
            row[column] = json.loads(row[column])
    if "is_head" in row:
        row["is_head"] = bool(row["is_head"])
    return row

