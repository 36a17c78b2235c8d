"""Tests for training/metrics.py: box IoU and precision at an IoU threshold (inclusive, also under float rounding).

Every expected value is computed by hand in the comments next to it (or follows from a property of the
definition stated in docs/metrics.md), never by the code under test.

The rest of tests/metrics/: masks and points in masks: test_metrics_masks.py; dense-caption AP, object recall and
hallucination: test_metrics_captions.py; LBM (training/lbm.py): test_metrics_lbm.py; the referring score's AUROC
and the results table (training/tables.py): test_metrics_auroc_and_table.py.
"""

from __future__ import annotations

import numpy as np
import pytest

from training.metrics import (
    box_iou,
    dense_caption_ap,
    precision_at_iou,
)

# ----------------------------------------------------------------------------------------------- box IoU


def test_box_iou_known_boxes() -> None:
    a = [[0, 0, 2, 2]]  # area 4
    b = [
        [1, 1, 3, 3],  # overlap 1x1 = 1, union 4 + 4 - 1 = 7 -> 1/7
        [0, 0, 2, 2],  # identical -> 1
        [5, 5, 6, 6],  # disjoint -> 0
        [0, 0, 1, 1],  # contained, area 1 -> 1/4
        [2, 0, 4, 2],  # touching along an edge: zero-area intersection -> 0
        [1, 1, 1, 3],  # zero width -> 0
        [2, 2, 0, 0],  # inverted corners -> zero area -> 0
    ]
    iou = box_iou(a, b)
    assert iou.shape == (1, 7)
    np.testing.assert_allclose(iou[0], [1 / 7, 1, 0, 1 / 4, 0, 0, 0])


def test_box_iou_shape_and_degenerate_pairs_without_nan() -> None:
    a = np.array([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 4.0, 2.0]])
    b = np.array([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 0.0, 5.0]])
    iou = box_iou(a, b)
    assert iou.shape == (2, 3)
    assert not np.isnan(iou).any()
    # point vs point: union 0 -> 0; point vs box: 0; box (0,0,4,2) area 8 vs (0,0,2,2) area 4 -> 4/8.
    np.testing.assert_allclose(iou, [[0, 0, 0], [0, 0.5, 0]])


def test_box_iou_empty_and_bad_shape() -> None:
    assert box_iou(np.zeros((0, 4)), [[0, 0, 1, 1]]).shape == (0, 1)
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        box_iou([[0, 0, 1]], [[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="NaN"):
        box_iou([[0, 0, np.nan, 1]], [[0, 0, 1, 1]])


def test_precision_at_iou() -> None:
    pred = [[0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 2, 2]]
    gt = [
        [0, 0, 2, 2],  # IoU 1 -> hit
        [1, 0, 3, 2],  # inter 2, union 6 -> 1/3 -> miss
        [0, 0, 2, 1],  # inter 2, union 4 -> exactly 0.5 -> hit (threshold is inclusive)
        [3, 3, 4, 4],  # disjoint -> miss
    ]
    assert precision_at_iou(pred, gt) == pytest.approx(2 / 4)
    assert precision_at_iou(pred, gt, threshold=0.3) == pytest.approx(3 / 4)  # 1/3 >= 0.3 now counts
    with pytest.raises(ValueError, match="pair up"):
        precision_at_iou(pred, gt[:3])
    with pytest.raises(ValueError, match="at least one"):
        precision_at_iou(np.zeros((0, 4)), np.zeros((0, 4)))


def test_iou_threshold_stays_inclusive_under_float_rounding() -> None:
    # Each pred is the left half of its gt, so IoU = 1/2 exactly: pixels with two decimals (the predictor's
    # precision), widths 20.3 and 40.6 -> (20.3 * 40) / (40.6 * 40); normalised, widths 0.2 and 0.4 -> 0.2 / 0.4.
    # In floating point both come out a few ulp below 0.5; the threshold is inclusive, so both are hits.
    pred = [[10.1, 20.0, 30.4, 60.0], [0.1, 0.0, 0.3, 1.0]]
    gt = [[10.1, 20.0, 50.7, 60.0], [0.1, 0.0, 0.5, 1.0]]
    assert precision_at_iou(pred, gt) == 1.0
    # A pred one hundredth of a pixel narrower (IoU 20.29 / 40.6 = 0.49975...) is a real miss.
    assert precision_at_iou([[10.1, 20.0, 30.39, 60.0]], [gt[0]]) == 0.0
    # Dense AP uses the same inclusive test: each pred is a TP -> P = R = 1 -> AP 1 (0 with the lost hits).
    predictions = [[(tuple(pred[0]), 0.9, "dog")], [(tuple(pred[1]), 0.8, "dog")]]
    ground_truth = [[(tuple(gt[0]), "dog")], [(tuple(gt[1]), "dog")]]
    assert dense_caption_ap(predictions, ground_truth) == pytest.approx(1.0)
