"""The Shapes world generator: formats, world rules, determinism and trace/word alignment (DESIGN §3)."""

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data.localized_narratives import read_localized_narratives
from training.data.shapes import (
    generate_split,
    load_image,
    load_instance_map,
    load_split,
    main,
    parse_mentions,
)

SIZE_WORDS = {"small", "large"}
COLOR_WORDS = {"red", "green", "blue", "yellow", "purple", "orange"}
STANDARD_SHAPES = {"circle", "square", "triangle", "star", "diamond", "hexagon"}
SHAPE_WORDS = STANDARD_SHAPES | {"cross"}
LN_KEYS_IN_ORDER = ["dataset_id", "image_id", "annotator_id", "caption", "timed_caption", "traces",
                    "voice_recording"]
SPLITS = {"train": 12, "heldout": 5, "shifted": 5}  # images per split in the shared fixture


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """12 standard, 5 --holdout-only and 5 --world shift images in one directory, through the CLI."""
    root = tmp_path_factory.mktemp("shapes")
    main(["--out", str(root), "--split", "train", "--num", "12", "--seed", "11"])
    main(["--out", str(root), "--split", "heldout", "--num", "5", "--seed", "12", "--holdout-only"])
    main(["--out", str(root), "--split", "shifted", "--num", "5", "--seed", "13", "--world", "shift"])
    return root


def objects_of(data_dir: Path, split: str) -> list[dict]:
    return load_split(data_dir, split).objects


def all_objects(data_dir: Path, split: str) -> list[dict]:
    return [obj for record in objects_of(data_dir, split) for obj in record["objects"]]


def strip(word: str) -> str:
    return re.sub(r"[^a-z]", "", word.lower())


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


# ------------------------------------------------------------------ helpers and errors


def test_parse_mentions_is_tolerant():
    text = "In this picture: a LARGE red Circle, and a small-blue cross! Red large star; large green."
    assert parse_mentions(text) == [("large", "red", "circle"), ("small", "blue", "cross")]
    assert parse_mentions("nothing here") == []


@pytest.mark.parametrize(
    "kwargs",
    [dict(split="a/b"), dict(world="moon"), dict(num=0), dict(size=16), dict(seed=-1)],
)
def test_bad_options_raise_value_error(tmp_path, kwargs):
    options = dict(split="train", num=1, seed=0) | kwargs
    world = options.pop("world", "standard")
    size = options.pop("size", 256)
    with pytest.raises(ValueError):
        generate_split(tmp_path, options["split"], options["num"], options["seed"], size=size, world=world)


def test_cli_rejects_bad_options(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path), "--split", "x", "--num", "0", "--seed", "1"])
    assert exit_info.value.code == 2


