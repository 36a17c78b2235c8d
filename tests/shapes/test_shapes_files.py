"""The Shapes world generator's files (DESIGN §3): every file written, determinism, official LN records at human
rates, and masks agreeing with boxes, areas and colours.

The rest of tests/shapes/: world rules, word alignment and referring expressions: test_shapes_world.py; options,
files and errors: test_shapes_helpers_and_errors.py; a generation cut short, killed or run twice at once:
test_shapes_interrupted.py."""

import json
import re
from collections import Counter

import numpy as np
from PIL import Image

from tests.shapes.conftest import SPLITS, objects_of
from training.data.shapes import (
    generate_split,
    load_image,
    load_instance_map,
    load_split,
)

LN_KEYS_IN_ORDER = ["dataset_id", "image_id", "annotator_id", "caption", "timed_caption", "traces",
                    "voice_recording"]


# ------------------------------------------------------------------ files and determinism


def test_cli_writes_every_file(data_dir, capsys):
    for split, num in SPLITS.items():
        records = load_split(data_dir, split)
        assert len(records.ln) == len(records.dense) == len(records.objects) == num
        ids = [f"{split}_{i:06d}" for i in range(num)]
        assert [r["image_id"] for r in records.ln] == ids
        for image_id in ids:
            assert Image.open(data_dir / "images" / f"{image_id}.png").mode == "RGB"
            assert Image.open(data_dir / "masks" / f"{image_id}.png").mode == "L"


def test_same_seed_gives_identical_bytes_and_other_seed_differs(data_dir, tmp_path):
    generate_split(tmp_path / "same", "train", 3, 11)
    generate_split(tmp_path / "other", "train", 3, 99)
    for i in range(3):
        for folder in ("images", "masks"):
            name = f"{folder}/train_{i:06d}.png"
            assert (tmp_path / "same" / name).read_bytes() == (data_dir / name).read_bytes()
            assert (tmp_path / "other" / name).read_bytes() != (data_dir / name).read_bytes()
    for kind in ("ln", "refer", "dense", "objects"):
        same = (tmp_path / "same" / f"train.{kind}.jsonl").read_text().splitlines()
        full = (data_dir / f"train.{kind}.jsonl").read_text().splitlines()
        assert same == full[: len(same)]
    other = load_split(tmp_path / "other", "train").ln
    assert [r["caption"] for r in other] != [r["caption"] for r in load_split(data_dir, "train").ln[:3]]


# ------------------------------------------------------------------ LN records


def test_ln_records_are_official(data_dir):
    for split in SPLITS:
        for line in (data_dir / f"{split}.ln.jsonl").read_text().splitlines():
            record = json.loads(line)
            assert list(record) == LN_KEYS_IN_ORDER
            assert record["dataset_id"] == "shapes" and record["annotator_id"].startswith("sim_")
            assert isinstance(record["voice_recording"], str)
            words = record["caption"].split()
            assert [u["utterance"] for u in record["timed_caption"]] == words
            starts = [u["start_time"] for u in record["timed_caption"]]
            ends = [u["end_time"] for u in record["timed_caption"]]
            assert all(s < e for s, e in zip(starts, ends))
            assert all(e <= s for e, s in zip(ends, starts[1:]))
            for segment in record["traces"]:
                assert all(set(p) == {"x", "y", "t"} for p in segment)
                times = [p["t"] for p in segment]
                assert times == sorted(times)


def test_speech_and_trace_rates_are_human(data_dir):
    records = load_split(data_dir, "train")
    for record, objects in zip(records.ln, records.objects):
        timed = record["timed_caption"]
        words_per_second = len(timed) / (timed[-1]["end_time"] - timed[0]["start_time"])
        assert 1.5 <= words_per_second <= 3.5
        points = [p for segment in record["traces"] for p in segment]
        hertz = len(points) / (points[-1]["t"] - points[0]["t"])
        assert 20 <= hertz <= 35
        content = [u for u, m in zip(timed, objects["word_objects"]) if m is not None]
        assert points[0]["t"] <= content[0]["start_time"] and points[-1]["t"] >= content[-1]["end_time"]


def test_some_traces_have_several_segments(data_dir):
    segments = [len(r["traces"]) for split in SPLITS for r in load_split(data_dir, split).ln]
    assert max(segments) >= 2 and min(segments) >= 1


def test_narratives_are_short_sentences(data_dir):
    for record in load_split(data_dir, "train").ln:
        words = record["caption"].split()
        assert len(words) <= 70
        sentences = [s for s in re.split(r"(?<=\.)\s+", record["caption"]) if s]
        assert all(s[0].isupper() and s.endswith(".") and len(s.split()) <= 13 for s in sentences)


# ------------------------------------------------------------------ masks, boxes, colours


def test_masks_agree_with_boxes_areas_and_pixels(data_dir):
    for split in SPLITS:
        records = load_split(data_dir, split)
        dense = {r["image_id"]: r for r in records.dense}
        for record in records.objects:
            mask = load_instance_map(data_dir, record["mask_file"])
            image = load_image(data_dir, record["file_name"])
            assert mask.shape == (record["height"], record["width"]) == image.shape[:2]
            ids = [o["object_id"] for o in record["objects"]]
            assert 1 <= len(ids) <= 6 and ids == list(range(1, len(ids) + 1))
            assert set(np.unique(mask)) == {0, *ids}
            for obj in record["objects"]:
                rows, cols = np.nonzero(mask == obj["object_id"])
                assert obj["box"] == [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1]
                assert obj["area"] == rows.size
                np.testing.assert_allclose(obj["center"], [cols.mean() + 0.5, rows.mean() + 0.5], atol=0.01)
                assert (image[rows, cols] == obj["rgb"]).all()
            regions = dense[record["image_id"]]["regions"]
            objects = record["objects"]
            assert [(r["object_id"], r["box"]) for r in regions] == [(o["object_id"], o["box"]) for o in objects]
            assert [r["caption"] for r in regions] == [f"{o['size']} {o['color']} {o['shape']}" for o in objects]


def test_objects_are_visible_distinct_sized_and_rarely_repeated(data_dir):
    small, large = [], []
    for split in SPLITS:
        for record in objects_of(data_dir, split):
            triples = Counter((o["size"], o["color"], o["shape"]) for o in record["objects"])
            assert max(triples.values()) <= 2
            for obj in record["objects"]:
                x0, y0, x1, y1 = obj["box"]
                assert obj["area"] >= 0.1 * (x1 - x0) * (y1 - y0)
                (small if obj["size"] == "small" else large).append(max(x1 - x0, y1 - y0))
    # Visible extents of the two size classes do not overlap much (occlusion can only shrink large ones).
    assert np.percentile(small, 90) < np.percentile(large, 50)


def test_background_is_pale_and_objects_are_saturated(data_dir):
    for record in objects_of(data_dir, "train"):
        mask = load_instance_map(data_dir, record["mask_file"])
        image = load_image(data_dir, record["file_name"]).astype(int)
        background = image[mask == 0]
        assert background.min() >= 150 and (background.max(1) - background.min(1)).max() <= 60
        foreground = image[mask > 0]
        assert (foreground.max(1) - foreground.min(1)).min() >= 100
