"""Tests for training/metrics.py: caption normalisation, dense-caption AP, and object recall and hallucination.

Every expected value is computed by hand in the comments next to it (or follows from a property of the
definition stated in docs/metrics.md), never by the code under test.
"""

from __future__ import annotations

import pytest

from training.metrics import (
    dense_caption_ap,
    exact_caption_match,
    normalize_caption,
    recall_and_hallucination,
)

# ----------------------------------------------------------------------------------------------- dense AP


def test_normalize_caption() -> None:
    assert normalize_caption("  The  Red-Circle. ") == "the red circle"
    assert exact_caption_match("Green  square.", "green square")
    assert not exact_caption_match("a green square", "green square")  # articles are kept


def _crafted_dense_case() -> tuple[list, list]:
    ground_truth = [
        [((0, 0, 10, 10), "red circle"), ((20, 20, 30, 30), "blue star")],
        [((0, 0, 10, 10), "green square")],
    ]
    predictions = [
        [
            ((0, 0, 10, 10), 0.9, "red circle"),  # TP: red circle
            ((1, 0, 10, 10), 0.8, "red circle"),  # duplicate (IoU 0.9 with a matched GT) -> FP
            ((20, 20, 30, 30), 0.7, "yellow star"),  # right box, wrong caption -> FP
        ],
        [((0, 0, 10, 10), 0.6, "Green  square.")],  # TP after normalisation
    ]
    return predictions, ground_truth


def test_dense_caption_ap_crafted_case() -> None:
    predictions, ground_truth = _crafted_dense_case()
    # G = 3 (blue star is missed). Ranked: TP, FP, FP, TP.
    # (P, R) after each: (1, 1/3), (1/2, 1/3), (1/3, 1/3), (2/4, 2/3).
    # Envelope: r in (0, 1/3] -> 1; r in (1/3, 2/3] -> 1/2; r in (2/3, 1] -> 0.
    # AP = 1/3 * 1 + 1/3 * 1/2 = 1/2.
    assert dense_caption_ap(predictions, ground_truth) == pytest.approx(0.5)


def test_dense_caption_ap_custom_caption_match_and_envelope() -> None:
    predictions, ground_truth = _crafted_dense_case()
    # Any caption matches: ranked TP, FP, TP (yellow star takes the blue star), TP.
    # (P, R): (1, 1/3), (1/2, 1/3), (2/3, 2/3), (3/4, 1).
    # Envelope: (0, 1/3] -> 1; (1/3, 2/3] -> max(2/3, 3/4) = 3/4; (2/3, 1] -> 3/4.
    # AP = 1/3 + 1/3 * 3/4 + 1/3 * 3/4 = 5/6.
    ap = dense_caption_ap(predictions, ground_truth, caption_match=lambda pred, ref: True)
    assert ap == pytest.approx(5 / 6)


def test_dense_caption_ap_takes_any_unmatched_eligible_gt() -> None:
    # Two overlapping GT "dog"s: (0,0,10,10) and (0,0,10,12) (IoU with the prediction 100/120 = 0.83).
    ground_truth = [[((0, 0, 10, 10), "dog"), ((0, 0, 10, 12), "dog")]]
    predictions = [[((0, 0, 10, 10), 0.9, "dog"), ((0, 0, 10, 10), 0.8, "dog")]]
    # First prediction takes the IoU-1 GT; the second still finds the 0.83 GT unmatched -> TP, TP -> AP 1.
    # (A VOC-style "only the best-IoU GT" rule would give FP and AP 0.5.)
    assert dense_caption_ap(predictions, ground_truth) == pytest.approx(1.0)


def test_dense_caption_ap_iou_threshold_and_images_without_gt() -> None:
    ground_truth = [[((0, 0, 10, 10), "dog")], []]
    # IoU of (5,0,15,10) with (0,0,10,10): inter 50, union 150 -> 1/3.
    shifted = [[((5, 0, 15, 10), 1.0, "dog")], []]
    assert dense_caption_ap(shifted, ground_truth) == pytest.approx(0.0)
    assert dense_caption_ap(shifted, ground_truth, iou_threshold=0.3) == pytest.approx(1.0)
    # A confident prediction on an image without GT is an FP: ranked FP, TP -> (P, R) = (0, 0), (1/2, 1).
    # Envelope on (0, 1] is 1/2 -> AP 1/2.
    predictions = [[((0, 0, 10, 10), 0.5, "dog")], [((0, 0, 10, 10), 0.9, "dog")]]
    assert dense_caption_ap(predictions, ground_truth) == pytest.approx(0.5)


def test_dense_caption_ap_edge_cases() -> None:
    ground_truth = [[((0, 0, 10, 10), "dog")]]
    assert dense_caption_ap([[]], ground_truth) == 0.0
    with pytest.raises(ValueError, match="without any ground-truth"):
        dense_caption_ap([[((0, 0, 1, 1), 1.0, "dog")]], [[]])
    with pytest.raises(ValueError, match="same images"):
        dense_caption_ap([[], []], ground_truth)
    with pytest.raises(ValueError, match="finite"):
        dense_caption_ap([[((0, 0, 1, 1), float("nan"), "dog")]], ground_truth)


# ----------------------------------------------------------------------------------------------- recall / hallucination


def test_recall_and_hallucination_multisets() -> None:
    rc, bs, gs = ("red", "circle"), ("blue", "star"), ("green", "square")
    present = [[rc, rc, bs], [rc], []]
    mentioned = [[rc, bs, bs, gs], [], [rc]]
    # Image 1: rc min(1, 2) = 1, bs min(2, 1) = 1 -> 2 matched of 4 mentions, 3 present.
    # Image 2: 0 matched, 1 present, 0 mentioned. Image 3: the red circle of image 2 does not count -> 0 of 1.
    # Recall = 2 / 4 = 0.5; hallucination = (5 - 2) / 5 = 0.6.
    out = recall_and_hallucination(mentioned, present)
    assert out["object_recall"] == pytest.approx(0.5)
    assert out["hallucination_rate"] == pytest.approx(0.6)


def test_recall_and_hallucination_counts_and_order() -> None:
    rc = ("red", "circle")
    # Three mentions of two present red circles: 2 matched -> recall 1, hallucination 1/3.
    out = recall_and_hallucination([[rc, rc, rc]], [[rc, rc]])
    assert out == pytest.approx({"object_recall": 1.0, "hallucination_rate": 1 / 3})
    # Attribute tuples are compared exactly: ("circle", "red") is another object.
    out = recall_and_hallucination([[("circle", "red")]], [[rc]])
    assert out == pytest.approx({"object_recall": 0.0, "hallucination_rate": 1.0})


def test_recall_and_hallucination_empty_conventions() -> None:
    assert recall_and_hallucination([[]], [[("red", "circle")]]) == {
        "object_recall": 0.0,
        "hallucination_rate": 0.0,  # nothing mentioned -> 0
    }
    assert recall_and_hallucination([[("red", "circle")]], [[]]) == {
        "object_recall": 1.0,  # nothing present -> nothing missed
        "hallucination_rate": 1.0,
    }
    with pytest.raises(ValueError, match="same images"):
        recall_and_hallucination([[]], [])
