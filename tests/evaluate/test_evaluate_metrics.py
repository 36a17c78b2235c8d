"""The metric layer of training/evaluate.py and training/scoring.py on the hand world (conftest.py): a perfect
stand-in gives perfect metrics, the baselines by hand, and crafted errors in referring, location captions, box
captions, dense AP, traces and mentions, each against numbers worked out in the comments.

The rest of tests/evaluate/: a generated Shapes split and the referring score: test_evaluate_shapes.py; the CLI end
to end on a random model: test_evaluate_cli.py; what the CLI refuses before the model loads:
test_evaluate_cli_refusals.py."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.evaluate.conftest import (
    BG_A,
    IN_B1,
    IN_B2,
    SGS,
    ScriptedPredictor,
    _baseline,
    _model,
    _predict,
    hand_world,
)
from training.data.shapes import parse_mentions
from training.evaluate import (
    ImagePrediction,
    ImageTruth,
    PredictedWord,
    predict_image,
)
from training.scoring import (
    caption_is_triple,
    compute_metrics,
    match_mentions,
    mention_spans,
    metrics_table,
)


def test_perfect_predictor_gives_perfect_metrics() -> None:
    truths, images, narratives = hand_world()
    predictor = ScriptedPredictor(truths, images, narratives)
    result = compute_metrics(truths, _predict(predictor, truths, images))
    for key in ("refer_p@0.5", "mask_mean_iou", "mask_ciou", "refer_score_auroc", "loc_caption_accuracy",
                "dense_ap@0.5", "trace_point_in_object", "object_recall"):
        assert _model(result, key) == pytest.approx(1.0), key
    assert _baseline(result, "refer_score_auroc") == 0.5
    quantiles = result["refer_score_quantiles"]  # present expressions all score 1.0, absent ones 0.2
    assert set(quantiles["present"].values()) == {1.0} and quantiles["absent"]["p50"] == pytest.approx(0.2)
    assert _model(result, "trace_lbm") == pytest.approx(0.0, abs=1e-12)
    assert _model(result, "trace_lbm_given_caption") == pytest.approx(0.0, abs=1e-12)
    assert _model(result, "hallucination_rate") == 0.0
    # every GT object's box is captioned in one batched call per image
    assert predictor.calls == ["caption_boxes 2", "caption_boxes 3"]
    assert result["counts"] == {"images": 2, "objects": 5, "expressions": 5, "absent_expressions": 5,
                                "dense_regions": 5,
                                "dense_predictions": 5, "trace_mentions_matched": 5, "trace_content_words": 15,
                                "lbm_images": 2, "empty_captions": 0, "traced_narratives": 2}
    assert result["targets"] == {"lbm_at_most_half_centre_baseline": True,
                                 "lbm_given_caption_at_most_half_centre_baseline": True}


def test_repetition_penalty_reaches_only_the_narrative() -> None:
    truths, images, narratives = hand_world()
    predictor = ScriptedPredictor(truths, images, narratives)
    _predict(predictor, truths, images)
    assert predictor.penalties == [None, None]  # None: the predictor uses the checkpoint's default
    for image, truth in zip(images, truths):
        predict_image(predictor, image, truth, repetition_penalty=1.3)
    assert predictor.penalties[2:] == [1.3, 1.3]


def test_baselines_by_hand() -> None:
    truths, images, narratives = hand_world()
    result = compute_metrics(truths, _predict(ScriptedPredictor(truths, images, narratives), truths, images))
    # whole-image box vs each GT box: IoU 400/1600, 100/1600, 100/800 (x3): all < 0.5
    assert _baseline(result, "refer_p@0.5") == 0.0
    # whole-image mask: IoU = area / image area: 0.25, 0.0625, 0.125 x3 -> mean 0.6875 / 5
    assert _baseline(result, "mask_mean_iou") == pytest.approx(0.1375)
    # cIoU = (400 + 100 + 300) / (1600 + 1600 + 3 * 800)
    assert _baseline(result, "mask_ciou") == pytest.approx(800 / 5600)
    # most frequent triple: small green square, 2 of 5 objects
    assert _baseline(result, "loc_caption_accuracy") == pytest.approx(0.4)
    assert _baseline(result, "dense_ap@0.5") is None
    # image centres: A (20, 20) is pixel (row 20, col 20) = object 2 -> its 3 words hit, object 1's miss;
    # B (20, 10) is pixel (row 10, col 20) = background -> 9 misses. 3 / 15
    assert _baseline(result, "trace_point_in_object") == pytest.approx(0.2)
    # one chunk per image, equal lengths, window 0 -> mean |difference| over words and the 4 coordinates
    centre = np.array([0.45, 0.45, 0.55, 0.55])
    expected = np.mean([np.mean(np.abs(t.trace - centre)) for t in truths])
    assert _baseline(result, "trace_lbm") == pytest.approx(expected)
    assert _baseline(result, "trace_lbm_given_caption") == pytest.approx(expected)  # the same words here
    # "small green square" once per image: A matches nothing, B matches one of 3 -> recall 1/5;
    # 2 mentions, 1 matched -> hallucination 1/2
    assert _baseline(result, "object_recall") == pytest.approx(0.2)
    assert _baseline(result, "hallucination_rate") == pytest.approx(0.5)


def _perfect_predictions() -> tuple[list[ImageTruth], list[ImagePrediction]]:
    truths, images, narratives = hand_world()
    return truths, _predict(ScriptedPredictor(truths, images, narratives), truths, images)


def test_referring_errors() -> None:
    truths, preds = _perfect_predictions()
    # A, "the large red circle": box (10,10,30,30) vs (0,0,20,20): IoU 100 / 700 < 0.5 -> P@0.5 = 4/5
    preds[0].refer_boxes[0] = (10.0, 10.0, 30.0, 30.0)
    # its mask: the top half of the circle's square (200 px) -> IoU 0.5
    half = truths[0].instance_map == 1
    half[10:] = False
    preds[0].refer_masks[0] = half
    result = compute_metrics(truths, preds)
    assert _model(result, "refer_p@0.5") == pytest.approx(0.8)
    assert _model(result, "mask_mean_iou") == pytest.approx((0.5 + 4) / 5)
    assert _model(result, "mask_ciou") == pytest.approx((200 + 100 + 300) / (400 + 100 + 300))


def test_location_caption_errors_and_rule() -> None:
    truths, preds = _perfect_predictions()
    preds[0].object_captions[0] = "large blue circle"  # wrong colour
    preds[1].object_captions[2] = "a large yellow hexagon and a small green square"  # two mentions
    preds[1].object_captions[0] = "A small, GREEN square."  # case and punctuation are ignored: still right
    result = compute_metrics(truths, preds)
    assert _model(result, "loc_caption_accuracy") == pytest.approx(3 / 5)
    assert caption_is_triple("the small green square", SGS)
    assert not caption_is_triple("small green", SGS)


def test_box_captions_are_aligned_with_their_objects() -> None:
    truths, images, narratives = hand_world()
    predictor = ScriptedPredictor(truths, images, narratives, reverse_box_captions=True)
    result = compute_metrics(truths, _predict(predictor, truths, images))
    # reversed: A gets [star, circle] -> 0 right; B gets [hexagon, square, square] for [square, square,
    # hexagon] -> only object 2 right. 1 / 5
    assert _model(result, "loc_caption_accuracy") == pytest.approx(0.2)


def test_dense_ap_with_duplicates_and_wrong_captions() -> None:
    truths, preds = _perfect_predictions()
    box1, box2 = truths[0].regions[0][0], truths[0].regions[1][0]
    preds[0].dense = [(box1, 0.9, "large red circle"), (box1, 0.8, "large red circle"),  # duplicate
                      (box2, 0.7, "small red star")]  # wrong colour
    preds[1].dense = [(box, 0.6 - 0.1 * k, text) for k, (box, text) in enumerate(truths[1].regions)]
    # by score: TP FP FP TP TP TP with G = 5: P = 1, .5, .33, .5, .6, .667 at R = .2, .2, .2, .4, .6, .8
    # envelope: 1 on (0, .2], .667 on (.2, .8] -> AP = .2 * 1 + .6 * 2/3 = 0.6
    result = compute_metrics(truths, preds)
    assert _model(result, "dense_ap@0.5") == pytest.approx(0.6)


def test_trace_point_in_object_errors_and_twins() -> None:
    truths, preds = _perfect_predictions()
    a_words = preds[0].words
    a_words[4] = PredictedWord("red", tuple(float(v) for v in BG_A))  # "red" off its object: 1 miss
    # a hallucinated mention: not matched to any object, so its words are not scored
    a_words += [PredictedWord(w, (0.0, 0.0, 1.0, 1.0)) for w in ("a", "small", "purple", "star.")]
    # B: the first "small green square" is traced on the right twin and the second on the left one. Mentions
    # map to twins in reading order (1st mention -> left twin), so all 6 words miss.
    b_words = preds[1].words
    for k in (1, 2, 3):
        b_words[k] = PredictedWord(b_words[k].text, tuple(float(v) for v in IN_B2))
    for k in (10, 11, 12):
        b_words[k] = PredictedWord(b_words[k].text, tuple(float(v) for v in IN_B1))
    result = compute_metrics(truths, preds)
    assert _model(result, "trace_point_in_object") == pytest.approx((15 - 1 - 6) / 15)
    assert _baseline(result, "trace_point_in_object") == pytest.approx(0.2)  # same 15 words at the centres
    assert result["counts"]["trace_mentions_matched"] == 5
    assert _model(result, "object_recall") == 1.0
    assert _model(result, "hallucination_rate") == pytest.approx(1 / 6)


def test_trace_lbm_constant_offset() -> None:
    truths, preds = _perfect_predictions()
    for truth, pred in zip(truths, preds):
        dx, dy = 0.1 * truth.width, 0.1 * truth.height  # +0.1 on every normalised coordinate
        pred.words = [PredictedWord(w.text, (w.box[0] + dx, w.box[1] + dy, w.box[2] + dx, w.box[3] + dy))
                      for w in pred.words]
    result = compute_metrics(truths, preds)
    # equal lengths, window 0: LBM = mean absolute difference = 0.1 in each image
    assert _model(result, "trace_lbm") == pytest.approx(0.1)


def test_given_caption_lbm_scores_the_trace_of_the_reference_words_only() -> None:
    """The controlled-trace LBM reads `predictor.trace` of the reference narrative, not the generated caption:
    a trace shifted by 4 px (0.1 of A's width, 0.1 of B's) costs 0.1 / 2 per image (x coordinates only) while
    the generated caption, still perfect, keeps its LBM at 0; an image without a narrative is left out."""
    truths, images, narratives = hand_world()
    predictor = ScriptedPredictor(truths, images, narratives)
    predictor.trace_shift = 4.0
    preds = _predict(predictor, truths, images)
    result = compute_metrics(truths, preds)
    assert _model(result, "trace_lbm") == pytest.approx(0.0, abs=1e-12)
    assert _model(result, "trace_lbm_given_caption") == pytest.approx(np.mean([0.1 / 2, 0.1 / 2]))
    truths[1].narrative = None
    preds = _predict(predictor, truths, images)
    assert preds[1].traced is None
    result = compute_metrics(truths, preds)
    assert result["counts"]["traced_narratives"] == 1
    assert _model(result, "trace_lbm_given_caption") == pytest.approx(0.1 / 2)


def test_empty_caption_counts_at_empty_cost_and_no_mentions_is_undefined() -> None:
    truths, preds = _perfect_predictions()
    preds[0].words = []
    result = compute_metrics(truths, preds)
    # A counts at LBM 1.0 (model and baseline, which has as many words as the caption: none); B is perfect
    assert _model(result, "trace_lbm") == pytest.approx(0.5)
    assert result["counts"]["empty_captions"] == 1
    assert _model(result, "trace_point_in_object") == 1.0  # only B's 9 content words
    preds[1].words = [PredictedWord("the", (0.0, 0.0, 1.0, 1.0))]
    result = compute_metrics(truths, preds)
    assert _model(result, "trace_point_in_object") is None
    assert _baseline(result, "trace_point_in_object") is None
    assert _model(result, "object_recall") == 0.0
    json.dumps(result, allow_nan=False)  # undefined values are null, never NaN
    assert "point-in-object" in metrics_table(result)


def test_mention_spans_follow_parse_mentions() -> None:
    words = ["A", "Large,", "RED", "circle.", "small", "small", "blue", "star", "it's", "large", "green",
             "cross!", "large", "red"]
    spans = mention_spans(words)
    assert [s[0] for s in spans] == parse_mentions(" ".join(words))
    assert [s[1] for s in spans] == [(1, 2, 3), (5, 6, 7), (9, 10, 11)]
    # one word holding several runs ("small-blue-star") maps all three to that word
    assert mention_spans(["a", "small-blue-star"]) == [(("small", "blue", "star"), (1, 1, 1))]


def test_match_mentions_reading_order() -> None:
    truths, _, _ = hand_world()
    objs = truths[1].objects
    got = match_mentions([SGS, ("large", "yellow", "hexagon"), SGS, SGS], objs)
    assert [o.object_id if o else None for o in got] == [1, 3, 2, None]
