"""The procedural "Shapes world" (DESIGN §3): images, instance masks and LN / referring / dense files.

Every image holds 1-6 flat-coloured objects (size x colour x shape) on a pale background.  Each image
gets a Localized Narratives record whose narrative mentions every object once, in reading order, with
all three attributes ("a small blue star"), spoken at a human rate, and a mouse trace that scribbles
inside each object while its three content words are spoken; plus referring expressions that are
unique within the image and one dense caption per object.  The formats are documented in
``docs/data_formats.md``.

Coordinates: pixels of the image, x right, y down, pixel ``(c, r)`` covering ``[c, c+1) x [r, r+1)``;
boxes ``(x0, y0, x1, y1)`` with x1/y1 exclusive.  LN traces are normalised to the image (pixels / size).
Everything is a pure function of ``(seed, index, size, world, holdout_only)``: the image's RNG is
``np.random.default_rng([seed, index, world_code, holdout_code])``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

from training.data.localized_narratives import LN_KEYS

__all__ = [
    "ALL_SHAPES",
    "BACKGROUND_COLORS",
    "COLORS",
    "DATASET_ID",
    "HELD_OUT",
    "SHAPES",
    "SHIFT_SHAPE",
    "SIZES",
    "WORLDS",
    "ShapeObject",
    "ShapesScene",
    "ShapesSplit",
    "SplitSummary",
    "generate_scene",
    "generate_split",
    "load_image",
    "load_instance_map",
    "load_jsonl",
    "load_split",
    "main",
    "parse_mentions",
    "reading_order",
]

# --------------------------------------------------------------------------------------------------
# Vocabulary and world rules
# --------------------------------------------------------------------------------------------------

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "hexagon")
#: The distribution-shift shape: only in ``world="shift"``, where every image holds at least one.
SHIFT_SHAPE = "cross"
ALL_SHAPES: tuple[str, ...] = SHAPES + (SHIFT_SHAPE,)
#: Object colours (saturated; each object jitters every channel by at most ``_COLOR_JITTER``).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (235, 200, 30),
    "purple": (135, 60, 185),
    "orange": (245, 135, 30),
}
#: Object diameter range as a fraction of the image side (the shape's unit-circle scale).
SIZES: dict[str, tuple[float, float]] = {"small": (0.12, 0.18), "large": (0.26, 0.36)}
#: The held-out (colour, shape) combination, any size: never generated unless ``holdout_only``.
HELD_OUT: tuple[str, str] = ("green", "triangle")
WORLDS: tuple[str, ...] = ("standard", "shift")
#: Pale, desaturated background colours (all channels >= 200), never confusable with ``COLORS``.
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "white": (248, 248, 246),
    "light grey": (222, 222, 222),
    "cream": (246, 240, 220),
    "beige": (232, 222, 200),
    "pale pink": (246, 224, 228),
    "lavender": (230, 226, 245),
    "mint": (222, 242, 230),
}
DATASET_ID = "shapes"

MAX_OBJECTS = 6
MAX_SAME_TRIPLE = 2
MIN_VISIBLE_FRACTION = 0.6  # of the object's own pixels
MIN_BOX_FRACTION = 0.1  # visible pixels / area of the object's full box
MAX_SENTENCE_WORDS = 13
MAX_NARRATIVE_WORDS = 70

_COLOR_JITTER = 8
_ROTATION_JITTER_DEG = 8.0
_MAX_PLACEMENT_ATTEMPTS = 60
_MAX_SCENE_ATTEMPTS = 20
_MIN_INRADIUS_KEPT = 0.45  # visible inradius / full inradius of an occluded object
_TWIN_SEPARATION = 0.15  # min centre separation (fraction of the side) of two identical triples
_POSITION_SEPARATION = 0.08  # min separation for a positional referring expression
_ANNOTATORS = 10
_PNG_LEVEL = 1  # zlib level: fast writes; files stay lossless and byte-deterministic
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def _regular_polygon(n: int, radius: float, phase: float) -> np.ndarray:
    """(n, 2) vertices of a regular n-gon of circumradius ``radius``, first vertex at angle ``phase``."""
    angles = phase + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(points: int = 5, outer: float = 1.1, inner: float = 0.47) -> np.ndarray:
    """(2*points, 2) vertices of an upright star."""
    tips = _regular_polygon(points, outer, -np.pi / 2)
    notches = _regular_polygon(points, inner, -np.pi / 2 + np.pi / points)
    return np.stack([tips, notches], axis=1).reshape(-1, 2)


def _cross(arm: float = 1.0, half_width: float = 0.34) -> np.ndarray:
    """(12, 2) vertices of a plus-shaped cross."""
    a, w = arm, half_width
    return np.array([[-w, -a], [w, -a], [w, -w], [a, -w], [a, w], [w, w],
                     [w, a], [-w, a], [-w, w], [-a, w], [-a, -w], [-w, -w]], dtype=float)


#: Unit shapes: vertices in units of the object radius, y down, roughly filling the unit disc.
UNIT_POLYGONS: dict[str, np.ndarray] = {
    "circle": _regular_polygon(48, 1.0, 0.0),
    "square": np.array([[-0.82, -0.82], [0.82, -0.82], [0.82, 0.82], [-0.82, 0.82]]),
    "triangle": _regular_polygon(3, 1.1, -np.pi / 2) + np.array([0.0, 0.2]),
    "star": _star(),
    "diamond": np.array([[0.0, -1.1], [0.75, 0.0], [0.0, 1.1], [-0.75, 0.0]]),
    "hexagon": _regular_polygon(6, 1.0, 0.0),
    "cross": _cross(),
}

# --------------------------------------------------------------------------------------------------
# Scene objects and placement
# --------------------------------------------------------------------------------------------------


@dataclass
class ShapeObject:
    """One object of a scene (pixel coordinates, see the module docstring).

    ``footprint`` is the (H, W) bool full shape before occlusion; ``box``, ``center`` (mean of the
    visible pixel centres, rounded to 0.01 px) and ``area`` (pixel count) describe the visible part;
    ``anchor`` is the visible point deepest inside the object and ``inradius`` its distance to the
    object's edge in pixels (where the simulated annotator scribbles).
    """

    object_id: int
    shape: str
    color: str
    size: str
    rgb: tuple[int, int, int]
    footprint: np.ndarray
    box: tuple[int, int, int, int] = (0, 0, 0, 0)
    center: tuple[float, float] = (0.0, 0.0)
    area: int = 0
    anchor: tuple[float, float] = (0.0, 0.0)
    inradius: float = 0.0

    @property
    def triple(self) -> tuple[str, str, str]:
        """``(size, colour, shape)``."""
        return (self.size, self.color, self.shape)

    @property
    def description(self) -> str:
        """``"<size> <colour> <shape>"``, e.g. ``"large red circle"`` (the dense caption)."""
        return " ".join(self.triple)


def _rasterize(polygon: np.ndarray, size: int) -> np.ndarray:
    """(size, size) bool pixels of a (V, 2) pixel polygon, drawn by PIL without antialiasing."""
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).polygon([tuple(p) for p in polygon.tolist()], fill=1)
    return np.asarray(canvas, dtype=bool)


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight box ``(x0, y0, x1, y1)`` of a non-empty (H, W) bool mask, x1/y1 exclusive."""
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def _deepest_point(mask: np.ndarray) -> tuple[tuple[float, float], float]:
    """Point of a non-empty (H, W) bool mask farthest from its outside: ``((x, y) px, distance px)``."""
    c0, r0, c1, r1 = _bbox(mask)
    crop = np.pad(mask[r0:r1, c0:c1], 1)
    distance = ndimage.distance_transform_edt(crop)
    r, c = np.unravel_index(int(np.argmax(distance)), distance.shape)
    return (float(c0 + c - 1) + 0.5, float(r0 + r - 1) + 0.5), float(distance[r, c])


