"""The Shapes world generator's world (DESIGN §3): the held-out and shift-only rules, narrative mentions and
position phrases aligned with the words and traces, and referring expressions that are unique and resolve."""

import re
from pathlib import Path

import numpy as np

from tests.shapes.conftest import SPLITS, objects_of
from training.data.localized_narratives import read_localized_narratives
from training.data.shapes import (
    load_instance_map,
    load_split,
    parse_mentions,
)

SIZE_WORDS = {"small", "large"}


COLOR_WORDS = {"red", "green", "blue", "yellow", "purple", "orange"}


STANDARD_SHAPES = {"circle", "square", "triangle", "star", "diamond", "hexagon"}


SHAPE_WORDS = STANDARD_SHAPES | {"cross"}


def all_objects(data_dir: Path, split: str) -> list[dict]:
    return [obj for record in objects_of(data_dir, split) for obj in record["objects"]]


def strip(word: str) -> str:
    return re.sub(r"[^a-z]", "", word.lower())


# ------------------------------------------------------------------ world rules


def test_green_triangle_is_held_out(data_dir):
    for split in ("train", "shifted"):
        assert not any(o["color"] == "green" and o["shape"] == "triangle" for o in all_objects(data_dir, split))
    for record in objects_of(data_dir, "heldout"):
        assert any(o["color"] == "green" and o["shape"] == "triangle" for o in record["objects"])


def test_cross_only_in_the_shift_world(data_dir):
    for split in ("train", "heldout"):
        shapes = {o["shape"] for o in all_objects(data_dir, split)}
        assert shapes <= STANDARD_SHAPES
    for record, ln in zip(objects_of(data_dir, "shifted"), load_split(data_dir, "shifted").ln):
        assert any(o["shape"] == "cross" for o in record["objects"])
        assert any(shape == "cross" for _, _, shape in parse_mentions(ln["caption"]))


# ------------------------------------------------------------------ narrative and word alignment


def reading_order(objects: list[dict]) -> list[dict]:
    return sorted(objects, key=lambda o: (o["center"][0], o["center"][1]))


def test_word_objects_mark_each_mention_once_in_reading_order(data_dir):
    for split in SPLITS:
        records = load_split(data_dir, split)
        for record, ln in zip(records.objects, records.ln):
            words = ln["caption"].split()
            marks = record["word_objects"]
            assert len(marks) == len(words)
            by_id = {o["object_id"]: o for o in record["objects"]}
            for object_id, obj in by_id.items():
                where = [i for i, m in enumerate(marks) if m == object_id]
                assert len(where) == 3 and where == list(range(where[0], where[0] + 3))
                assert [strip(words[i]) for i in where] == [obj["size"], obj["color"], obj["shape"]]
            expected = [(o["size"], o["color"], o["shape"]) for o in reading_order(record["objects"])]
            assert parse_mentions(ln["caption"]) == expected
            content = [i for i, m in enumerate(marks) if m is not None]
            assert [marks[i] for i in content[::3]] == [o["object_id"] for o in reading_order(record["objects"])]


POSITION_RULES = {
    "on the left": lambda x, y: x < 1 / 3 and 1 / 3 <= y < 2 / 3,
    "on the right": lambda x, y: x >= 2 / 3 and 1 / 3 <= y < 2 / 3,
    "at the top left": lambda x, y: x < 1 / 3 and y < 1 / 3,
    "at the top right": lambda x, y: x >= 2 / 3 and y < 1 / 3,
    "at the bottom left": lambda x, y: x < 1 / 3 and y >= 2 / 3,
    "at the bottom right": lambda x, y: x >= 2 / 3 and y >= 2 / 3,
    "at the top": lambda x, y: 1 / 3 <= x < 2 / 3 and y < 1 / 3,
    "at the bottom": lambda x, y: 1 / 3 <= x < 2 / 3 and y >= 2 / 3,
    "in the centre": lambda x, y: 1 / 3 <= x < 2 / 3 and 1 / 3 <= y < 2 / 3,
}


