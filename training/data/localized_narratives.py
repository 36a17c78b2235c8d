"""Localized Narratives (LN) reader with PixelLLM per-word trace targets (DESIGN §4).

Mirrors ``trace2coord`` / ``process_record`` of Scenic's
``scenic/projects/pixel_llm/tools/build_ln_tfrecord.py``:

1. all trace segments of a record are joined and the points sorted by ``t`` (stable sort);
2. ``x(t)`` and ``y(t)`` are interpolated linearly, extrapolating linearly beyond the first/last point
   (``scipy.interpolate.interp1d(..., fill_value="extrapolate")`` in Scenic);
3. 16 times are sampled uniformly over ``[start_time, end_time]`` (both ends included) of every utterance;
4. the utterance box is ``(min x, min y, max x, max y)`` of the samples and its centre is the time
   average of the samples: the trapezoidal integral over the samples divided by the duration, or the plain
   mean of the samples when the duration is below 1e-5 s (exactly Scenic's rule; for a trace that is
   linear over the utterance this equals the mean of the samples).

Two points Scenic leaves undefined are fixed here: points sharing the same ``t`` are merged into their
mean position (Scenic's interpolator divides by zero on them), and a trace whose points all share one
``t`` is constant in time.  Records whose traces hold <= 1 point in total are skipped and counted, as
Scenic does; malformed records are skipped and counted instead of crashing the reader.

All coordinates are normalised to the image (x right, y down, the LN convention) and never clipped:
LN traces may fall slightly outside [0, 1].  Boxes are ``(x0, y0, x1, y1)``.
"""

from __future__ import annotations

import codecs
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "LN_KEYS",
    "NUM_TRACE_SAMPLES",
    "LNReadStats",
    "LNSample",
    "is_text",
    "read_localized_narratives",
    "sentence_targets",
    "trace_points",
    "utterance_targets",
]

#: The exact keys of an official LN record (the official loader builds ``LocalizedNarrative(**record)``).
LN_KEYS: tuple[str, ...] = (
    "dataset_id",
    "image_id",
    "annotator_id",
    "caption",
    "timed_caption",
    "traces",
    "voice_recording",
)
#: Samples per utterance, ``flags.num_samples_per_trace`` in Scenic.
NUM_TRACE_SAMPLES = 16
#: Below this duration (seconds) the centre is the plain mean of the samples (Scenic's threshold).
_MIN_DURATION = 1e-5
_SENTENCE_END = (".", "!", "?")
_CLOSING_CHARS = "\"')]}»”’"


@dataclass
class LNSample:
    """One LN record turned into per-word PixelLLM targets.

    Attributes:
        dataset_id, image_id, annotator_id, caption: copied from the record (``annotator_id`` as ``str``).
        words: the utterances split on whitespace, in order; n words.
        word_boxes: (n, 4) float32, ``(x0, y0, x1, y1)`` normalised to the image, not clipped; every word
            inherits the box of the utterance it comes from (and every token of a word inherits the word's).
        word_centres: (n, 2) float32, ``(x, y)`` normalised time-averaged trace position of the word.
        sentences: word index ranges ``[start, end)``; a sentence ends after a word ending in ``. ! ?``
            (closing quotes/brackets ignored) and the last sentence ends at the last word.
    """

    dataset_id: str
    image_id: str
    annotator_id: str
    caption: str
    words: list[str]
    word_boxes: np.ndarray
    word_centres: np.ndarray
    sentences: list[tuple[int, int]]


@dataclass
class LNReadStats:
    """Counts of one :func:`read_localized_narratives` call (blank lines are not records)."""

    records: int = 0
    kept: int = 0
    skipped_no_trace: int = 0
    skipped_malformed: int = 0


def float_or_inf(value: Any) -> float:
    """``float(value)``, but an integer beyond float's range (JSON integers have no size limit) is +-inf instead of
    an OverflowError, so that callers refuse it with their other non-finite values."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


def _number(value: Any, what: str) -> float:
    """``value`` as a finite float; ``ValueError`` naming ``what`` otherwise (bools are rejected)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {value!r}")
    result = float_or_inf(value)
    if not math.isfinite(result):  # an int is non-finite only beyond float's range: its digits, not all of them
        got = f"an integer of {len(str(value))} digits" if isinstance(value, int) else repr(value)
        raise ValueError(f"{what} must be finite, got {got}")
    return result