@dataclass
class _Candidate:
    """A sampled, not yet accepted object: triple, colour, placement centre (px) and footprint."""

    triple: tuple[str, str, str]
    rgb: tuple[int, int, int]
    center: np.ndarray
    footprint: np.ndarray


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    """One element of ``options`` uniformly."""
    return options[int(rng.integers(len(options)))]


def _sample_triple(
    rng: np.random.Generator, shapes: Sequence[str], forced: tuple[str | None, str] | None, small: bool
) -> tuple[str, str, str]:
    """A ``(size, colour, shape)``; ``forced`` fixes ``(colour or None, shape)``; never the held-out pair
    unless forced."""
    size = "small" if small else _pick(rng, list(SIZES))
    if forced is not None:
        return size, forced[0] or _pick(rng, list(COLORS)), forced[1]
    while True:
        color, shape = _pick(rng, list(COLORS)), _pick(rng, shapes)
        if (color, shape) != HELD_OUT:
            return size, color, shape


def _sample_candidate(
    rng: np.random.Generator, triple: tuple[str, str, str], image_size: int
) -> _Candidate:
    """Random scale, rotation and position of ``triple`` fully inside the image."""
    size, color, shape = triple
    radius = rng.uniform(*SIZES[size]) * image_size / 2
    angle = 0.0 if shape == "circle" else math.radians(rng.uniform(-1, 1) * _ROTATION_JITTER_DEG)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    offsets = UNIT_POLYGONS[shape] @ rotation.T * radius
    low = -offsets.min(axis=0) + 1
    high = image_size - 1 - offsets.max(axis=0)
    center = rng.uniform(low, high)
    rgb = np.clip(np.array(COLORS[color]) + rng.integers(-_COLOR_JITTER, _COLOR_JITTER + 1, 3), 0, 255)
    return _Candidate(triple, tuple(int(v) for v in rgb), center, _rasterize(center + offsets, image_size))


