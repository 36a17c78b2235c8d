"""training.export's output: the LN round trip (recorded traces, with and without timing, and traces
synthesised from moved boxes), exactly the seven official LN keys, the statuses asked for, and region corrections
as COCO annotations.

The rest of tests/export/: paths, stores and selections it refuses: test_export_refusals.py; exports killed,
interrupted or run two at once: test_export_concurrency.py. Fixtures and helpers: conftest.py."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from tests.export.conftest import H, W, add_caption, png_bytes, read_back
from training import export
from training.data.localized_narratives import LN_KEYS, utterance_targets

TOL = 1e-6


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
