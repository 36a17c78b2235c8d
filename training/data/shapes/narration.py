"""A scene's Localized Narrative: the narrative text, its speech timing and the simulated mouse trace."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from training.data.shapes.world import (
    _ANNOTATORS,
    _TWIN_SEPARATION,
    MAX_NARRATIVE_WORDS,
    MAX_SENTENCE_WORDS,
    ShapeObject,
    _pick,
    reading_order,
)

# --------------------------------------------------------------------------------------------------
# Narrative
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Word:
    """A narrative word; ``object_id`` is set on the size, colour and shape words of a mention."""

    text: str
    object_id: int | None = None


_FIRST_LEADS = ("In this picture we can see", "In this image there is", "This picture shows", "I can see")
_NEXT_LEADS = ("Beside it there is", "Next to it we can see", "There is also", "We can also see")
_POSITION_LEADS = ("we can see", "there is")
_POSITIONS = {
    ("left", "top"): "at the top left", ("centre", "top"): "at the top", ("right", "top"): "at the top right",
    ("left", "middle"): "on the left", ("centre", "middle"): "in the centre", ("right", "middle"): "on the right",
    ("left", "bottom"): "at the bottom left", ("centre", "bottom"): "at the bottom",
    ("right", "bottom"): "at the bottom right",
}


def _words(text: str, object_id: int | None = None) -> list[_Word]:
    """``text`` split on whitespace, every word tagged with ``object_id``."""
    return [_Word(w, object_id) for w in text.split()]


def _position_phrase(center: Sequence[float], size: int) -> str:
    """Where a pixel point lies in a 3x3 grid of the image, e.g. "at the top left"."""
    column = ("left", "centre", "right")[min(int(3 * center[0] / size), 2)]
    row = ("top", "middle", "bottom")[min(int(3 * center[1] / size), 2)]
    return _POSITIONS[(column, row)]


def _relation_leads(previous: ShapeObject, obj: ShapeObject, size: int) -> list[str]:
    """Sentence openings for ``obj`` mentioned after ``previous``, including geometric relations."""
    leads = list(_NEXT_LEADS)
    dx, dy = obj.center[0] - previous.center[0], obj.center[1] - previous.center[1]
    far = _TWIN_SEPARATION * size
    if dx > far and dx >= abs(dy):
        leads.append("To the right there is")
    if dy > far and dy > abs(dx):
        leads.append("Below it there is")
    if -dy > far and -dy > abs(dx):
        leads.append("Above it there is")
    return leads


def _mention(obj: ShapeObject) -> list[_Word]:
    """``a <size> <colour> <shape>`` with the three content words marked with the object's id."""
    return [_Word("a"), *_words(obj.description, obj.object_id)]


def _object_sentences(
    rng: np.random.Generator, ordered: Sequence[ShapeObject], size: int, position_prob: float
) -> list[list[_Word]]:
    """Unpunctuated sentences mentioning every object once, in the given order."""
    sentences: list[list[_Word]] = []
    for i, obj in enumerate(ordered):
        phrase = _position_phrase(obj.center, size)
        suffix = _words(phrase) if rng.random() < position_prob else []
        if i > 0 and rng.random() < 0.2 and len(sentences[-1]) + 5 + len(suffix) <= MAX_SENTENCE_WORDS:
            sentences[-1] += [_Word("and"), *_mention(obj), *suffix]
            continue
        if i == 0:
            lead = _pick(rng, _FIRST_LEADS)
        elif rng.random() < 0.25:
            lead, suffix = f"{phrase[0].upper()}{phrase[1:]} {_pick(rng, _POSITION_LEADS)}", []
        else:
            lead = _pick(rng, _relation_leads(ordered[i - 1], obj, size))
        sentence = [*_words(lead), *_mention(obj)]
        if len(sentence) + len(suffix) <= MAX_SENTENCE_WORDS:
            sentence += suffix
        sentences.append(sentence)
    return sentences


def _punctuate(sentence: list[_Word]) -> list[_Word]:
    """Capitalise the first word and end the last with a full stop."""
    first, last = sentence[0], sentence[-1]
    sentence = [_Word(first.text[:1].upper() + first.text[1:], first.object_id), *sentence[1:]]
    sentence[-1] = _Word(sentence[-1].text + ".", last.object_id)
    return sentence


def _narrative(
    rng: np.random.Generator, objects: Sequence[ShapeObject], background: str, size: int
) -> tuple[list[list[_Word]], bool]:
    """The narrative's sentences (objects in reading order, optional background sentence last) and
    whether the background sentence is present."""
    ordered = reading_order(objects)
    sentences = _object_sentences(rng, ordered, size, position_prob=0.6)
    if sum(map(len, sentences)) > MAX_NARRATIVE_WORDS - MAX_SENTENCE_WORDS:
        sentences = _object_sentences(rng, ordered, size, position_prob=0.0)
    with_background = rng.random() < 0.6
    if with_background:
        sentences.append(_words(f"the background is {background}"))
    return [_punctuate(s) for s in sentences], with_background