class _Placement:
    """Objects accepted so far, their instance map and the checks a new object must pass."""

    def __init__(self, image_size: int) -> None:
        self.size = image_size
        self.labels = np.zeros((image_size, image_size), dtype=np.uint8)
        self.objects: list[ShapeObject] = []
        self._centers: list[np.ndarray] = []
        self._full_area: list[int] = []
        self._full_box_area: list[int] = []
        self._full_inradius: list[float] = []

    def count(self, triple: tuple[str, str, str]) -> int:
        """How many accepted objects have ``triple``."""
        return sum(o.triple == triple for o in self.objects)

    def fits(self, candidate: _Candidate) -> bool:
        """Whether ``candidate``, drawn on top, keeps every rule of the world (DESIGN §3)."""
        for obj, center in zip(self.objects, self._centers):
            if obj.triple == candidate.triple:
                if np.abs(center - candidate.center).max() < _TWIN_SEPARATION * self.size:
                    return False
        labels = np.where(candidate.footprint, len(self.objects) + 1, self.labels)
        for i, obj in enumerate(self.objects):
            if not (obj.footprint & candidate.footprint).any():
                continue
            visible = labels == obj.object_id
            area = int(visible.sum())
            if area < MIN_VISIBLE_FRACTION * self._full_area[i] or area < MIN_BOX_FRACTION * self._full_box_area[i]:
                return False
            if _deepest_point(visible)[1] < _MIN_INRADIUS_KEPT * self._full_inradius[i]:
                return False
        return True

    def add(self, candidate: _Candidate) -> None:
        """Accept ``candidate`` as the next object (drawn over the others)."""
        object_id = len(self.objects) + 1
        size, color, shape = candidate.triple
        self.objects.append(ShapeObject(object_id, shape, color, size, candidate.rgb, candidate.footprint))
        self.labels[candidate.footprint] = object_id
        self._centers.append(candidate.center)
        self._full_area.append(int(candidate.footprint.sum()))
        x0, y0, x1, y1 = _bbox(candidate.footprint)
        self._full_box_area.append((x1 - x0) * (y1 - y0))
        self._full_inradius.append(_deepest_point(candidate.footprint)[1])

    def try_add(
        self, rng: np.random.Generator, shapes: Sequence[str], forced: tuple[str | None, str] | None
    ) -> bool:
        """Sample and add one object within the attempt budget (late attempts use small objects)."""
        for attempt in range(_MAX_PLACEMENT_ATTEMPTS):
            triple = _sample_triple(rng, shapes, forced, small=attempt >= _MAX_PLACEMENT_ATTEMPTS // 2)
            if self.count(triple) >= MAX_SAME_TRIPLE:
                continue
            candidate = _sample_candidate(rng, triple, self.size)
            if self.fits(candidate):
                self.add(candidate)
                return True
        return False

    def finalize(self) -> list[ShapeObject]:
        """Fill the visible statistics of every object and return them (by object_id)."""
        for obj in self.objects:
            visible = self.labels == obj.object_id
            rows, cols = np.nonzero(visible)
            obj.box = _bbox(visible)
            obj.center = (round(float(cols.mean()) + 0.5, 2), round(float(rows.mean()) + 0.5, 2))
            obj.area = int(rows.size)
            obj.anchor, obj.inradius = _deepest_point(visible)
        return self.objects


def _object_plan(
    rng: np.random.Generator, world: str, holdout_only: bool
) -> list[tuple[str | None, str] | None]:
    """Per drawing slot: ``None`` (sample freely) or a forced ``(colour or None, shape)``."""
    forced: list[tuple[str | None, str]] = []
    if holdout_only:
        forced.append(HELD_OUT)
    if world == "shift":
        forced.append((None, SHIFT_SHAPE))
    count = max(int(rng.integers(1, MAX_OBJECTS + 1)), len(forced))
    plan: list[tuple[str | None, str] | None] = [None] * count
    for slot, spec in zip(rng.choice(count, size=len(forced), replace=False), forced):
        plan[int(slot)] = spec
    return plan


def _place_objects(
    rng: np.random.Generator, size: int, world: str, holdout_only: bool
) -> tuple[list[ShapeObject], np.ndarray]:
    """Sample the objects of one image; returns them (object_id = drawing order, 1-based) and the
    (H, W) uint8 instance map of visible pixels."""
    shapes = ALL_SHAPES if world == "shift" else SHAPES
    for _ in range(_MAX_SCENE_ATTEMPTS):
        placement = _Placement(size)
        plan = _object_plan(rng, world, holdout_only)
        placed = [placement.try_add(rng, shapes, spec) or spec is None for spec in plan]
        if all(placed) and placement.objects:
            return placement.finalize(), placement.labels
    raise RuntimeError("could not place the objects of a scene; is the image size too small?")


def reading_order(objects: Sequence[ShapeObject]) -> list[ShapeObject]:
    """Objects sorted by centre x (left to right), ties by centre y: the narrative's order."""
    return sorted(objects, key=lambda o: (o.center[0], o.center[1]))


# --------------------------------------------------------------------------------------------------
# Background and image
# --------------------------------------------------------------------------------------------------


def _background(rng: np.random.Generator, size: int) -> tuple[np.ndarray, str]:
    """A pale background, (size, size, 3) uint8, and its description for the narrative."""
    names = list(BACKGROUND_COLORS)
    kind = int(rng.integers(3))
    first = _pick(rng, names)
    base = np.array(BACKGROUND_COLORS[first], dtype=float) + rng.uniform(-4, 4, 3)
    if kind == 0:
        pixels, text = np.broadcast_to(base, (size, size, 3)), first
    elif kind == 1:
        second = _pick(rng, [n for n in names if n != first])
        angle = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:size, 0:size] / max(size - 1, 1)
        ramp = xs * math.cos(angle) + ys * math.sin(angle)
        ramp = ((ramp - ramp.min()) / max(np.ptp(ramp), 1e-9))[..., None]
        pixels = base * (1 - ramp) + np.array(BACKGROUND_COLORS[second]) * ramp
        text = f"a soft gradient from {first} to {second}"
    else:
        noise = rng.normal(0.0, rng.uniform(3.0, 7.0), (size, size, 1))
        pixels, text = base + noise, f"{first} and slightly grainy"
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8), text


