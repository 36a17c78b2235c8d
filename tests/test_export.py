"""Tests for training.export: LN round trip (recorded and synthesised traces), the seven LN keys, COCO regions,
and that nothing is ever written outside the export folder."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelllm.store import AnnotationStore, StoreError
from training import export
from training.data.localized_narratives import LN_KEYS, read_localized_narratives, utterance_targets

ROOT = Path(__file__).resolve().parents[1]
W, H = 160, 120
TOL = 1e-6


def png_bytes(seed: int, width: int = W, height: int = H) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def store(tmp_path):
    with AnnotationStore(tmp_path / "store" / "annotations.db") as s:
        yield s


def add_caption(store, seed: int, words, boxes, *, traces=(), timed_caption=(), status="submitted",
                prompts=None, non_visual=()) -> int:
    sha = store.add_image(png_bytes(seed), W, H)
    gen = store.log_generation(sha, "caption", words, boxes, model_id="test", model_version="v0",
                               prompts=prompts or {"box": None, "points": [], "point_labels": [], "text": None})
    return store.save_correction(annotator="alice", generation_id=gen, status=status, caption=" ".join(words),
                                 words=words, boxes=boxes, traces=traces, timed_caption=timed_caption,
                                 non_visual=non_visual)


def random_boxes(rng, n: int) -> list[list[float]]:
    x0 = rng.uniform(0, W * 0.7, n)
    y0 = rng.uniform(0, H * 0.7, n)
    return [[float(a), float(b), float(a + rng.uniform(1, W * 0.3)), float(b + rng.uniform(1, H * 0.3))]
            for a, b in zip(x0, y0)]


def recorded_trace(rng, n_words: int):
    """A human-like recording: two segments (the pointer left the image once), points slightly outside [0, 1],
    words spoken back to back with touching slots."""
    times = np.sort(rng.uniform(0.0, 0.5 * n_words + 1.0, 40))
    xy = np.cumsum(rng.normal(0, 0.05, (40, 2)), axis=0) + 0.5
    points = [{"x": float(x), "y": float(y), "t": float(t)} for (x, y), t in zip(xy, times)]
    traces = [points[:25], points[25:]]
    edges = np.linspace(0.2, 0.5 * n_words + 0.2, n_words + 1)
    return traces, edges


def read_back(out: Path):
    samples, stats = read_localized_narratives(out / export.LN_FILE)
    return samples, stats


# ------------------------------------------------------------------------------------------ LN round trip

def test_recorded_trace_round_trips_to_the_targets_of_the_stored_trace(store, tmp_path):
    rng = np.random.default_rng(0)
    words = ["In", "this", "picture", "a", "red", "circle."]
    traces, edges = recorded_trace(rng, len(words))
    timed = [{"utterance": w, "start_time": float(edges[i]), "end_time": float(edges[i + 1])}
             for i, w in enumerate(words)]
    cid = add_caption(store, 1, words, random_boxes(rng, len(words)), traces=traces, timed_caption=timed)

    summary = export.export_corrections(store, tmp_path / "out")
    assert summary["ln_records"] == 1 and summary["recorded_traces"] == 1 and summary["synthesised_traces"] == 0

    samples, stats = read_back(tmp_path / "out")
    assert stats.kept == 1
    [sample] = samples
    row = store.get_correction(cid)
    expected_boxes, expected_centres = utterance_targets(row["traces"], row["timed_caption"])
    assert sample.words == words
    np.testing.assert_allclose(sample.word_boxes, expected_boxes, atol=TOL, rtol=0)
    np.testing.assert_allclose(sample.word_centres, expected_centres, atol=TOL, rtol=0)
    assert sample.image_id == row["image_sha"] and sample.annotator_id == "alice"


def test_recorded_trace_without_timing_spreads_the_words_over_the_trace(store, tmp_path):
    rng = np.random.default_rng(1)
    words = ["a", "blue", "star"]
    traces, _ = recorded_trace(rng, len(words))
    add_caption(store, 2, words, random_boxes(rng, len(words)), traces=traces)
    export.export_corrections(store, tmp_path / "out")
    [sample], _ = read_back(tmp_path / "out")
    record = json.loads((tmp_path / "out" / export.LN_FILE).read_text())
    t = [p["t"] for seg in traces for p in seg]
    assert record["timed_caption"][0]["start_time"] == pytest.approx(min(t))
    assert record["timed_caption"][-1]["end_time"] == pytest.approx(max(t))
    expected, _ = utterance_targets(traces, record["timed_caption"])
    np.testing.assert_allclose(sample.word_boxes, expected, atol=TOL, rtol=0)


@pytest.mark.parametrize("timing", ["none", "separable", "touching"])
def test_moved_boxes_without_a_trace_round_trip_through_a_synthesised_trace(store, tmp_path, timing):
    rng = np.random.default_rng(2)
    words = ["large", "red", "cross", "on", "the", "left"]
    boxes = random_boxes(rng, len(words))
    boxes[3] = [10.0, 20.0, 10.0, 20.0]  # a point box (zero area) survives too
    timed = ()
    if timing == "separable":
        timed = [{"utterance": w, "start_time": 1.0 + i * 0.7, "end_time": 1.5 + i * 0.7} for i, w in enumerate(words)]
    elif timing == "touching":  # shared slot edges cannot be reproduced exactly: the export re-times
        timed = [{"utterance": w, "start_time": i * 0.5, "end_time": (i + 1) * 0.5} for i, w in enumerate(words)]
    add_caption(store, 3, words, boxes, timed_caption=timed, non_visual=[3, 4])

    summary = export.export_corrections(store, tmp_path / "out")
    assert summary["synthesised_traces"] == 1 and summary["recorded_traces"] == 0

    [sample], stats = read_back(tmp_path / "out")
    assert stats.kept == 1 and sample.words == words
    norm = np.asarray(boxes) / [W, H, W, H]
    np.testing.assert_allclose(sample.word_boxes, norm, atol=TOL, rtol=0)
    centres = np.stack([(norm[:, 0] + norm[:, 2]) / 2, (norm[:, 1] + norm[:, 3]) / 2], axis=1)
    np.testing.assert_allclose(sample.word_centres, centres, atol=TOL, rtol=0)
    record = json.loads((tmp_path / "out" / export.LN_FILE).read_text())
    starts = [u["start_time"] for u in record["timed_caption"]]
    if timing == "separable":
        assert starts == [u["start_time"] for u in timed]
    else:
        assert starts == pytest.approx([i * (export.WORD_SECONDS + export.GAP_SECONDS) for i in range(len(words))])
    assert sum(len(s) for s in record["traces"]) == 16 * len(words)


def test_synthesised_trace_visits_every_corner_and_stays_inside_the_box():
    boxes = np.array([[0.1, 0.2, 0.4, 0.6]])
    [points] = export.synthesise_trace(boxes, [{"utterance": "x", "start_time": 0.0, "end_time": 0.4}])
    xy = {(p["x"], p["y"]) for p in points}
    assert {(0.1, 0.2), (0.4, 0.2), (0.4, 0.6), (0.1, 0.6)} <= xy
    assert all(0.1 <= p["x"] <= 0.4 and 0.2 <= p["y"] <= 0.6 for p in points)
    assert [p["t"] for p in points] == sorted(p["t"] for p in points)


def test_records_have_exactly_the_seven_official_keys(store, tmp_path):
    rng = np.random.default_rng(3)
    traces, edges = recorded_trace(rng, 2)
    add_caption(store, 4, ["a", "b"], random_boxes(rng, 2), traces=traces,
                timed_caption=[{"utterance": "a", "start_time": 0.0, "end_time": 1.0},
                               {"utterance": "b", "start_time": 1.0, "end_time": 2.0}])
    add_caption(store, 5, ["c"], random_boxes(rng, 1))
    export.export_corrections(store, tmp_path / "out")
    lines = (tmp_path / "out" / export.LN_FILE).read_text().splitlines()
    assert len(lines) == 2
    for line in lines:
        record = json.loads(line)
        assert tuple(record) == LN_KEYS
        assert set(record["timed_caption"][0]) == {"utterance", "start_time", "end_time"}
        assert set(record["traces"][0][0]) == {"x", "y", "t"}
        image = tmp_path / "out" / "images" / f"{record['image_id']}.png"
        assert image.is_file()


def test_only_the_requested_statuses_are_exported(store, tmp_path):
    rng = np.random.default_rng(4)
    add_caption(store, 6, ["draft"], random_boxes(rng, 1), status="draft")
    sub = add_caption(store, 7, ["submitted"], random_boxes(rng, 1))
    rej = add_caption(store, 8, ["rejected"], random_boxes(rng, 1))
    store.review(rej, "bob", accept=False)
    acc = add_caption(store, 9, ["accepted"], random_boxes(rng, 1))
    store.review(acc, "bob", accept=True)
    summary = export.export_corrections(store, tmp_path / "a")
    assert summary["ln_records"] == 2 and summary["images"] == 2
    words = sorted(s.words[0] for s in read_back(tmp_path / "a")[0])
    assert words == ["accepted", "submitted"]
    assert export.export_corrections(store, tmp_path / "b", ["accepted"])["ln_records"] == 1
    # re-exported into the same folder, the images of corrections no longer selected go too, and only those the
    # earlier export wrote (its manifest): not a data folder's own images, even sha256-named ones
    own = {"train_000000.png", "f" * 64 + ".png"}
    for name in own:
        (tmp_path / "a" / export.IMAGES_DIR / name).write_bytes(b"a data folder's own image")
    again = export.export_corrections(store, tmp_path / "a", ["accepted"])
    left = {p.name for p in (tmp_path / "a" / export.IMAGES_DIR).iterdir()}
    assert again["images"] == 1 and len(left) == 3 and own < left
    assert (tmp_path / "a" / export.IMAGE_MANIFEST).read_text().split() == sorted(left - own)
    # a data folder holding one of the store's images already: the export finds it there, does not claim it, and
    # a later export that no longer needs it leaves it
    data = tmp_path / "data"
    (data / export.IMAGES_DIR).mkdir(parents=True)
    first = export.export_corrections(store, tmp_path / "probe", ["accepted"])
    accepted_image = next((tmp_path / "probe" / export.IMAGES_DIR).iterdir())
    shutil.copyfile(accepted_image, data / export.IMAGES_DIR / accepted_image.name)
    assert first["images"] == 1
    export.export_corrections(store, data, ["accepted"])
    assert (data / export.IMAGE_MANIFEST).read_text() == ""
    export.export_corrections(store, data, ["submitted"])
    assert (data / export.IMAGES_DIR / accepted_image.name).is_file()
    # an export made before there was a manifest: its own images are known from its LN and COCO files
    old = tmp_path / "old"
    export.export_corrections(store, old)
    (old / export.IMAGE_MANIFEST).unlink()
    export.export_corrections(store, old, ["accepted"])
    assert len(list((old / export.IMAGES_DIR).iterdir())) == 1
    assert read_back(tmp_path / "a")[0][0].words == ["accepted"]
    with pytest.raises(ValueError):
        export.export_corrections(store, tmp_path / "c", ["maybe"])
    with pytest.raises(ValueError, match="the annotation store's own folder"):  # its images/ is the store's
        export.export_corrections(store, store.root)
    assert sub


# ------------------------------------------------------------------------------------------ COCO regions

def test_region_corrections_become_coco_annotations(store, tmp_path):
    sha = store.add_image(png_bytes(10), W, H)
    refer = store.log_generation(sha, "refer", ["the red circle"], [[1, 2, 30, 40]], model_id="m",
                                 model_version="v", prompts={"expressions": ["the red circle"]})
    store.save_correction(annotator="ann", generation_id=refer, status="submitted", words=["the red circle"],
                          boxes=[[10, 20, 50, 60]])
    dense = store.log_generation(sha, "dense", ["small blue star", "large cross"], [[0, 0, 5, 5], [5, 5, 9, 9]],
                                 model_id="m", model_version="v")
    store.save_correction(annotator="ann", generation_id=dense, status="submitted",
                          words=["small blue star", "large green cross"], boxes=[[0, 0, 8, 6], [50, 50, 150, 110]])
    add_caption(store, 11, ["small", "red", "cross"], [[5, 5, 25, 25]] * 3,
                prompts={"box": [4.0, 4.0, 26.0, 27.0], "points": [], "point_labels": [], "text": None})

    summary = export.export_corrections(store, tmp_path / "out")
    assert summary["regions"] == 4 and summary["ln_records"] == 1 and summary["images"] == 2
    coco = json.loads((tmp_path / "out" / export.COCO_FILE).read_text())
    assert set(coco) >= {"images", "annotations", "categories"}
    assert coco["categories"] == [{"id": 1, "name": "object", "supercategory": "object"}]
    ids = {img["id"] for img in coco["images"]}
    for img in coco["images"]:
        assert (tmp_path / "out" / img["file_name"]).is_file() and (img["width"], img["height"]) == (W, H)
    by_text = {a.get("expression") or a.get("caption"): a for a in coco["annotations"]}
    assert by_text["the red circle"]["bbox"] == [10, 20, 40, 40] and by_text["the red circle"]["task"] == "refer"
    assert "expression" in by_text["the red circle"] and "caption" not in by_text["the red circle"]
    assert by_text["large green cross"]["bbox"] == [50, 50, 100, 60]
    assert by_text["large green cross"]["area"] == 6000
    assert by_text["small red cross"]["bbox"] == [4, 4, 22, 23] and by_text["small red cross"]["task"] == "caption"
    for ann in coco["annotations"]:
        assert ann["image_id"] in ids and ann["category_id"] == 1 and len(ann["bbox"]) == 4
    assert len({a["id"] for a in coco["annotations"]}) == 4


def test_no_region_corrections_means_no_coco_file_and_a_stale_one_is_removed(store, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / export.COCO_FILE).write_text("{}")
    add_caption(store, 12, ["a"], [[0, 0, 1, 1]])
    summary = export.export_corrections(store, out)
    assert summary["coco_file"] is None and not (out / export.COCO_FILE).exists()


# ------------------------------------------------------------------------------------------ paths

@pytest.mark.parametrize("name", ["../x.png", "..", "/etc/passwd", "a/../../b", "images/../../x", "", "a\x00b",
                                  "C:\\evil", "..\\evil"])
def test_safe_join_refuses_names_that_leave_the_folder(tmp_path, name):
    with pytest.raises(ValueError):
        export.safe_join(tmp_path, name)


@pytest.mark.parametrize("name", ["", ".", "..", "../a", "a/b", "/abs", ".hidden", "a" * 200, "x\x00"])
def test_safe_id_refuses_path_like_ids(name):
    with pytest.raises(ValueError):
        export.safe_id(name)


def test_safe_join_accepts_plain_names(tmp_path):
    assert export.safe_join(tmp_path, "images", "abc.png") == (tmp_path / "images" / "abc.png").resolve()
    assert export.safe_id("shapes_000001.v2") == "shapes_000001.v2"


def test_a_symlinked_images_folder_pointing_outside_is_refused(store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "images").symlink_to(outside, target_is_directory=True)
    add_caption(store, 13, ["a"], [[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="outside the export folder"):
        export.export_corrections(store, out)
    assert list(outside.iterdir()) == []


def test_a_tampered_image_path_in_the_store_is_skipped(store, tmp_path, capsys):
    (tmp_path / "secret.png").write_bytes(png_bytes(99))
    cid = add_caption(store, 14, ["a"], [[0, 0, 1, 1]])
    sha = store.get_correction(cid)["image_sha"]
    with contextlib.closing(sqlite3.connect(store.path)) as conn, conn:
        conn.execute("UPDATE images SET path = '../../secret.png' WHERE sha256 = ?", [sha])
    summary = export.export_corrections(store, tmp_path / "out")
    assert summary["skipped"]["unsafe_image_path"] == 1 and summary["ln_records"] == 0
    assert not (tmp_path / "out" / "images").exists()
    assert export.main(["--db", str(store.path), "--out", str(tmp_path / "out")]) == 1  # says why nothing came
    assert "every selected correction was skipped (1 unsafe image path)" in capsys.readouterr().err


def test_an_export_where_every_correction_is_skipped_leaves_no_folder_it_made(store, tmp_path, capsys):
    """Every selected correction skipped (a tampered image path, an image file gone): nothing was written and the
    CLI said "... was not touched", but the new export folder (and its parents) it had made stayed behind, empty.
    A folder that was there before stays."""
    unsafe, missing = (add_caption(store, seed, ["a"], [[0, 0, 1, 1]]) for seed in (19, 20))
    with contextlib.closing(sqlite3.connect(store.path)) as conn, conn:
        conn.execute("UPDATE images SET path = '../../secret.png' WHERE sha256 = ?",
                     [store.get_correction(unsafe)["image_sha"]])
    [gone] = [row["image_path"] for row in store.training_examples(["submitted"]) if row["id"] == missing]
    Path(gone).unlink()
    new = tmp_path / "exports" / "new"
    summary = export.export_corrections(store, new)
    assert summary["ln_file"] is None
    assert summary["skipped"] == {"no_words": 0, "missing_image": 1, "unsafe_image_path": 1}
    assert not (tmp_path / "exports").exists()
    assert export.main(["--db", str(store.path), "--out", str(new)]) == 1
    assert "every selected correction was skipped (1 missing image, 1 unsafe image path)" in capsys.readouterr().err
    assert not (tmp_path / "exports").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    assert export.export_corrections(store, existing)["ln_file"] is None
    assert existing.is_dir() and not any(existing.iterdir())


def test_an_image_stored_after_the_skip_check_does_not_get_an_unlocked_export(store, tmp_path, monkeypatch):
    """The decision that every row is skipped (so no new folder is made, and no lock taken) must be the one the
    export acts on: asked again per row, an image stored in between made the unlocked export write its files."""
    add_caption(store, 21, ["a"], [[0, 0, 1, 1]])
    asked = []

    def missing_only_the_first_time(row, store_root):  # the image file appears right after the first look
        asked.append(row["id"])
        return "missing_image" if len(asked) == 1 else None

    monkeypatch.setattr(export, "skip_reason", missing_only_the_first_time)
    new = tmp_path / "exports" / "new"
    summary = export.export_corrections(store, new)
    assert summary["ln_file"] is None and summary["skipped"]["missing_image"] == 1
    assert not (tmp_path / "exports").exists()


def test_a_db_that_is_no_store_is_refused_and_left_as_it_was(tmp_path, capsys):
    """`--db` an empty file (a `touch`ed name, a failed copy) or a SQLite database without tables: export only
    reads, yet it made the file a new empty store (73 KB of tables) and said "nothing exported". One line now,
    exit 2, the file byte for byte as it was and nothing beside it; a missing file is still "no annotation store
    at …" and is not made."""
    empty, blank = tmp_path / "zero.db", tmp_path / "blank.db"
    empty.write_bytes(b"")
    with contextlib.closing(sqlite3.connect(blank)) as conn:
        conn.execute("PRAGMA user_version = 7")  # written into the file's header: a SQLite file with no table
    for db, what in ((empty, "an empty file"), (blank, "a SQLite database without tables")):
        before = db.read_bytes()
        assert export.main(["--db", str(db), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err == f"export failed: {db} is not an annotation store ({what}); it was left as it was\n"
        assert db.read_bytes() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.db", "zero.db"]  # no -wal, no out folder
    with pytest.raises(StoreError, match="no annotation store at"):
        AnnotationStore(tmp_path / "missing.db", create=False)
    assert export.main(["--db", str(tmp_path / "missing.db"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"no annotation store at {tmp_path / 'missing.db'}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.db", "zero.db"]


def test_an_empty_db_beside_a_wal_file_is_refused_and_the_wal_left_as_it_was(tmp_path, capsys):
    """A failed copy of a live store: `annotations.db` empty, its `-wal` (the commits not yet in the main file) and
    `-shm` copied whole. SQLite deletes the `-wal` of an empty database when it opens it, so the refusal that said
    "it was left as it was" had deleted the file beside it. An empty file is refused before SQLite opens it."""
    live = AnnotationStore(tmp_path / "live" / "annotations.db")
    try:
        live.add_image(png_bytes(1), W, H)  # committed to the WAL, not yet checkpointed into the main file
        copy = tmp_path / "copy"
        copy.mkdir()
        for suffix in ("-wal", "-shm"):
            shutil.copyfile(f"{live.path}{suffix}", copy / f"annotations.db{suffix}")
    finally:
        live.close()
    (copy / "annotations.db").write_bytes(b"")
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    assert before["annotations.db-wal"]
    assert export.main(["--db", str(copy / "annotations.db"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"export failed: {copy / 'annotations.db'} is not an annotation store (an empty file); it was left " \
                  "as it was\n"
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before


def test_an_out_in_the_stores_images_folder_is_refused_before_anything_is_written(store, tmp_path, capsys):
    """`--out <store folder>/images` wrote the LN file, the manifest, the COCO file and an images/ folder among the
    store's images (only the store's folder itself was refused). That folder, or one inside it, is refused in one
    line and nothing is made there."""
    add_caption(store, 23, ["a"], [[0, 0, 1, 1]])
    images = store.root / "images"
    before = sorted(p.name for p in images.iterdir())
    for out, said in ((images, "is inside the annotation store's images folder"),
                      (images / "export", "is inside the annotation store's images folder"),
                      (store.root, "is the annotation store's own folder")):
        assert export.main(["--db", str(store.path), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"export failed: --out {out} {said}") and len(err.splitlines()) == 1, err
        assert sorted(p.name for p in images.iterdir()) == before
    assert export.main(["--db", str(store.path), "--out", str(tmp_path / "elsewhere")]) == 0


def test_cli_writes_the_export_and_prints_the_summary(store, tmp_path, capsys):
    add_caption(store, 15, ["a", "b"], [[0, 0, 1, 1], [2, 2, 3, 3]])
    out = tmp_path / "cli"
    assert export.main(["--db", str(store.path), "--out", str(out), "--statuses", "submitted"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ln_records"] == 1 and (out / export.LN_FILE).is_file()
    assert export.main(["--db", str(tmp_path / "missing.db"), "--out", str(out)]) == 2
    capsys.readouterr()
    stranger = tmp_path / "other.db"  # a SQLite file, but not an annotation store: a message, no traceback
    with contextlib.closing(sqlite3.connect(stranger)) as conn, conn:
        conn.execute("CREATE TABLE t (x)")
    assert export.main(["--db", str(stranger), "--out", str(out)]) == 2
    assert "not an annotation store" in capsys.readouterr().err


def test_an_empty_selection_writes_nothing_and_an_earlier_export_stays(store, tmp_path, capsys):
    """An export selecting nothing (another --statuses, a new or emptied store) used to rewrite the folder as an
    empty export: its LN file emptied and its images removed, the only copy if the store it came from is gone."""
    add_caption(store, 16, ["kept"], [[0, 0, 1, 1]])
    out = tmp_path / "out"
    assert export.export_corrections(store, out)["ln_records"] == 1
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert len(before) == 3  # the LN file, its image and the manifest
    summary = export.export_corrections(store, out, ["accepted"])  # nothing accepted
    assert summary["ln_records"] == 0 and summary["ln_file"] is None
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert export.main(["--db", str(store.path), "--out", str(out), "--statuses", "rejected"]) == 1
    assert "nothing exported: no rejected corrections" in capsys.readouterr().err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not export.export_corrections(store, tmp_path / "new", ["accepted"])["ln_records"]
    assert not (tmp_path / "new").exists()  # not even created
# ------------------------------------------------------------------------------------------ kills and two at once

# `python -m training.export ARGS` in a child process, stopped at a known point: STOP=copy dies (os._exit: no
# `finally`, as a SIGKILL) right after its second image copy; STOP=ln says "paused" when it is about to write the
# LN file and waits for a line on stdin (or a Ctrl+C: SIGINT), then goes on. Without STOP it says "started" and runs.
_EXPORT_STOPPED = """import os, shutil, signal, sys
import training.export as export
signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal: a background job of a script ignores it
stop = os.environ.get("STOP")
copied = []
real_copy, real_write = shutil.copyfile, export.write_atomically
def copy_then_die(source, target):
    real_copy(source, target)
    copied.append(target)
    if stop == "copy" and len(copied) == 2:
        os._exit(9)
def pause_before_ln(target, data):
    if stop == "ln" and str(target).endswith(export.LN_FILE):
        print("paused", flush=True)
        sys.stdin.readline()
    real_write(target, data)
shutil.copyfile, export.write_atomically = copy_then_die, pause_before_ln
print("started", flush=True)
sys.exit(export.main(sys.argv[1:]))
"""


def _export_child(stop: str | None, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), STOP=stop or "")
    proc = subprocess.Popen([sys.executable, "-c", _EXPORT_STOPPED, *args], cwd=ROOT, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout.readline().strip() == "started"
    return proc


def _accepted_and_submitted(store, n: int = 4) -> tuple[set[str], set[str]]:
    """n captions on n images, every other one accepted; the images' export names (accepted, submitted)."""
    for seed in range(n):
        correction = add_caption(store, 30 + seed, ["a", "b"], [[0, 0, 9, 9], [20, 20, 30, 30]])
        if seed % 2 == 0:
            store.review(correction, "bob", accept=True)
    accepted, submitted = ({row["image_sha"] + ".png" for row in store.training_examples([status])}
                           for status in ("accepted", "submitted"))
    assert len(accepted) == len(submitted) == n // 2
    return accepted, submitted


def _check_whole(out: Path, images: set[str]) -> None:
    """`out` is a whole export of exactly `images`: its LN file names them and they are there, its manifest claims
    them, and images/ holds nothing else."""
    named = {s.image_id + ".png" for s in read_back(out)[0]}
    assert named == images
    assert {p.name for p in (out / export.IMAGES_DIR).iterdir()} == images
    assert set((out / export.IMAGE_MANIFEST).read_text().split()) == images


def test_an_export_killed_while_it_copies_images_is_finished_by_the_rerun_and_cleaned_by_later_ones(store,
                                                                                                     tmp_path):
    """Killed after copying two of four images, the rerun found them already there and never claimed them in its
    manifest, as if they were the folder's own: a later export that no longer selects their corrections left them
    in images/ for good (the folder had to be cleaned by hand)."""
    accepted, submitted = _accepted_and_submitted(store)
    out = tmp_path / "out"
    db = ["--db", str(store.path), "--out", str(out)]
    killed = _export_child("copy", *db)
    killed.communicate(timeout=120)
    assert killed.returncode == 9
    assert len(list((out / export.IMAGES_DIR).iterdir())) == 2
    assert export.main(db) == 0  # the rerun
    _check_whole(out, accepted | submitted)
    assert export.main([*db, "--statuses", "accepted"]) == 0
    _check_whole(out, accepted)


def test_a_second_export_into_the_same_folder_waits_for_the_first(store, tmp_path):
    """An export of every correction paused before its LN file while an export of the submitted ones into the same
    folder ran: the second removed the accepted corrections' images (an earlier export's, no longer selected), then
    the first wrote its LN file naming them, exit 0 for both: an export whose LN file names missing images."""
    accepted, submitted = _accepted_and_submitted(store)
    out = tmp_path / "out"
    db = ["--db", str(store.path), "--out", str(out)]
    assert export.main([*db, "--statuses", "accepted"]) == 0
    first = _export_child("ln", *db)
    assert first.stdout.readline().strip() == "paused"
    second = _export_child(None, *db, "--statuses", "submitted")
    with contextlib.suppress(subprocess.TimeoutExpired):
        second.wait(timeout=2)  # it ran to the end here before the fix; now it waits for the first
    outputs = [proc.communicate("go\n" if proc is first else None, timeout=120)[0] for proc in (first, second)]
    assert (first.returncode, second.returncode) == (0, 0), outputs
    _check_whole(out, submitted)  # the last export, whole


def test_ctrl_c_ends_an_export_in_one_line_and_the_rerun_finishes_it(store, tmp_path):
    """Ctrl+C (a real SIGINT) while an export wrote its folder was a KeyboardInterrupt traceback. One line now, exit
    130, saying the folder may be part-way (here: this export's images copied, the LN file still the earlier
    export's); the rerun makes it whole."""
    import signal

    accepted, submitted = _accepted_and_submitted(store)
    out = tmp_path / "out"
    db = ["--db", str(store.path), "--out", str(out)]
    assert export.main([*db, "--statuses", "accepted"]) == 0
    child = _export_child("ln", *db)
    assert child.stdout.readline().strip() == "paused"
    child.send_signal(signal.SIGINT)
    said = child.communicate(timeout=120)[0]
    assert child.returncode == 130 and said.splitlines() == [
        f"export: interrupted; {out} may be part-way through this export (some images copied, one perhaps cut "
        "short; the LN and COCO files not both of this export yet): run the command again to finish it"], said
    assert {s.image_id + ".png" for s in read_back(out)[0]} == accepted  # the earlier export's LN file
    assert {p.name for p in (out / export.IMAGES_DIR).iterdir()} == accepted | submitted
    assert export.main(db) == 0
    _check_whole(out, accepted | submitted)


def test_ctrl_c_while_an_export_waits_for_another_says_it_wrote_nothing(store, tmp_path):
    """Ctrl+C (a real SIGINT) while an export waited for another export's lock on its folder said the folder "may be
    part-way through this export (some images copied …)": it had written nothing. It says so now, exit 130, and
    the folder is as the other export left it."""
    import signal
    import threading

    from pixelllm.files import exclusive_lock

    if not Path("/proc/locks").exists():
        pytest.skip("needs /proc/locks to see the export waiting on the folder's lock")
    _accepted_and_submitted(store)
    out = tmp_path / "out"
    db = ["--db", str(store.path), "--out", str(out)]
    assert export.main([*db, "--statuses", "accepted"]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with exclusive_lock(out, wait=False):  # another export writing the folder
        child = _export_child(None, *db)
        for _ in range(6000):  # until it waits on the lock (/proc/locks marks a blocked request "->")
            if any("->" in line and f" {child.pid} " in line for line in Path("/proc/locks").read_text().splitlines()):
                break
            assert child.poll() is None
            threading.Event().wait(0.01)
        child.send_signal(signal.SIGINT)
        said = child.communicate(timeout=120)[0]
    assert child.returncode == 130 and said.splitlines() == [
        f"export: interrupted while waiting for another export into {out} to finish; this export wrote nothing: run "
        "the command again to export"], said
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_an_export_where_the_folder_cannot_be_locked_still_exports(store, tmp_path, monkeypatch):
    """NFS emulates flock with POSIX locks, which refuse a folder opened read-only (EBADF): the export lock made
    every export on such a folder (a lab's network home) fail. It goes on unlocked; a lock held elsewhere still
    stops a non-waiting caller."""
    import errno
    import fcntl

    from pixelllm.files import exclusive_lock

    add_caption(store, 17, ["nfs"], [[0, 0, 1, 1]])

    def no_locks(fd, operation):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert export.export_corrections(store, tmp_path / "out")["ln_records"] == 1
    assert read_back(tmp_path / "out")[0][0].words == ["nfs"]

    def held(fd, operation):
        raise BlockingIOError(errno.EWOULDBLOCK, "Resource temporarily unavailable")

    monkeypatch.setattr(fcntl, "flock", held)
    with pytest.raises(BlockingIOError), exclusive_lock(tmp_path / "lockfile", wait=False):
        pass


def test_an_export_selecting_nothing_never_removes_a_folder_another_export_waits_on(store, tmp_path, monkeypatch):
    """An export selecting nothing into a new folder made it, locked it and removed it at the end: a second export
    into that folder, waiting on the lock, then held a lock on a removed folder (and wrote into a new one no other
    export could see locked), or, opening it just after the removal, created a file where the folder had been."""
    import threading

    from pixelllm.files import exclusive_lock

    add_caption(store, 18, ["wanted"], [[0, 0, 1, 1]])  # submitted, none accepted
    out = tmp_path / "new"
    a_inside, release_a, b_inside, release_b = (threading.Event() for _ in range(4))
    real_export = export._export

    def paused(store_, out_, statuses, rows, reasons=None):
        inside, release = (a_inside, release_a) if statuses == ["accepted"] else (b_inside, release_b)
        inside.set()
        assert release.wait(60)
        return real_export(store_, out_, statuses, rows, reasons)

    def waiting_on_a_lock() -> bool:  # a flock request blocked in this process (/proc/locks marks it "->")
        return any("->" in line and "FLOCK" in line and f" {os.getpid()} " in line
                   for line in Path("/proc/locks").read_text().splitlines())

    if not Path("/proc/locks").exists():
        pytest.skip("needs /proc/locks to see an export waiting on the folder's lock")
    monkeypatch.setattr(export, "_export", paused)
    results = {}
    a = threading.Thread(target=lambda: results.setdefault("a", export.export_corrections(store, out, ["accepted"])))
    b = threading.Thread(target=lambda: results.setdefault("b", export.export_corrections(store, out, ["submitted"])))
    a.start()
    assert a_inside.wait(60)
    b.start()
    for _ in range(6000):  # b either runs at once, or waits on a's lock
        if b_inside.is_set() or waiting_on_a_lock():
            break
        threading.Event().wait(0.01)
    release_a.set()
    a.join(60)
    assert b_inside.wait(60) and results["a"]["ln_file"] is None
    try:
        assert out.is_dir()  # the folder b holds is the folder, and a third export waits for b
        with pytest.raises(BlockingIOError), exclusive_lock(out, wait=False):
            pass
    finally:
        release_b.set()
        b.join(60)
    assert results["b"]["ln_records"] == 1 and read_back(out)[0][0].words == ["wanted"]
