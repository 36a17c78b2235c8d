"""Tests for training/evaluate.py.

The metric layer is tested on a hand-made world of two images (every expected number is worked out in the
comments, never by the code under test), both through scripted stand-ins for ``PixelLLMPredictor`` (same
methods, same output dataclasses) and on hand-edited predictions. One test runs a perfect stand-in on a
generated Shapes split (loading and alignment), and one runs the CLI end to end on a random model (plumbing).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from pixelllm.predictor import Caption, Referral, Region, Word
from training.data.localized_narratives import read_localized_narratives
from training.data.shapes import generate_split, load_image, parse_mentions
from training.evaluate import (
    ExpressionTruth,
    ImagePrediction,
    ImageTruth,
    ObjectTruth,
    PredictedWord,
    absent_expressions,
    load_truth,
    main,
    predict_image,
)
from training.scoring import (
    METRIC_KEYS,
    caption_is_triple,
    compute_metrics,
    match_mentions,
    mention_spans,
    metrics_table,
)

# ------------------------------------------------------------------------------------------- the hand world
#
# Image A, 40x40: object 1 "large red circle" = rows 0-19, cols 0-19 (area 400, box (0,0,20,20));
#                 object 2 "small blue star"  = rows 20-29, cols 20-29 (area 100, box (20,20,30,30)).
# Image B, W=40 x H=20: twins "small green square": object 1 = rows 0-9, cols 0-9 (box (0,0,10,10)),
#                 object 2 = rows 10-19, cols 30-39 (box (30,10,40,20)); object 3 "large yellow hexagon" =
#                 rows 0-9, cols 15-24 (box (15,0,25,10)). Reading order (centre x): 1, 3, 2.
# Each object's area is 100 except A's circle (400). Images are filled with a distinct value so that the
# scripted predictor can tell them apart.

SGS = ("small", "green", "square")


def _map(height: int, width: int, rects: dict[int, tuple[int, int, int, int]]) -> np.ndarray:
    m = np.zeros((height, width), dtype=np.uint8)
    for oid, (x0, y0, x1, y1) in rects.items():
        m[y0:y1, x0:x1] = oid
    return m


def _norm_trace(boxes_px: list[tuple[float, ...]], width: int, height: int) -> np.ndarray:
    return np.array(boxes_px, dtype=np.float64) / [width, height, width, height]


BG_A, BG_B = (32, 32, 36, 36), (12, 14, 14, 16)  # function-word boxes, on background
IN_A1, IN_A2 = (8, 8, 12, 12), (24, 24, 28, 28)  # centres (10,10) in A1 and (26,26) in A2
IN_B1, IN_B3, IN_B2 = (4, 4, 6, 6), (18, 3, 22, 7), (33, 13, 37, 17)  # centres in B1, B3, B2

WORDS_A = ["I", "see", "a", "large", "red", "circle.", "There", "is", "a", "small", "blue", "star."]
BOXES_A = [BG_A] * 3 + [IN_A1] * 3 + [BG_A] * 3 + [IN_A2] * 3
WORDS_B = ["A", "small", "green", "square,", "a", "large", "yellow", "hexagon", "and", "a", "small", "green",
           "square."]
BOXES_B = [BG_B] + [IN_B1] * 3 + [BG_B] + [IN_B3] * 3 + [BG_B] * 2 + [IN_B2] * 3


def hand_world() -> tuple[list[ImageTruth], list[np.ndarray], dict[int, tuple[list[str], list]]]:
    """Truths, images and the ground-truth narrative (words, pixel boxes) of the two hand-made images."""
    a_objects = [ObjectTruth(1, ("large", "red", "circle"), (0, 0, 20, 20), (10, 10)),
                 ObjectTruth(2, ("small", "blue", "star"), (20, 20, 30, 30), (25, 25))]
    a = ImageTruth(
        image_id="a", file_name="a.png", width=40, height=40,
        instance_map=_map(40, 40, {1: (0, 0, 20, 20), 2: (20, 20, 30, 30)}), objects=a_objects,
        expressions=[ExpressionTruth("the large red circle", 1, (0, 0, 20, 20)),
                     ExpressionTruth("the star", 2, (20, 20, 30, 30))],
        regions=[((0, 0, 20, 20), "large red circle"), ((20, 20, 30, 30), "small blue star")],
        trace=_norm_trace(BOXES_A, 40, 40), narrative=WORDS_A)
    b_objects = [ObjectTruth(1, SGS, (0, 0, 10, 10), (5, 5)), ObjectTruth(2, SGS, (30, 10, 40, 20), (35, 15)),
                 ObjectTruth(3, ("large", "yellow", "hexagon"), (15, 0, 25, 10), (20, 5))]
    b = ImageTruth(
        image_id="b", file_name="b.png", width=40, height=20,
        instance_map=_map(20, 40, {1: (0, 0, 10, 10), 2: (30, 10, 40, 20), 3: (15, 0, 25, 10)}),
        objects=b_objects,
        expressions=[ExpressionTruth("the square on the left", 1, (0, 0, 10, 10)),
                     ExpressionTruth("the square on the right", 2, (30, 10, 40, 20)),
                     ExpressionTruth("the hexagon", 3, (15, 0, 25, 10))],
        regions=[((0, 0, 10, 10), "small green square"), ((30, 10, 40, 20), "small green square"),
                 ((15, 0, 25, 10), "large yellow hexagon")],
        trace=_norm_trace(BOXES_B, 40, 20), narrative=WORDS_B)
    for truth in (a, b):  # as load_truth does
        truth.absent = absent_expressions(truth.image_id, [e.expression for e in truth.expressions], truth.objects)
    images = [np.full((40, 40, 3), 1, np.uint8), np.full((20, 40, 3), 2, np.uint8)]
    narratives = {0: (WORDS_A, BOXES_A), 1: (WORDS_B, BOXES_B)}
    return [a, b], images, narratives


def _caption(words: list[str], boxes: list) -> Caption:
    return Caption(text=" ".join(words), score=1.0, words=[
        Word(text=w, box=[float(v) for v in b], index=i, token_ids=[], token_boxes=[]) for i, (w, b) in
        enumerate(zip(words, boxes))])


class ScriptedPredictor:
    """Same methods and output types as PixelLLMPredictor; answers from the ground truth (perfect), optionally
    returning the location-conditioned captions in reverse object order (a crafted error)."""

    def __init__(self, truths: list[ImageTruth], images: list[np.ndarray], narratives: dict,
                 reverse_box_captions: bool = False) -> None:
        self.truths = truths
        self.keys = {img.tobytes(): i for i, img in enumerate(images)}
        self.narratives = narratives
        self.reverse = reverse_box_captions
        self.calls: list[str] = []
        self.penalties: list[float | None] = []

    def set_image(self, image: np.ndarray) -> int:
        return self.keys[np.asarray(image).tobytes()]

    def refer(self, state: int, expressions: list[str], *, masks=True) -> list[Referral]:
        """Present expressions: their box and mask, score 1; absent ones: a corner box, score `absent_score`, and
        no mask when not asked for (as the predictor)."""
        truth = self.truths[state]
        by_text = {e.expression: e for e in truth.expressions}
        absent = getattr(self, "absent_score", 0.2)
        wanted = [masks] * len(expressions) if isinstance(masks, bool) else list(masks)
        return [Referral(expression=x, box=list(by_text[x].box), score=1.0,
                         mask=truth.instance_map == by_text[x].object_id if m else None) if x in by_text else
                Referral(expression=x, box=[0.0, 0.0, 1.0, 1.0], score=absent,
                         mask=np.zeros_like(truth.instance_map, dtype=bool) if m else None)
                for x, m in zip(expressions, wanted, strict=True)]

    def caption_boxes(self, state: int, boxes) -> list[Caption]:
        self.calls.append(f"caption_boxes {len(boxes)}")
        truth = self.truths[state]
        by_box = {tuple(float(v) for v in o.box): o for o in truth.objects}
        texts = [" ".join(by_box[tuple(float(v) for v in b)].triple) for b in np.asarray(boxes)]
        if self.reverse:
            texts = texts[::-1]
        return [_caption(t.split(), [(0, 0, 1, 1)] * 3) for t in texts]

    def dense_caption(self, state: int, *, max_regions: int, score_threshold: float, nms_iou: float
                      ) -> list[Region]:
        regions = self.truths[state].regions
        return [Region(box=list(box), score=1.0 - 0.1 * k, caption=_caption(text.split(), [box] * 3))
                for k, (box, text) in enumerate(regions)][:max_regions]

    def caption(self, state: int, box=None, max_new_tokens: int | None = None,
                repetition_penalty: float | None = None) -> Caption:
        self.penalties.append(repetition_penalty)
        words, boxes = self.narratives[state]
        return _caption(words, boxes)

    def trace(self, state: int, text: str) -> Caption:
        """The reference narrative's own boxes (perfect), shifted right by `trace_shift` pixels if set."""
        words, boxes = self.narratives[state]
        assert text == " ".join(words)
        shift = getattr(self, "trace_shift", 0.0)
        return _caption(words, [(b[0] + shift, b[1], b[2] + shift, b[3]) for b in boxes])