def is_text(value: Any) -> bool:
    """``value`` is a string of valid Unicode: json reads the escape ``"\\ud800"`` as an unpaired surrogate, which
    the tokenizer refuses with a TypeError (in the middle of training)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def trace_points(traces: Sequence[Sequence[Mapping[str, Any]]]) -> np.ndarray:
    """Join LN trace segments into one array of points.

    Args:
        traces: LN ``traces``: a list of segments, each a list of ``{"x", "y", "t"}`` dicts
            (x, y normalised to the image, t in seconds).

    Returns:
        (P, 3) float64 array of ``(t, x, y)`` in segment order (not sorted), P may be 0.

    Raises:
        ValueError: if the structure is not a list of lists of points with numeric x, y, t.
    """
    if not isinstance(traces, list):
        raise ValueError(f"traces must be a list of segments, got {type(traces).__name__}")
    rows: list[tuple[float, float, float]] = []
    for s, segment in enumerate(traces):
        if not isinstance(segment, list):
            raise ValueError(f"traces[{s}] must be a list of points, got {type(segment).__name__}")
        for p, point in enumerate(segment):
            if not isinstance(point, Mapping):
                raise ValueError(f"traces[{s}][{p}] must be an object with x, y, t")
            try:
                rows.append(tuple(_number(point[k], f"traces[{s}][{p}].{k}") for k in ("t", "x", "y")))
            except KeyError as err:
                raise ValueError(f"traces[{s}][{p}] lacks the key {err}") from None
    return np.asarray(rows, dtype=np.float64).reshape(-1, 3)


def _parse_timed_caption(timed_caption: Any) -> list[tuple[str, float, float]]:
    """Validate LN ``timed_caption`` into ``(utterance, start_time, end_time)`` tuples (seconds)."""
    if not isinstance(timed_caption, list):
        raise ValueError(f"timed_caption must be a list, got {type(timed_caption).__name__}")
    result = []
    for i, item in enumerate(timed_caption):
        if not isinstance(item, Mapping):
            raise ValueError(f"timed_caption[{i}] must be an object")
        try:
            utterance, start, end = item["utterance"], item["start_time"], item["end_time"]
        except KeyError as err:
            raise ValueError(f"timed_caption[{i}] lacks the key {err}") from None
        if not is_text(utterance):
            raise ValueError(f"timed_caption[{i}].utterance must be a string of valid Unicode, got {utterance!r}")
        result.append((utterance, _number(start, f"timed_caption[{i}].start_time"),
                       _number(end, f"timed_caption[{i}].end_time")))
    return result


def _time_ordered_trace(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort (P, 3) ``(t, x, y)`` points by t (stable) and merge equal t into their mean position.

    Returns:
        times: (K,) strictly increasing seconds; positions: (K, 2) normalised ``(x, y)``.
    """
    ordered = points[np.argsort(points[:, 0], kind="stable")]
    times, first, counts = np.unique(ordered[:, 0], return_index=True, return_counts=True)
    sums = np.add.reduceat(ordered[:, 1:], first, axis=0)
    return times, sums / counts[:, None]