def _compose(background: np.ndarray, objects: Sequence[ShapeObject]) -> np.ndarray:
    """Draw the objects' footprints over ``background`` in object_id order: (H, W, 3) uint8."""
    image = background.copy()
    for obj in objects:
        image[obj.footprint] = obj.rgb
    return image


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


# --------------------------------------------------------------------------------------------------
# Referring expressions
# --------------------------------------------------------------------------------------------------


def _relative_position(obj: ShapeObject, group: Sequence[ShapeObject], gap: float) -> str | None:
    """A position phrase that singles ``obj`` out of ``group`` (objects sharing its descriptor), or None.

    Two objects: "on the left/right" along x if they differ more in x, else "at the top/bottom".
    Three or more: "on the far left/right" for the extreme objects in x.  The deciding separation of
    the visible centres must be at least ``gap`` pixels.
    """
    if len(group) == 2:
        other = group[0] if group[1] is obj else group[1]
        dx, dy = obj.center[0] - other.center[0], obj.center[1] - other.center[1]
        if max(abs(dx), abs(dy)) < gap:
            return None
        if abs(dx) >= abs(dy):
            return "on the left" if dx < 0 else "on the right"
        return "at the top" if dy < 0 else "at the bottom"
    xs = sorted(o.center[0] for o in group)
    if obj.center[0] == xs[0] and xs[1] - xs[0] >= gap:
        return "on the far left"
    if obj.center[0] == xs[-1] and xs[-1] - xs[-2] >= gap:
        return "on the far right"
    return None


