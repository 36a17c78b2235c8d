"""Referring expressions and one scene's records (LN, referring, dense, objects): ``generate_scene``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.data.localized_narratives import LN_KEYS
from training.data.shapes.narration import (
    _ANNOTATOR_STYLES,
    _narrative,
    _sample_trace,
    _speak,
    _Spoken,
    _trace_path,
)
from training.data.shapes.world import (
    _ANNOTATORS,
    _POSITION_SEPARATION,
    _SPLIT_RE,
    DATASET_ID,
    WORLDS,
    ShapeObject,
    _background,
    _compose,
    _place_objects,
)

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


#: The largest image side: twice the largest model input (1024 px, the base and paper presets; larger images are
#: only downscaled). Drawing a scene takes about 100 bytes a pixel (~400 MB, 1.5 s at 2048; 1.6 GB at 4096):
#: `--size 100000` was a MemoryError (149 GiB for one coordinate grid) that left the split's `.partial` files.
MAX_SIZE = 2048


def check_options(split: str, size: int, world: str) -> None:
    """Raise ValueError for options the generator cannot honour (also what `training.train` checks its
    `data.generate` entries with, before any work)."""
    if not _SPLIT_RE.match(split):
        raise ValueError(f"split must be letters, digits, '_' or '-', got {split!r}")
    if not 64 <= size <= MAX_SIZE:
        raise ValueError(f"image size must be between 64 and {MAX_SIZE} pixels (the largest model input is 1024), "
                         f"got {size}")
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
    check_options(split, size, world)
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