# --------------------------------------------------------------------------------------------------
# Speech timing and mouse trace
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Annotator:
    """A simulated annotator's habits: speaking-time factor, trace noise (normalised), loops per second."""

    rate: float
    noise: float
    loops_hz: float
    trace_hz: float


_ANNOTATOR_STYLES = tuple(
    _Annotator(
        rate=float(r.uniform(0.85, 1.2)),
        noise=float(r.uniform(0.005, 0.01)),
        loops_hz=float(r.uniform(1.2, 2.2)),
        trace_hz=float(r.uniform(25.0, 30.0)),
    )
    for r in (np.random.default_rng([2024, k]) for k in range(_ANNOTATORS))
)


@dataclass(frozen=True)
class _Spoken:
    """A word with its speech interval in seconds."""

    text: str
    start: float
    end: float
    object_id: int | None


def _speak(rng: np.random.Generator, sentences: Sequence[Sequence[_Word]], style: _Annotator) -> list[_Spoken]:
    """Per-word times: duration grows with word length (~2-3 words/s), pauses between sentences."""
    spoken = []
    t = rng.uniform(0.5, 1.5)
    for sentence in sentences:
        for word in sentence:
            letters = sum(ch.isalnum() for ch in word.text)
            duration = (0.16 + 0.05 * letters) * style.rate * rng.uniform(0.85, 1.15)
            spoken.append(_Spoken(word.text, round(t, 3), round(t + duration, 3), word.object_id))
            t += duration + rng.uniform(0.02, 0.09) * style.rate
        t += rng.uniform(0.25, 0.6) * style.rate
    return spoken


_PathFn = Callable[[np.ndarray], np.ndarray]


def _wander(rng: np.random.Generator, start: np.ndarray, t0: float, amplitude: float) -> _PathFn:
    """Slow smooth drift from ``start`` (normalised (2,)) at ``t0``: two sinusoids per axis."""
    freqs = rng.uniform(0.2, 0.7, (2, 2))
    phases = rng.uniform(0, 2 * np.pi, (2, 2))
    amps = amplitude * rng.uniform(0.4, 1.0, (2, 2))

    def position(t: np.ndarray) -> np.ndarray:
        dt = (t - t0)[:, None, None]
        return start + (amps * (np.sin(2 * np.pi * freqs * dt + phases) - np.sin(phases))).sum(axis=1)

    return position


def _transit(start: np.ndarray, end: np.ndarray, t0: float, t1: float, bow: float) -> _PathFn:
    """Eased, slightly curved move from ``start`` at ``t0`` to ``end`` at ``t1`` (normalised)."""
    delta = end - start
    normal = np.array([-delta[1], delta[0]])

    def position(t: np.ndarray) -> np.ndarray:
        s = np.clip((t - t0) / max(t1 - t0, 1e-6), 0.0, 1.0)[:, None]
        return start + delta * (1 - np.cos(np.pi * s)) / 2 + normal * bow * np.sin(np.pi * s)

    return position


def _triangle_wave(u: np.ndarray) -> np.ndarray:
    """Period-1 triangle wave in [-1, 1]."""
    return 2 * np.abs(2 * (u - np.floor(u + 0.5))) - 1


def _scribble(rng: np.random.Generator, anchor: np.ndarray, radius: float, t0: float, loops_hz: float) -> _PathFn:
    """Loops or a zigzag around ``anchor`` (normalised), never farther than 0.85 ``radius`` from it
    (``radius`` = the object's inradius, so the motion stays inside the object); starts at ``anchor``."""
    rx, ry = radius * rng.uniform(0.5, 0.85, 2)
    omega = 2 * np.pi * loops_hz * rng.uniform(0.8, 1.2) * (1 if rng.random() < 0.5 else -1)
    phase = rng.uniform(0, 2 * np.pi)
    zigzag = rng.random() < 0.35

    def position(t: np.ndarray) -> np.ndarray:
        dt = t - t0
        if zigzag:
            offset = np.stack([rx * _triangle_wave(omega * dt / (2 * np.pi) + phase), ry * np.sin(0.4 * omega * dt)], 1)
            norm = np.linalg.norm(offset, axis=1, keepdims=True)
            offset *= np.minimum(1.0, 0.85 * radius / np.maximum(norm, 1e-9))
        else:
            offset = np.stack([rx * np.cos(omega * dt + phase), ry * np.sin(omega * dt + phase)], 1)
        return anchor + np.minimum(1.0, dt / 0.12)[:, None] * offset

    return position