# Descriptor subsets tried for a short unique expression (size, colour, shape indices), shortest first.
_SHORT_DESCRIPTORS: tuple[tuple[int, ...], ...] = ((2,), (1, 2), (0, 2), (1,), (0, 1))


def _descriptor_text(obj: ShapeObject, fields: tuple[int, ...]) -> str:
    """``"the <attrs> <shape>"``, or ``"the <attrs> shape"`` when the shape is not part of ``fields``."""
    words = [obj.triple[f] for f in fields]
    return "the " + " ".join(words if 2 in fields else [*words, "shape"])


def _expressions_for(obj: ShapeObject, objects: Sequence[ShapeObject], size: int) -> list[str]:
    """Referring expressions that each match ``obj`` only (see :func:`_relative_position`)."""
    def group(fields: tuple[int, ...]) -> list[ShapeObject]:
        return [o for o in objects if all(o.triple[f] == obj.triple[f] for f in fields)]

    expressions = []
    full = group((0, 1, 2))
    # Identical twins are placed >= _TWIN_SEPARATION apart and have no other unique description.
    where = _relative_position(obj, full, gap=0.0) if len(full) > 1 else ""
    if where is not None:
        expressions.append(f"{_descriptor_text(obj, (0, 1, 2))} {where}".strip())
    short = next((f for f in _SHORT_DESCRIPTORS if len(group(f)) == 1), None)
    if short is not None:
        expressions.append(_descriptor_text(obj, short))
    same_shape = group((2,))
    if len(same_shape) > 1:
        where = _relative_position(obj, same_shape, gap=_POSITION_SEPARATION * size)
        if where is not None:
            expressions.append(f"the {obj.shape} {where}")
    return list(dict.fromkeys(expressions))