def _interpolate(query: np.ndarray, times: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """Piecewise-linear ``positions(times)`` at ``query`` (Q,), extrapolating the end segments linearly.

    Args:
        query: (Q,) seconds; times: (K,) strictly increasing seconds; positions: (K, 2).

    Returns:
        (Q, 2) positions; a single-time trace (K == 1) is constant.
    """
    if len(times) == 1:
        return np.repeat(positions, len(query), axis=0)
    lo = np.clip(np.searchsorted(times, query, side="right") - 1, 0, len(times) - 2)
    t0, t1 = times[lo], times[lo + 1]
    weight = ((query - t0) / (t1 - t0))[:, None]
    return positions[lo] + weight * (positions[lo + 1] - positions[lo])


def _time_average(samples: np.ndarray, start: float, end: float) -> np.ndarray:
    """Scenic's centre of (S, 2) samples taken uniformly over ``[start, end]``.

    ``trapz(samples, t) / (end - start)``, which for a uniform grid is the sample mean with half weight on
    the two end samples; the plain mean when end - start is below 1e-5 s (also when it is negative).
    """
    if end - start < _MIN_DURATION or len(samples) < 2:  # signed, as Scenic: a reversed utterance too
        return samples.mean(axis=0)
    inner = samples.sum(axis=0) - 0.5 * (samples[0] + samples[-1])
    return inner / (len(samples) - 1)


def utterance_targets(
    traces: Sequence[Sequence[Mapping[str, Any]]],
    timed_caption: Sequence[Mapping[str, Any]],
    num_samples: int = NUM_TRACE_SAMPLES,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-utterance box and centre of an LN trace (Scenic ``trace2coord``).

    Args:
        traces: LN ``traces`` (segments of ``{"x", "y", "t"}``; normalised image coordinates, seconds).
            Segments are joined and sorted by t; they may interleave in time.
        timed_caption: LN ``timed_caption`` (``{"utterance", "start_time", "end_time"}``, seconds).
        num_samples: samples per utterance over ``[start_time, end_time]`` inclusive (Scenic: 16).

    Returns:
        boxes: (U, 4) float64 ``(x0, y0, x1, y1)`` normalised, not clipped (a point box for a
            zero-duration utterance); centres: (U, 2) float64 ``(x, y)`` time-averaged position.

    Raises:
        ValueError: on malformed input, ``num_samples < 1`` or fewer than 2 trace points.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    points = trace_points(list(traces))
    return _targets_from_points(points, _parse_timed_caption(list(timed_caption)), num_samples)


def _targets_from_points(
    points: np.ndarray, utterances: Sequence[tuple[str, float, float]], num_samples: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`utterance_targets` on validated (P, 3) ``(t, x, y)`` points and parsed utterances."""
    if len(points) <= 1:
        raise ValueError(f"a trace needs at least 2 points to give targets, got {len(points)}")
    times, positions = _time_ordered_trace(points)
    boxes = np.zeros((len(utterances), 4))
    centres = np.zeros((len(utterances), 2))
    for i, (_, start, end) in enumerate(utterances):
        samples = _interpolate(np.linspace(start, end, num_samples), times, positions)
        boxes[i] = (*samples.min(axis=0), *samples.max(axis=0))
        centres[i] = _time_average(samples, start, end)
    return boxes, centres


def _sentence_ranges(words: Sequence[str]) -> list[tuple[int, int]]:
    """``[start, end)`` word ranges; a sentence ends after a word ending in . ! ? (closers stripped)."""
    ranges, start = [], 0
    for i, word in enumerate(words):
        if word.rstrip(_CLOSING_CHARS).endswith(_SENTENCE_END):
            ranges.append((start, i + 1))
            start = i + 1
    if start < len(words):
        ranges.append((start, len(words)))
    return ranges


def _sample_from_record(record: Mapping[str, Any], points: np.ndarray) -> LNSample:
    """Build an :class:`LNSample` from a validated record and its (P >= 2, 3) trace points."""
    utterances = _parse_timed_caption(record["timed_caption"])
    with np.errstate(over="ignore", invalid="ignore"):  # overflowing targets are refused below
        boxes, centres = _targets_from_points(points, utterances, NUM_TRACE_SAMPLES)
        word_boxes, word_centres = boxes.astype(np.float32), centres.astype(np.float32)
    words: list[str] = []
    rows: list[int] = []
    for u, (utterance, _, _) in enumerate(utterances):
        for word in utterance.split():
            words.append(word)
            rows.append(u)
    index = np.asarray(rows, dtype=np.int64)
    word_boxes, word_centres = word_boxes[index].reshape(-1, 4), word_centres[index].reshape(-1, 2)
    if not (np.isfinite(word_boxes).all() and np.isfinite(word_centres).all()):
        # finite but extreme times or positions (t spanning +-1e308, x = 1e39 beyond float32) overflow to inf/NaN
        raise ValueError("the trace gives non-finite word targets (extreme times or coordinates)")
    for key in ("dataset_id", "image_id", "caption"):
        if not is_text(record[key]):
            raise ValueError(f"{key} must be a string of valid Unicode, got {record[key]!r}")
    return LNSample(
        dataset_id=record["dataset_id"],
        image_id=record["image_id"],
        annotator_id=str(record["annotator_id"]),
        caption=record["caption"],
        words=words,
        word_boxes=word_boxes,
        word_centres=word_centres,
        sentences=_sentence_ranges(words),
    )


def _parse_line(line: bytes) -> tuple[dict[str, Any], np.ndarray]:
    """Decode one JSONL line into a record with all LN keys and its trace points (ValueError if not)."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:  # RecursionError: nested too deep
        raise ValueError(f"not a JSON line: {err}") from None
    if not isinstance(record, dict):
        raise ValueError("an LN line must be a JSON object")
    missing = [key for key in LN_KEYS if key not in record]
    if missing:
        raise ValueError(f"missing LN keys {missing}")
    return record, trace_points(record["traces"])


def read_localized_narratives(path: str | Path) -> tuple[list[LNSample], LNReadStats]:
    """Read an LN JSONL file into per-word targets, skipping and counting unusable records.

    Args:
        path: JSONL file, one official LN record a line (the seven :data:`LN_KEYS`; extra keys ignored).

    Returns:
        the kept samples in file order, and the counts. A record with <= 1 trace point in total is
        ``skipped_no_trace``; a bad JSON line, a missing key, text that is not valid Unicode (an unpaired
        surrogate escape), a non-numeric/non-finite value (an integer beyond float's range too) or a trace whose
        word targets overflow to inf/NaN is ``skipped_malformed``.
        Blank lines and a UTF-8 byte order mark at the start of the file are ignored.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
    """
    samples: list[LNSample] = []
    stats = LNReadStats()
    with open(path, "rb") as handle:
        for number, line in enumerate(handle):
            if number == 0:  # a file saved with a UTF-8 byte order mark (Windows editors): its first record is good
                line = line.removeprefix(codecs.BOM_UTF8)
            if not line.strip():
                continue
            stats.records += 1
            try:
                record, points = _parse_line(line)
                if len(points) <= 1:
                    stats.skipped_no_trace += 1
                    continue
                samples.append(_sample_from_record(record, points))
            except ValueError:
                stats.skipped_malformed += 1
                continue
            stats.kept += 1
    return samples, stats


def sentence_targets(sample: LNSample) -> list[tuple[str, np.ndarray]]:
    """Each sentence of ``sample`` as its own target (PixelLLM stage 2: "each sentence a separate target").

    Returns:
        ``(text, boxes)`` per sentence: the sentence's words joined by single spaces and their
        (k, 4) float32 normalised ``(x0, y0, x1, y1)`` boxes.
    """
    return [(" ".join(sample.words[s:e]), sample.word_boxes[s:e]) for s, e in sample.sentences]
