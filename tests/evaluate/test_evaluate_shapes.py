"""Evaluation on a generated Shapes split: a perfect stand-in reading the split's own truth (loading and
alignment), `--limit`, the absent expressions of the referring score and its AUROC, and the shipped metrics.json
holding every metric of this code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.evaluate.conftest import ScriptedPredictor, _baseline, _model, _predict, hand_world
from training.data.localized_narratives import read_localized_narratives
from training.data.shapes import generate_split, load_image
from training.evaluate import (
    ImageTruth,
    ObjectTruth,
    absent_expressions,
    load_truth,
    predict_image,
)
from training.scoring import (
    METRIC_KEYS,
    compute_metrics,
)


class ShapesOracle(ScriptedPredictor):
    """The scripted predictor over a generated split; the full-image caption is the LN narrative with the LN
    word boxes (pixels)."""

    def __init__(self, root, truths: list[ImageTruth]) -> None:
        images = [load_image(root, t.file_name) for t in truths]
        samples = {s.image_id: s for s in read_localized_narratives(root / "test.ln.jsonl")[0]}
        narratives = {}
        for i, t in enumerate(truths):
            s = samples[t.image_id]
            narratives[i] = (list(s.words), (s.word_boxes * [t.width, t.height, t.width, t.height]).tolist())
        super().__init__(truths, images, narratives)


def test_oracle_on_generated_split(tmp_path) -> None:
    generate_split(tmp_path, "test", 4, seed=5)
    truths = load_truth(tmp_path, "test")
    preds = [predict_image(ShapesOracle(tmp_path, truths), load_image(tmp_path, t.file_name), t) for t in truths]
    result = compute_metrics(truths, preds)
    for key in ("refer_p@0.5", "mask_mean_iou", "mask_ciou", "loc_caption_accuracy", "dense_ap@0.5",
                "object_recall"):
        assert _model(result, key) == pytest.approx(1.0), key
    assert _model(result, "hallucination_rate") == 0.0
    assert _model(result, "trace_lbm") == pytest.approx(0.0, abs=1e-6)
    assert _model(result, "trace_lbm_given_caption") == pytest.approx(0.0, abs=1e-6)
    # The LN trace loops inside each object while its words are spoken, so its word-box centres land on
    # the object (not guaranteed for every word: boxes of a looping trace can be off-centre).
    assert _model(result, "trace_point_in_object") >= 0.9
    assert _model(result, "trace_point_in_object") > _baseline(result, "trace_point_in_object")
    assert result["counts"]["trace_content_words"] == 3 * result["counts"]["objects"]


def test_limit_and_bad_limit(tmp_path) -> None:
    generate_split(tmp_path, "test", 3, seed=5)
    assert [t.image_id for t in load_truth(tmp_path, "test", limit=2)] == ["test_000000", "test_000001"]
    with pytest.raises(ValueError, match="limit"):
        load_truth(tmp_path, "test", limit=0)
    with pytest.raises(ValueError, match="no Shapes split"):
        load_truth(tmp_path, "val")
    # a second narrative of an image is refused, not silently read in place of the first
    ln = tmp_path / "test.ln.jsonl"
    first = ln.read_text().splitlines()[0]
    ln.write_text(ln.read_text() + first + "\n")
    with pytest.raises(ValueError, match="holds 2 narratives of image 'test_000000'"):
        load_truth(tmp_path, "test")


def test_absent_expressions_swap_the_shape_for_one_the_image_lacks() -> None:
    truths, _, _ = hand_world()
    a, b = truths
    assert len(a.absent) == 2 and len(b.absent) == 3
    for truth in truths:
        shapes = {o.triple[2] for o in truth.objects}
        for present, absent in zip([e.expression for e in truth.expressions], truth.absent):
            old, new = present.split(), absent.split()
            changed = [k for k in range(len(old)) if old[k] != new[k]]
            assert len(new) == len(old) and len(changed) == 1  # only the shape word changes ...
            assert old[changed[0]] in shapes and new[changed[0]] not in shapes  # ... to one the image lacks
    assert absent_expressions("a", [e.expression for e in a.expressions], a.objects) == a.absent  # same every run
    assert absent_expressions("a", ["the small red shape"], a.objects) == []  # no shape word to swap
    every = [ObjectTruth(k, ("small", "red", shape), (0, 0, 1, 1), (0, 0)) for k, shape in
             enumerate(("circle", "square", "triangle", "star", "diamond", "hexagon"), 1)]
    assert absent_expressions("c", ["the star"], every) == []  # nothing is absent


def test_referring_score_auroc_counts_how_often_present_outscores_absent() -> None:
    """Present expressions score 1.0; absent ones 1.0 as well (a tie, 1/2 each) -> AUROC 0.5; absent above
    present -> 0."""
    truths, images, narratives = hand_world()
    predictor = ScriptedPredictor(truths, images, narratives)
    predictor.absent_score = 1.0
    assert _model(compute_metrics(truths, _predict(predictor, truths, images)), "refer_score_auroc") == 0.5
    predictor.absent_score = 1.5
    assert _model(compute_metrics(truths, _predict(predictor, truths, images)), "refer_score_auroc") == 0.0
    for truth in truths:  # no absent expressions: no AUROC
        truth.absent = []
    result = compute_metrics(truths, _predict(predictor, truths, images))
    assert _model(result, "refer_score_auroc") is None and _baseline(result, "refer_score_auroc") is None
    assert result["refer_score_quantiles"] is None


def test_the_shipped_metrics_json_holds_every_metric_of_this_code() -> None:
    """A metric added to the evaluation without re-running it on the embedded checkpoint fails here."""
    shipped = Path(__file__).resolve().parents[2] / "assets" / "checkpoints" / "shapes-tiny" / "metrics.json"
    result = json.loads(shipped.read_text())
    assert set(result["metrics"]) == set(METRIC_KEYS)
    assert result["settings"]["split"] == "test" and result["counts"]["images"] >= 500