# --------------------------------------------------------------------------------------------------
# Scenes and records
# --------------------------------------------------------------------------------------------------


@dataclass
class ShapesScene:
    """One generated image with all its annotations (records exactly as written to the JSONL files).

    ``image``: (H, W, 3) uint8 RGB; ``instance_map``: (H, W) uint8, 0 = background, k = object_id k
    (visible pixels only); ``objects`` indexed by object_id - 1 (drawing order).
    """

    image_id: str
    image: np.ndarray
    instance_map: np.ndarray
    objects: list[ShapeObject]
    ln: dict[str, Any]
    refer: list[dict[str, Any]]
    dense: dict[str, Any]
    objects_record: dict[str, Any]

    @property
    def file_name(self) -> str:
        """Image path relative to the output directory."""
        return f"images/{self.image_id}.png"

    @property
    def mask_file(self) -> str:
        """Instance-map path relative to the output directory."""
        return f"masks/{self.image_id}.png"


def _check_options(split: str, size: int, world: str) -> None:
    """Raise ValueError for options the generator cannot honour."""
    if not _SPLIT_RE.match(split):
        raise ValueError(f"split must be letters, digits, '_' or '-', got {split!r}")
    if size < 64:
        raise ValueError(f"image size must be at least 64 pixels, got {size}")
    if world not in WORLDS:
        raise ValueError(f"world must be one of {WORLDS}, got {world!r}")


def _image_header(image_id: str, size: int) -> dict[str, Any]:
    """The image fields shared by the refer, dense and objects records."""
    return {"image_id": image_id, "file_name": f"images/{image_id}.png", "width": size, "height": size}


def _ln_record(image_id: str, annotator: int, spoken: Sequence[_Spoken], traces: list) -> dict[str, Any]:
    """The official LN record (exactly :data:`LN_KEYS`), one utterance per word."""
    record = {
        "dataset_id": DATASET_ID,
        "image_id": image_id,
        "annotator_id": f"sim_{annotator}",
        "caption": " ".join(w.text for w in spoken),
        "timed_caption": [{"utterance": w.text, "start_time": w.start, "end_time": w.end} for w in spoken],
        "traces": traces,
        "voice_recording": "",
    }
    assert tuple(record) == LN_KEYS
    return record


def _refer_records(image_id: str, objects: Sequence[ShapeObject], size: int) -> list[dict[str, Any]]:
    """One referring record per expression; ``ref_id = f"{image_id}_{j}"``."""
    records = []
    for obj in objects:
        for expression in _expressions_for(obj, objects, size):
            records.append({**_image_header(image_id, size), "ref_id": f"{image_id}_{len(records)}",
                            "object_id": obj.object_id, "expression": expression, "box": list(obj.box),
                            "mask_file": f"masks/{image_id}.png"})
    assert len({r["expression"] for r in records}) == len(records), "referring expressions must be unique"
    return records


def _dense_record(image_id: str, objects: Sequence[ShapeObject], size: int) -> dict[str, Any]:
    """The dense-captioning record: one region per object, caption ``"<size> <colour> <shape>"``."""
    regions = [{"object_id": o.object_id, "box": list(o.box), "caption": o.description} for o in objects]
    return {**_image_header(image_id, size), "regions": regions}


def _objects_record(
    image_id: str, objects: Sequence[ShapeObject], spoken: Sequence[_Spoken], size: int
) -> dict[str, Any]:
    """Ground truth: the objects and, per caption word, the id of the object it names (or None)."""
    described = [{"object_id": o.object_id, "shape": o.shape, "color": o.color, "size": o.size,
                  "rgb": list(o.rgb), "box": list(o.box), "center": list(o.center), "area": o.area}
                 for o in objects]
    return {**_image_header(image_id, size), "mask_file": f"masks/{image_id}.png", "objects": described,
            "word_objects": [w.object_id for w in spoken]}


