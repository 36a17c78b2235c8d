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

Modules: ``world`` (vocabulary, rules, objects, placement, image), ``narration`` (narrative text, speech timing,
mouse trace), ``scenes`` (referring expressions, one scene's records), ``splits`` (files on disk, the CLI).
"""

from __future__ import annotations

from training.data.shapes.scenes import ShapesScene, generate_scene
from training.data.shapes.splits import (
    ShapesSplit,
    SplitSummary,
    generate_split,
    load_image,
    load_instance_map,
    load_jsonl,
    load_split,
    main,
    parse_mentions,
    unfinished_split,
)
from training.data.shapes.world import (
    ALL_SHAPES,
    BACKGROUND_COLORS,
    COLORS,
    DATASET_ID,
    HELD_OUT,
    SHAPES,
    SHIFT_SHAPE,
    SIZES,
    WORLDS,
    ShapeObject,
    reading_order,
)

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
    "unfinished_split",
]