def test_position_phrases_after_a_mention_match_the_geometry(data_dir):
    checked = 0
    for split in SPLITS:
        records = load_split(data_dir, split)
        for record, ln in zip(records.objects, records.ln):
            raw = ln["caption"].split()
            words = [strip(w) for w in raw]
            marks = record["word_objects"]
            by_id = {o["object_id"]: o for o in record["objects"]}
            for i in range(2, len(words)):
                if marks[i] is None or (i + 1 < len(marks) and marks[i + 1] == marks[i]) or raw[i].endswith("."):
                    continue  # not the last content word of a mention, or the sentence ends there
                after = " ".join(words[i + 1:i + 5])
                phrase = next((p for p in sorted(POSITION_RULES, key=len, reverse=True)
                               if after == p or after.startswith(p + " ")), None)
                if phrase is None:
                    continue
                cx, cy = by_id[marks[i]]["center"]
                assert POSITION_RULES[phrase](cx / record["width"], cy / record["height"]), (phrase, cx, cy)
                checked += 1
    assert checked >= 5


def test_content_word_traces_land_on_their_objects(data_dir):
    """Reading the LN files back through the LN reader, the centre of a content word's box lies inside
    that object's mask for at least 90% of content words."""
    hits = total = 0
    for split in SPLITS:
        samples, stats = read_localized_narratives(data_dir / f"{split}.ln.jsonl")
        assert stats.kept == stats.records == SPLITS[split]
        for sample, record in zip(samples, objects_of(data_dir, split)):
            assert sample.image_id == record["image_id"]
            mask = load_instance_map(data_dir, record["mask_file"])
            height, width = mask.shape
            assert len(sample.words) == len(record["word_objects"])
            for box, object_id in zip(sample.word_boxes, record["word_objects"]):
                if object_id is None:
                    continue
                x = int(np.floor((box[0] + box[2]) / 2 * width))
                y = int(np.floor((box[1] + box[3]) / 2 * height))
                total += 1
                hits += 0 <= x < width and 0 <= y < height and mask[y, x] == object_id
    assert total >= 100
    assert hits / total >= 0.9


# ------------------------------------------------------------------ referring expressions


def resolve(expression: str, objects: list[dict]) -> list[int]:
    """Object ids an expression "the [size] [colour] <shape|'shape'> [position]" denotes (test's own parser)."""
    words = expression.split()
    assert words[0] == "the"
    position = None
    for phrase in ("on the far left", "on the far right", "on the left", "on the right", "at the top", "at the bottom"):
        if expression.endswith(" " + phrase):
            position = phrase.split()[-1]
            words = words[: -len(phrase.split())]
            break
    attributes = words[1:]
    assert attributes and all(w in SIZE_WORDS | COLOR_WORDS | SHAPE_WORDS | {"shape"} for w in attributes)
    candidates = [o for o in objects if all(w in (o["size"], o["color"], o["shape"], "shape") for w in attributes)]
    if position is None:
        return [o["object_id"] for o in candidates]
    assert len(candidates) >= 2
    axis, pick = {"left": (0, min), "right": (0, max), "top": (1, min), "bottom": (1, max)}[position]
    return [pick(candidates, key=lambda o: o["center"][axis])["object_id"]]


def test_referring_expressions_are_unique_and_resolve(data_dir):
    for split in SPLITS:
        records = load_split(data_dir, split)
        objects = {r["image_id"]: r for r in records.objects}
        by_image: dict[str, list[dict]] = {}
        for ref in records.refer:
            by_image.setdefault(ref["image_id"], []).append(ref)
        assert set(by_image) == set(objects)
        ref_ids = [ref["ref_id"] for ref in records.refer]
        assert len(set(ref_ids)) == len(ref_ids)
        for image_id, refs in by_image.items():
            record = objects[image_id]
            expressions = [ref["expression"] for ref in refs]
            assert len(set(expressions)) == len(expressions)
            assert {ref["object_id"] for ref in refs} == {o["object_id"] for o in record["objects"]}
            boxes = {o["object_id"]: o["box"] for o in record["objects"]}
            for ref in refs:
                assert resolve(ref["expression"], record["objects"]) == [ref["object_id"]], ref["expression"]
                assert ref["box"] == boxes[ref["object_id"]]
                assert ref["mask_file"] == record["mask_file"] and ref["file_name"] == record["file_name"]