def _predict(predictor: ScriptedPredictor, truths: list[ImageTruth], images: list[np.ndarray]):
    return [predict_image(predictor, img, t) for img, t in zip(images, truths)]


def _model(result: dict, key: str) -> float | None:
    return result["metrics"][key]["model"]


def _baseline(result: dict, key: str) -> float | None:
    return result["metrics"][key]["baseline"]


# ------------------------------------------------------------------------------------------- perfect + baselines


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


def test_cli_rejects_a_repetition_penalty_out_of_range(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", "unused", "--data", "unused", "--repetition-penalty", "0.5"])
    assert exit_info.value.code == 2
    assert "--repetition-penalty must be between 1 (off) and 2, got 0.5" in capsys.readouterr().err


def test_cli_names_a_missing_split_or_checkpoint_in_one_line(tmp_path, capsys) -> None:
    """The user's mistakes end as argparse errors (exit 2, no traceback), the data checked before the model
    is loaded."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data")])
    assert exit_info.value.code == 2
    assert "--data/--split: no Shapes split 'test' in" in capsys.readouterr().err
    generate_split(tmp_path / "data", "test", 1, seed=3)
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "no-model"), "--data", str(tmp_path / "data")])
    assert exit_info.value.code == 2
    assert "--checkpoint: checkpoint directory not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "no-model"), "--data", str(tmp_path / "data"), "--limit", "0"])
    assert "--limit must be at least 1, got 0" in capsys.readouterr().err


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


# ------------------------------------------------------------------------------------------- crafted errors


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


# ------------------------------------------------------------------------------------------- real Shapes data


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


# ------------------------------------------------------------------------------------------- CLI smoke


def _random_tiny_checkpoint(tmp_path, data):
    """A randomly initialised tiny model (one T5 layer each side) with a tokenizer of `data`'s test captions."""
    import torch

    from pixelllm.build import build_pixelllm
    from pixelllm.config import get_config
    from pixelllm.tokenizer import train_tokenizer

    captions = [s.caption for s in read_localized_narratives(data / "test.ln.jsonl")[0]]
    tokenizer = train_tokenizer(captions * 4, vocab_size=400)
    config = get_config("tiny")
    config.t5.vocab_size = len(tokenizer)
    config.t5.num_layers = config.t5.num_decoder_layers = 1
    torch.manual_seed(0)
    build_pixelllm(config, tokenizer=tokenizer).save_pretrained(tmp_path / "ckpt")
    return config


def test_cli_smoke_random_model(tmp_path, capsys) -> None:
    """Plumbing only: a randomly initialised tiny model through the real CLI on a 3-image split. Checks that
    every metric key is in the JSON with values in [0, 1]; the numbers themselves mean nothing. The
    point-in-object rate may be null (a random caption rarely names an object); it must be null exactly when
    no content word was matched."""
    data = tmp_path / "data"
    generate_split(data, "test", 3, seed=11)
    config = _random_tiny_checkpoint(tmp_path, data)

    out = tmp_path / "out" / "eval.json"
    assert main(["--checkpoint", str(tmp_path / "ckpt"), "--data", str(data), "--limit", "3", "--json", str(out),
                 "--threads", "1", "--max-regions", "3", "--max-new-tokens", "12"]) == 0
    printed = capsys.readouterr().out
    assert "3 images" in printed and "P@0.5" in printed
    assert f"repetition penalty {config.repetition_penalty:g} (the checkpoint's default" in printed
    result = json.loads(out.read_text())
    assert set(result["metrics"]) == set(METRIC_KEYS)
    assert result["counts"]["images"] == 3
    for key, pair in result["metrics"].items():
        for side in ("model", "baseline"):
            value = pair[side]
            if value is None:
                assert key == "dense_ap@0.5" and side == "baseline" or (
                    key == "trace_point_in_object" and result["counts"]["trace_content_words"] == 0), key
            else:
                assert 0.0 <= value <= 1.0 and not math.isnan(value), (key, side, value)
    assert result["seconds"]["total"] > 0
    assert result["settings"]["lbm_empty_cost"] == 1.0
    assert result["settings"]["repetition_penalty"] == config.repetition_penalty  # the effective value


def test_several_splits_give_each_result_and_their_mean_and_standard_error(tmp_path, capsys) -> None:
    """`--split a --split b`: each split's result is the one a run on that split alone gives, and the summary is
    the mean and standard error of the per-split values (computed here by hand from the single-split runs)."""
    data = tmp_path / "data"
    generate_split(data, "test", 2, seed=11)
    generate_split(data, "other", 2, seed=12)
    _random_tiny_checkpoint(tmp_path, data)
    common = ["--checkpoint", str(tmp_path / "ckpt"), "--data", str(data), "--threads", "1", "--max-regions", "2",
              "--max-new-tokens", "8"]
    alone = {}
    for split in ("test", "other"):
        assert main([*common, "--split", split, "--json", str(tmp_path / f"{split}.json")]) == 0
        alone[split] = json.loads((tmp_path / f"{split}.json").read_text())["metrics"]
    capsys.readouterr()
    assert main([*common, "--split", "test", "--split", "other", "--json", str(tmp_path / "both.json")]) == 0
    printed = capsys.readouterr().out
    assert "[test]" in printed and "[other]" in printed and "Over 2 splits" in printed
    both = json.loads((tmp_path / "both.json").read_text())
    assert list(both["splits"]) == ["test", "other"]
    for split in ("test", "other"):
        assert both["splits"][split]["metrics"] == alone[split]
    for key in METRIC_KEYS:
        a, b = alone["test"][key]["model"], alone["other"][key]["model"]
        row = both["summary"][key]
        assert row["values"] == {"test": a, "other": b}
        if a is None or b is None:
            assert row["mean"] is None and row["se"] is None
        else:  # s.e. of two values: |a - b| / 2
            assert row["mean"] == pytest.approx((a + b) / 2) and row["se"] == pytest.approx(abs(a - b) / 2)


def test_several_splits_keep_the_finished_ones_when_a_later_one_fails(tmp_path, monkeypatch, capsys) -> None:
    """The JSON is written after every split, so a crash in the second keeps the first; a split named like a
    column of the summary table is refused before the model loads."""
    import training.evaluate as ev

    data = tmp_path / "data"
    generate_split(data, "test", 2, seed=11)
    generate_split(data, "other", 2, seed=12)
    _random_tiny_checkpoint(tmp_path, data)
    real, calls = ev.evaluate, []

    def second_fails(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*args, **kwargs)

    monkeypatch.setattr(ev, "evaluate", second_fails)
    out = tmp_path / "both.json"
    with pytest.raises(RuntimeError, match="boom"):
        main(["--checkpoint", str(tmp_path / "ckpt"), "--data", str(data), "--threads", "1", "--max-regions", "2",
              "--max-new-tokens", "8", "--split", "test", "--split", "other", "--json", str(out)])
    kept = json.loads(out.read_text())
    assert list(kept["splits"]) == ["test"] and kept["summary"] is None
    assert set(kept["splits"]["test"]["metrics"]) == set(METRIC_KEYS)
    with pytest.raises(SystemExit):
        main(["--checkpoint", "unused", "--data", str(data), "--split", "test", "--split", "mean"])
    assert "'mean' is a column of the summary table" in capsys.readouterr().err



# `python -m training.evaluate ARGS` in a child process that says "paused" before its second split and waits for a
# line on stdin (or a Ctrl+C: SIGINT, handled as at a terminal: a background job of a script ignores it)
_EVALUATE_PAUSED = """import signal, sys
import training.evaluate as ev
signal.signal(signal.SIGINT, signal.default_int_handler)
real, calls = ev.evaluate, []
def pause_before_the_second(*args, **kwargs):
    calls.append(args[2])
    if len(calls) == 2:
        print("paused", flush=True)
        sys.stdin.readline()
    return real(*args, **kwargs)
ev.evaluate = pause_before_the_second
sys.exit(ev.main(sys.argv[1:]))
"""


def test_ctrl_c_ends_an_evaluation_in_one_line_saying_what_the_json_holds(tmp_path) -> None:
    """Ctrl+C (a real SIGINT) in the middle of an evaluation was a KeyboardInterrupt traceback. One line now, exit
    130, saying what --json holds: the splits finished before, without the summary."""
    import os
    import signal
    import subprocess
    import sys

    from tests.helpers import ROOT

    data = tmp_path / "data"
    generate_split(data, "test", 2, seed=11)
    generate_split(data, "other", 2, seed=12)
    _random_tiny_checkpoint(tmp_path, data)
    out = tmp_path / "both.json"
    child = subprocess.Popen(
        [sys.executable, "-c", _EVALUATE_PAUSED, "--checkpoint", str(tmp_path / "ckpt"), "--data", str(data),
         "--threads", "1", "--max-regions", "2", "--max-new-tokens", "8", "--split", "test", "--split", "other",
         "--json", str(out)], cwd=ROOT, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1"))
    for line in child.stdout:  # the first split's table, then "paused"
        if line.strip() == "paused":
            break
    child.send_signal(signal.SIGINT)
    err = child.communicate(timeout=120)[1]
    assert child.returncode == 130 and err.splitlines() == [
        f"evaluate: interrupted; {out} holds the splits finished before (test), without the summary"], err
    kept = json.loads(out.read_text())
    assert list(kept["splits"]) == ["test"] and kept["summary"] is None


# ------------------------------------------------------------------------------------------- the referring score


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
    shipped = Path(__file__).resolve().parents[1] / "assets" / "checkpoints" / "shapes-tiny" / "metrics.json"
    result = json.loads(shipped.read_text())
    assert set(result["metrics"]) == set(METRIC_KEYS)
    assert result["settings"]["split"] == "test" and result["counts"]["images"] >= 500


def test_cli_names_a_truncated_weights_file_in_one_line(tmp_path, capsys) -> None:
    """A checkpoint whose model.safetensors was cut short (a copy or download interrupted) used to end in a
    safetensors traceback; it is an argparse error naming the file, before any image is evaluated."""
    from tests.helpers import save_small_checkpoint

    checkpoint = save_small_checkpoint(tmp_path / "model")
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    generate_split(tmp_path / "data", "test", 1, seed=3)
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(checkpoint), "--data", str(tmp_path / "data"), "--threads", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--checkpoint: {weights} is not a readable safetensors file" in err and "Traceback" not in err


@pytest.mark.parametrize("target, match", [
    ("a_folder", r"is a folder; give a file name"),
    ("a_file/results.json", r"cannot write in .*a_file"),  # its folder is a file
])
def test_cli_refuses_a_json_target_it_cannot_write_before_evaluating(tmp_path, capsys, target, match) -> None:
    """--json to a folder (or under a file) failed with a traceback only after the whole evaluation had run."""
    (tmp_path / "a_folder").mkdir()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data"),
              "--json", str(tmp_path / target)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(match, err) and "Traceback" not in err and "--checkpoint:" not in err  # refused first


def test_cli_names_the_file_and_line_of_a_malformed_jsonl_record(tmp_path, capsys) -> None:
    """A broken line of a split's JSONL was reported as json's "Expecting property name ...: line 1 column 2",
    without the file, and with a line number that was not the file's."""
    generate_split(tmp_path / "data", "test", 2, seed=3)
    refer = tmp_path / "data" / "test.refer.jsonl"
    lines = refer.read_text().splitlines()
    refer.write_text("\n".join([lines[0], "{'expression': 'single quotes'}", *lines[1:]]) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "no-model"), "--data", str(tmp_path / "data")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{refer}, line 2: not JSON" in err and "Traceback" not in err


@pytest.mark.parametrize("kind, change, match", [
    ("refer", lambda r: r.__setitem__("box", [float("nan"), 0, 50, 50]), "box has a NaN or infinite value"),
    ("refer", lambda r: r.__setitem__("box", [None, 0, 50, 50]), r"box must be \[x0, y0, x1, y1\]"),
    ("objects", lambda r: r["objects"][0].__setitem__("box", [0, 0, float("inf"), 5]), r"objects\[0\]: box has a"),
], ids=["refer-nan", "refer-null", "objects-infinity"])
def test_cli_names_a_bad_box_of_a_split_in_one_line_before_the_model_loads(tmp_path, capsys, kind, change, match
                                                                           ) -> None:
    """A NaN referring box failed in the metrics after every image was predicted (a traceback without the file), a
    null one with a TypeError traceback; an infinite object box went to the model as a box prompt."""
    generate_split(tmp_path / "data", "test", 2, seed=3)
    path = tmp_path / "data" / f"test.{kind}.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    change(lines[1])
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "no-model"), "--data", str(tmp_path / "data")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(rf"{re.escape(str(path))}, line 2: {match}", err), err
    assert "Traceback" not in err and "--checkpoint:" not in err  # refused before the model is loaded


@pytest.mark.parametrize("device, match", [("cuda", "no CUDA device is available"), ("gpu", "--device gpu: ")])
def test_cli_names_a_device_this_machine_lacks_before_the_model_loads(tmp_path, capsys, monkeypatch, device, match
                                                                     ) -> None:
    """`--device cuda` without a GPU was a RuntimeError traceback ("Found no NVIDIA driver") after the model and
    every split had loaded; app.py and the bench already said so in one line."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a machine without one, also on a GPU host
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data"), "--device", device])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert match in err and "--data/--split" not in err and "--checkpoint:" not in err  # before data and model


@pytest.mark.parametrize("flags, match", [
    (["--max-regions", "0"], "--max-regions must be a whole number between 1 and 100, got 0"),
    (["--max-new-tokens", "1000"], "--max-new-tokens must be a whole number between 1 and 512, got 1000"),
    (["--score-threshold", "2"], "--score-threshold must be between 0 and 1, got 2.0"),
    (["--score-threshold", "nan"], "--score-threshold must be between 0 and 1, got nan"),
])
def test_cli_refuses_a_decoding_or_dense_option_the_predictor_refuses_before_the_model_loads(tmp_path, capsys,
                                                                                           flags, match) -> None:
    """`--max-new-tokens 1000` (a longer narrative), `--max-regions 0` or `--score-threshold 2` passed argparse
    and failed at the first image, a ValueError traceback from the predictor, after the data and the model had
    loaded."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "no-model"), "--data", str(tmp_path / "no-data"), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert match in err and "--data/--split" not in err and "--checkpoint:" not in err  # before data and model


def test_cli_names_a_checkpoint_without_its_tokenizer_in_one_line(tmp_path, capsys) -> None:
    """A checkpoint folder that lost its tokenizer.json (the weights copied alone) loads without a tokenizer; the
    evaluation then ended in a traceback telling the user to "load it with PixelLLM.from_pretrained", which it
    had."""
    from tests.helpers import save_small_checkpoint

    checkpoint = save_small_checkpoint(tmp_path / "model")
    (checkpoint / "tokenizer.json").unlink()
    generate_split(tmp_path / "data", "test", 1, seed=3)
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(checkpoint), "--data", str(tmp_path / "data"), "--threads", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--checkpoint {checkpoint}: it has no tokenizer (tokenizer.json or spiece.model" in err, err


def test_cli_names_a_missing_image_of_a_split_in_one_line_before_the_model_loads(tmp_path, capsys) -> None:
    """A split whose images/ lacks a file (the JSONL files copied without every image) was a FileNotFoundError
    traceback when that image's turn came: after the model had loaded and every image before it was evaluated."""
    data = tmp_path / "data"
    generate_split(data, "test", 2, seed=3)
    (data / "images" / "test_000001.png").unlink()
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(tmp_path / "no-model"), "--data", str(data)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (f"--data/--split: test: image 'test_000001' (images/test_000001.png): no such file: "
            f"{data / 'images' / 'test_000001.png'}") in err and "--checkpoint:" not in err, err