class _PathBuilder:
    """A continuous pointer path assembled from consecutive timed pieces (normalised coordinates)."""

    def __init__(self, start: np.ndarray) -> None:
        self.starts: list[float] = []
        self.pieces: list[_PathFn] = []
        self.t = 0.0
        self.position = start

    def add(self, t1: float, piece: _PathFn) -> None:
        """Follow ``piece`` from the current time until ``t1`` (ignored if ``t1`` is not later)."""
        if t1 <= self.t:
            return
        self.starts.append(self.t)
        self.pieces.append(piece)
        self.position = piece(np.array([t1]))[0]
        self.t = t1

    def wander(self, rng: np.random.Generator, t1: float, amplitude: float = 0.02) -> None:
        """Drift gently around the current position until ``t1``."""
        self.add(t1, _wander(rng, self.position, self.t, amplitude))

    def move(self, rng: np.random.Generator, t1: float, target: np.ndarray) -> None:
        """Move to ``target`` (normalised (2,)), arriving at ``t1``."""
        self.add(t1, _transit(self.position, target, self.t, t1, bow=rng.uniform(-0.15, 0.15)))

    def leave_and_return(self, rng: np.random.Generator, t1: float) -> None:
        """Leave the image over the nearest edge and come back to the same point by ``t1``."""
        home = self.position.copy()
        outside = home.copy()
        axis = int(np.argmin(np.minimum(home, 1 - home)))
        outside[axis] = -0.08 if home[axis] < 0.5 else 1.08
        middle = self.t + (t1 - self.t) * rng.uniform(0.4, 0.6)
        self.move(rng, middle, outside)
        self.move(rng, t1, home)

    def evaluate(self, times: np.ndarray) -> np.ndarray:
        """(N, 2) positions at (N,) increasing ``times``; after the last piece the path holds still."""
        which = np.clip(np.searchsorted(np.array(self.starts), times, side="right") - 1, 0, len(self.pieces) - 1)
        positions = np.empty((len(times), 2))
        for i, piece in enumerate(self.pieces):
            chosen = which == i
            positions[chosen] = piece(np.minimum(times[chosen], self.t))
        return positions


def _mentions(spoken: Sequence[_Spoken]) -> list[tuple[int, float, float]]:
    """``(object_id, first content word start, last content word end)`` per mention, in time order."""
    result: list[tuple[int, float, float]] = []
    for word in spoken:
        if word.object_id is None:
            continue
        if result and result[-1][0] == word.object_id:
            result[-1] = (word.object_id, result[-1][1], word.end)
        else:
            result.append((word.object_id, word.start, word.end))
    return result


def _wander_until(builder: _PathBuilder, rng: np.random.Generator, t1: float, excursion: bool) -> bool:
    """Wander until ``t1``, leaving the image once in the middle if ``excursion`` and there is time.
    Returns whether the excursion happened."""
    if excursion and t1 - builder.t >= 1.6:
        start = builder.t + rng.uniform(0.2, 0.5)
        builder.wander(rng, start)
        builder.leave_and_return(rng, start + rng.uniform(0.7, 1.0))
        builder.wander(rng, t1)
        return True
    builder.wander(rng, t1)
    return False


def _trace_path(
    rng: np.random.Generator,
    spoken: Sequence[_Spoken],
    objects: Sequence[ShapeObject],
    labels: np.ndarray,
    background_start: float | None,
    style: _Annotator,
) -> tuple[_PathBuilder, float]:
    """The noiseless pointer path of a narrative and its end time (seconds).

    Before each mention the pointer wanders, then moves to the object, arriving when the first content
    word starts; it scribbles inside the object until the last content word ends.  During a background
    sentence it moves to a background pixel and wanders there.
    """
    size = labels.shape[0]
    builder = _PathBuilder(rng.uniform(0.15, 0.85, 2))
    excursion = rng.random() < 0.3
    for object_id, start, end in _mentions(spoken):
        obj = objects[object_id - 1]
        arrival = min(start - builder.t, rng.uniform(0.45, 0.9))
        excursion &= not _wander_until(builder, rng, start - arrival, excursion)
        builder.move(rng, start, np.array(obj.anchor) / size)
        builder.add(end, _scribble(rng, np.array(obj.anchor) / size, obj.inradius / size, start, style.loops_hz))
    finish = spoken[-1].end + rng.uniform(0.2, 0.6)
    if background_start is not None:
        _wander_until(builder, rng, background_start, excursion=False)
        rows, cols = np.nonzero(labels == 0)
        if rows.size:
            pick = int(rng.integers(rows.size))
            target = (np.array([cols[pick], rows[pick]]) + 0.5) / size
            builder.move(rng, min(background_start + 0.6, finish), target)
    _wander_until(builder, rng, finish, excursion)
    return builder, finish


def _sample_trace(
    rng: np.random.Generator, builder: _PathBuilder, finish: float, style: _Annotator
) -> list[list[dict[str, float]]]:
    """LN ``traces``: the path sampled at the annotator's rate with jitter and Gaussian noise; points
    where the noiseless pointer is outside the image are dropped and a new segment starts on re-entry."""
    period = 1.0 / style.trace_hz
    times = np.arange(0.0, finish, period) + rng.uniform(-0.15, 0.15, int(np.ceil(finish / period))) * period
    times = np.maximum(times, 0.0)
    path = builder.evaluate(times)
    inside = np.all((path >= 0.0) & (path <= 1.0), axis=1)
    noisy = path + rng.normal(0.0, style.noise, path.shape)
    segments: list[list[dict[str, float]]] = []
    for i in np.flatnonzero(inside):
        if not segments or not inside[i - 1]:
            segments.append([])
        segments[-1].append({"x": round(float(noisy[i, 0]), 4), "y": round(float(noisy[i, 1]), 4),
                             "t": round(float(times[i]), 3)})
    return segments


