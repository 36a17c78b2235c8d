"""The Shapes world's vocabulary and rules, its objects and their placement, and the image (see ``__init__``)."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

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