def test_cli_names_an_out_that_is_a_file_in_one_line(tmp_path, capsys):
    """`--out` naming a file (e.g. a split's JSONL) was a NotADirectoryError traceback."""
    (tmp_path / "train.ln.jsonl").write_text("{}\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "train.ln.jsonl"), "--split", "x", "--num", "1", "--seed", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--out {tmp_path / 'train.ln.jsonl'}: cannot write the split there: Not a directory" in err, err


def test_load_instance_map_rejects_colour_images(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError):
        load_instance_map(tmp_path, "rgb.png")


def test_load_split_reports_missing_files(tmp_path):
    with pytest.raises(ValueError, match="missing"):
        load_split(tmp_path, "nothing")


def test_a_split_cut_short_does_not_look_complete_and_training_regenerates_it(tmp_path, monkeypatch):
    """A kill mid-generation left four half-written JSONL files (of different lengths) that `training.train`
    took for a complete split on the rerun the README advises."""
    from training.data.shapes import splits
    from training.train import ensure_data

    generate_split(tmp_path, "t", 3, seed=1)  # a complete earlier split of the same name
    real = splits.generate_scene

    def killed_at_the_third(seed, index, **kwargs):
        if index == 2:
            raise KeyboardInterrupt  # stands for the kill
        return real(seed, index, **kwargs)

    monkeypatch.setattr(splits, "generate_scene", killed_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        generate_split(tmp_path, "t", 5, seed=2)
    assert not (tmp_path / "t.objects.jsonl").exists()
    monkeypatch.undo()
    ensure_data({"data": {"root": str(tmp_path), "generate": {"t": {"num": 5, "seed": 2}}}}, rank=0, world=1)
    lengths = {kind: len(splits.load_jsonl(tmp_path / f"t.{kind}.jsonl")) for kind in ("ln", "dense", "objects")}
    assert lengths == {"ln": 5, "dense": 5, "objects": 5}
    assert not list(tmp_path.glob("*.partial"))


# `python -m training.shapes`, in a child process whose generator stops before the image PAUSE_AT: with "die" it
# dies there (os._exit: no `finally`, no cleanup, as a SIGKILL); with "wait" it says "paused" and waits for a line
# on stdin, then goes on.
_GENERATOR_STOPPED_AT = """import os, sys
import training.data.shapes.splits as splits
real = splits.generate_scene
def stop_at(seed, index, **kwargs):
    if index == int(os.environ["PAUSE_AT"]):
        if os.environ["HOW"] == "die":
            os._exit(9)
        print("paused", flush=True)
        sys.stdin.readline()
    return real(seed, index, **kwargs)
splits.generate_scene = stop_at
sys.exit(splits.main(sys.argv[1:]))
"""
_ROOT = Path(__file__).resolve().parents[1]


def _stopped_generator(how: str, out: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(_ROOT), PAUSE_AT="2", HOW=how, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", _GENERATOR_STOPPED_AT, "--out", str(out), *args], cwd=_ROOT,
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _split_files(root: Path, split: str) -> dict[str, bytes]:
    files = [f"{split}.{kind}.jsonl" for kind in ("ln", "refer", "dense", "objects")]
    files += [f"{folder}/{split}_{i:06d}.png" for folder in ("images", "masks") for i in range(5)]
    return {name: (root / name).read_bytes() for name in files}


def test_a_regeneration_killed_part_way_is_refused_by_every_reader_and_the_rerun_makes_it_whole(tmp_path):
    """A split regenerated with another seed and killed at its third image kept the earlier run's ln / refer /
    dense files beside two new images: `training.train` without a data.generate entry for the split (and
    `training.finetune --replay-data`) trained on narratives of other pictures as if the split were whole."""
    from training.data.datasets import ShapesData
    from training.train import check_split

    data, fresh = tmp_path / "data", tmp_path / "fresh"
    main(["--out", str(data), "--split", "t", "--num", "5", "--seed", "1", "--size", "64"])
    command = ["--split", "t", "--num", "5", "--seed", "2", "--size", "64"]
    killed = _stopped_generator("die", data, *command)
    killed.communicate(timeout=120)
    assert killed.returncode == 9
    with pytest.raises(ValueError, match="cut short while it was generated"):
        ShapesData(data, "t", 64)
    with pytest.raises(SystemExit, match="run the same python -m training.shapes command again"):
        check_split(data, "t")
    with pytest.raises(ValueError, match="cut short"):
        load_split(data, "t")
    main(["--out", str(data), *command])  # the rerun needs no cleaning up by hand
    main(["--out", str(fresh), *command])
    assert _split_files(data, "t") == _split_files(fresh, "t")
    assert not list(data.glob("*.partial"))
    assert len(ShapesData(data, "t", 64).records) == 5


def test_a_second_generator_of_the_same_split_is_refused_while_the_first_runs(tmp_path, capsys):
    """Two generators of one split at once wrote into the same `.partial` files and images; the second (seed 2)
    finished and renamed them into place, then the first (seed 1) went on writing into the renamed files: a split
    that looked complete, mixing both runs."""
    data, fresh = tmp_path / "data", tmp_path / "fresh"
    first = _stopped_generator("wait", data, "--split", "t", "--num", "5", "--seed", "1", "--size", "64")
    try:
        assert first.stdout.readline().strip() == "paused"
        with pytest.raises(SystemExit) as refused:
            main(["--out", str(data), "--split", "t", "--num", "5", "--seed", "2", "--size", "64"])
        assert refused.value.code == 2
        assert "another process is writing split 't'" in capsys.readouterr().err
        main(["--out", str(data), "--split", "u", "--num", "2", "--seed", "3", "--size", "64"])  # other splits may
    finally:
        out, _ = first.communicate("go\n", timeout=120)
    assert first.returncode == 0, out
    main(["--out", str(fresh), "--split", "t", "--num", "5", "--seed", "1", "--size", "64"])
    assert _split_files(data, "t") == _split_files(fresh, "t")
    # the lock files stay (removing one lets two generators in at once: see splits._only_writer), and only they
    assert sorted(p.name for p in data.iterdir() if p.name.startswith(".")) == [".t.lock", ".u.lock"]