def generate_scene(
    seed: int, index: int, *, split: str = "train", size: int = 256, world: str = "standard",
    holdout_only: bool = False,
) -> ShapesScene:
    """Generate image ``index`` of a split, deterministically from ``(seed, index, size, world, holdout_only)``.

    Args:
        seed, index: non-negative integers; the image's RNG is ``default_rng([seed, index, world, holdout])``.
        split: split name used in ``image_id = f"{split}_{index:06d}"``.
        size: image side in pixels (>= 64).
        world: ``"standard"`` or ``"shift"`` (every image holds at least one cross).
        holdout_only: every image holds the held-out green triangle (otherwise it never appears).

    Raises:
        ValueError: on invalid options.
    """
    _check_options(split, size, world)
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    rng = np.random.default_rng([seed, index, WORLDS.index(world), int(holdout_only)])
    image_id = f"{split}_{index:06d}"
    background, background_text = _background(rng, size)
    objects, labels = _place_objects(rng, size, world, holdout_only)
    sentences, with_background = _narrative(rng, objects, background_text, size)
    annotator = int(rng.integers(_ANNOTATORS))
    style = _ANNOTATOR_STYLES[annotator]
    spoken = _speak(rng, sentences, style)
    background_start = spoken[-len(sentences[-1])].start if with_background else None
    builder, finish = _trace_path(rng, spoken, objects, labels, background_start, style)
    traces = _sample_trace(rng, builder, finish, style)
    return ShapesScene(
        image_id=image_id,
        image=_compose(background, objects),
        instance_map=labels,
        objects=objects,
        ln=_ln_record(image_id, annotator, spoken, traces),
        refer=_refer_records(image_id, objects, size),
        dense=_dense_record(image_id, objects, size),
        objects_record=_objects_record(image_id, objects, spoken, size),
    )


# --------------------------------------------------------------------------------------------------
# Writing and reading splits
# --------------------------------------------------------------------------------------------------


@dataclass
class SplitSummary:
    """What :func:`generate_split` wrote."""

    split: str
    images: int
    objects: int
    expressions: int
    seconds: float

    def line(self) -> str:
        """The one-line summary printed by the CLI."""
        return (f"shapes split={self.split}: {self.images} images, {self.objects} objects, "
                f"{self.expressions} referring expressions in {self.seconds:.1f} s")


def _jsonl_line(record: dict[str, Any]) -> str:
    """``record`` as one JSON line (key order preserved)."""
    return json.dumps(record, ensure_ascii=False) + "\n"


def generate_split(
    out_dir: str | Path, split: str, num: int, seed: int, *, size: int = 256, world: str = "standard",
    holdout_only: bool = False,
) -> SplitSummary:
    """Write images 0..num-1 of a split into ``out_dir`` (see ``docs/data_formats.md``).

    Creates ``images/``, ``masks/`` and ``<split>.{ln,refer,dense,objects}.jsonl`` (overwriting them);
    several splits may share ``out_dir``.

    Raises:
        ValueError: on invalid options.
    """
    _check_options(split, size, world)
    if num < 1 or seed < 0:
        raise ValueError(f"num must be >= 1 and seed >= 0, got num={num}, seed={seed}")
    began = time.perf_counter()
    root = Path(out_dir)
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    objects = expressions = 0
    with ExitStack() as stack:
        files = {kind: stack.enter_context(open(root / f"{split}.{kind}.jsonl", "w", encoding="utf-8"))
                 for kind in ("ln", "refer", "dense", "objects")}
        for index in range(num):
            scene = generate_scene(seed, index, split=split, size=size, world=world, holdout_only=holdout_only)
            Image.fromarray(scene.image).save(root / scene.file_name, format="PNG", compress_level=_PNG_LEVEL)
            Image.fromarray(scene.instance_map).save(root / scene.mask_file, format="PNG", compress_level=_PNG_LEVEL)
            files["ln"].write(_jsonl_line(scene.ln))
            files["refer"].writelines(_jsonl_line(r) for r in scene.refer)
            files["dense"].write(_jsonl_line(scene.dense))
            files["objects"].write(_jsonl_line(scene.objects_record))
            objects += len(scene.objects)
            expressions += len(scene.refer)
    return SplitSummary(split, num, objects, expressions, time.perf_counter() - began)


def load_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSONL file (blank lines ignored)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@dataclass
class ShapesSplit:
    """The parsed JSONL records of one split (plain dicts, formats in ``docs/data_formats.md``)."""

    root: Path
    split: str
    ln: list[dict[str, Any]]
    refer: list[dict[str, Any]]
    dense: list[dict[str, Any]]
    objects: list[dict[str, Any]]


def load_split(root: str | Path, split: str) -> ShapesSplit:
    """Read ``<split>.{ln,refer,dense,objects}.jsonl`` from ``root``.

    Raises:
        ValueError: if one of the files is missing.
    """
    root = Path(root)
    records = {}
    for kind in ("ln", "refer", "dense", "objects"):
        path = root / f"{split}.{kind}.jsonl"
        if not path.is_file():
            raise ValueError(f"no Shapes split {split!r} in {root}: {path.name} is missing")
        records[kind] = load_jsonl(path)
    return ShapesSplit(root=root, split=split, **records)


def load_instance_map(root: str | Path, mask_file: str) -> np.ndarray:
    """The (H, W) uint8 instance map ``root/mask_file``: 0 = background, k = object_id k.

    Raises:
        ValueError: if the file is not an 8-bit single-channel ('L') PNG.
    """
    with Image.open(Path(root) / mask_file) as mask:
        if mask.mode != "L":
            raise ValueError(f"{mask_file} is a {mask.mode!r} image, expected an 8-bit 'L' instance map")
        return np.asarray(mask, dtype=np.uint8).copy()


def load_image(root: str | Path, file_name: str) -> np.ndarray:
    """The (H, W, 3) uint8 RGB image ``root/file_name``."""
    with Image.open(Path(root) / file_name) as image:
        return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


_MENTION_SIZES, _MENTION_COLORS, _MENTION_SHAPES = set(SIZES), set(COLORS), set(ALL_SHAPES)


def parse_mentions(text: str) -> list[tuple[str, str, str]]:
    """Every ``<size> <colour> <shape>`` mention in ``text`` in order, as ``(size, colour, shape)``.

    Case and punctuation are ignored ("Large, RED circle." matches); ``cross`` counts as a shape.
    """
    words = re.findall(r"[a-z]+", text.lower())
    mentions, i = [], 0
    while i + 2 < len(words):
        size, color, shape = words[i:i + 3]
        if size in _MENTION_SIZES and color in _MENTION_COLORS and shape in _MENTION_SHAPES:
            mentions.append((size, color, shape))
            i += 3
        else:
            i += 1
    return mentions


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m training.shapes`` argument parser."""
    parser = argparse.ArgumentParser(prog="python -m training.shapes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory (shared by several splits)")
    parser.add_argument("--split", required=True, help="split name, e.g. train / val / test")
    parser.add_argument("--num", type=int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, required=True, help="split seed (use different seeds per split)")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    parser.add_argument("--world", choices=WORLDS, default="standard",
                        help="'shift' adds the unseen shape 'cross' to every image")
    parser.add_argument("--holdout-only", action="store_true",
                        help="every image contains the held-out green triangle (generalisation split)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry: generate one split and print a one-line summary."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        summary = generate_split(args.out, args.split, args.num, args.seed, size=args.size, world=args.world,
                                 holdout_only=args.holdout_only)
    except ValueError as err:
        parser.error(str(err))
    print(summary.line())
    return 0
