"""Tests for training/metrics.py.

Every expected value is computed by hand in the comments next to it (or follows from a property of the
definition stated in docs/metrics.md), never by the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.lbm import lbm, lbm_dataset
from training.metrics import (
    box_iou,
    dense_caption_ap,
    exact_caption_match,
    mask_iou_stats,
    normalize_caption,
    point_in_mask_rate,
    precision_at_iou,
    recall_and_hallucination,
    score_auroc,
)
from training.tables import format_table

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


# ----------------------------------------------------------------------------------------------- masks


def _mask(shape: tuple[int, int], pixels: list[tuple[int, int]]) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    for r, c in pixels:
        m[r, c] = True
    return m


def test_mask_mean_iou_and_ciou_differ() -> None:
    # Small object predicted perfectly: I = 1, U = 1, IoU 1.
    small_gt = _mask((4, 4), [(0, 0)])
    small_pred = small_gt.copy()
    # Large object, half predicted: gt 10 pixels, prediction 5 of them: I = 5, U = 10, IoU 0.5.
    big_gt = np.zeros((4, 5), dtype=bool)
    big_gt[:2, :] = True
    big_pred = np.zeros((4, 5), dtype=bool)
    big_pred[0, :] = True
    stats = mask_iou_stats([small_pred, big_pred], [small_gt, big_gt])
    assert stats["mean_iou"] == pytest.approx((1 + 0.5) / 2)  # 0.75
    assert stats["ciou"] == pytest.approx((1 + 5) / (1 + 10))  # 6/11 ≈ 0.545


def test_mask_empty_union_counts_as_one_in_mean_and_nothing_in_ciou() -> None:
    small = _mask((4, 4), [(0, 0)])
    big_gt = np.zeros((4, 5), dtype=bool)
    big_gt[:2, :] = True
    big_pred = np.zeros((4, 5), dtype=bool)
    big_pred[0, :] = True
    empty = np.zeros((3, 3), dtype=np.uint8)
    stats = mask_iou_stats([small, big_pred, empty], [small, big_gt, empty])
    assert stats["mean_iou"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert stats["ciou"] == pytest.approx(6 / 11)
    assert mask_iou_stats([empty], [empty]) == {"mean_iou": 1.0, "ciou": 1.0}


def test_mask_stats_disjoint_and_validation() -> None:
    a = _mask((2, 2), [(0, 0)])
    b = _mask((2, 2), [(1, 1)])
    assert mask_iou_stats([a], [b]) == {"mean_iou": 0.0, "ciou": 0.0}
    with pytest.raises(ValueError, match="equal shape"):
        mask_iou_stats([a], [np.zeros((3, 2), dtype=bool)])
    with pytest.raises(ValueError, match="at least one"):
        mask_iou_stats([], [])


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


# ----------------------------------------------------------------------------------------------- point in mask

_INSTANCES = np.array(
    [
        [0, 0, 1, 1],
        [0, 2, 2, 1],
        [0, 2, 2, 0],
    ]
)  # H = 3, W = 4


def test_point_in_mask_rate_with_map_index() -> None:
    points = [
        (2.5, 0.5),  # pixel (r0, c2) = 1, want 1 -> hit
        (1.0, 1.0),  # on a pixel corner: belongs to pixel (r1, c1) = 2, want 2 -> hit
        (0.99, 1.5),  # pixel (r1, c0) = 0, want 2 -> miss
        (4.0, 0.0),  # x == W is outside the image (even though column 3 holds object 1) -> miss
        (-0.1, 0.5),  # outside -> miss
        (3.999, 2.999),  # pixel (r2, c3) = 0, want 0 -> hit
    ]
    ids = [1, 2, 2, 1, 1, 0]
    rate = point_in_mask_rate(points, ids, [_INSTANCES], map_index=np.zeros(6, dtype=int))
    assert rate == pytest.approx(3 / 6)


def test_point_in_mask_rate_one_map_per_point_and_nan() -> None:
    other = np.full((2, 2), 7)
    points = [(0.5, 0.5), (1.5, 1.5), (float("nan"), 0.5)]
    # map 0 at (r0, c0) = 0 != 1 -> miss; map 1 at (r1, c1) = 7 -> hit; NaN -> miss.
    assert point_in_mask_rate(points, [1, 7, 7], [_INSTANCES, other, other]) == pytest.approx(1 / 3)


def test_point_in_mask_rate_validation() -> None:
    with pytest.raises(ValueError, match="one map per point"):
        point_in_mask_rate([(0.5, 0.5), (1.5, 0.5)], [1, 1], [_INSTANCES])
    with pytest.raises(ValueError, match="map_index values"):
        point_in_mask_rate([(0.5, 0.5)], [1], [_INSTANCES], map_index=[1])
    with pytest.raises(ValueError, match=r"shape \(N, 2\)"):
        point_in_mask_rate([0.5, 0.5], [1], [_INSTANCES])
    with pytest.raises(ValueError, match="at least one"):
        point_in_mask_rate(np.zeros((0, 2)), [], [])


# ----------------------------------------------------------------------------------------------- LBM


def _scalar_boxes(values: list[float]) -> np.ndarray:
    """Boxes (v, v, v + 0.1, v + 0.1): D between two of them is |v - u| (all 4 coordinates move together)."""
    return np.array([[v, v, v + 0.1, v + 0.1] for v in values])


A_BOX = (0.0, 0.0, 0.2, 0.2)
B_BOX = (0.4, 0.4, 0.6, 0.6)  # D(A, B) = mean(0.4, 0.4, 0.4, 0.4) = 0.4


def test_lbm_identical_traces_is_zero() -> None:
    trace = np.random.default_rng(0).random((45, 4))
    assert lbm(trace, trace) == pytest.approx(0.0, abs=1e-12)


def test_lbm_constant_offset() -> None:
    # Equal lengths 45: chunks [0:20], [20:40], [40:45] of both traces (c = 20); with window 0 row i may only
    # use column i, so T is the identity and every D_ii = 0.1 -> every chunk costs 0.1 -> LBM 0.1.
    trace = np.random.default_rng(1).random((45, 4))
    assert lbm(trace + 0.1, trace) == pytest.approx(0.1)
    assert lbm(trace, trace - 0.1) == pytest.approx(0.1)


def test_lbm_swapped_order_needs_a_window() -> None:
    pred = [A_BOX, B_BOX]
    gt = [B_BOX, A_BOX]
    # window 0, p = m = 2: row i may only use column i -> T = I, cost (0.4 + 0.4) / 2.
    assert lbm(pred, gt) == pytest.approx(0.4)
    # window 1: row 0 may use [-1, 2) -> {0, 1}, row 1 [0, 3) -> {0, 1}: T = the swap, cost 0.
    assert lbm(pred, gt, window=1) == pytest.approx(0.0, abs=1e-12)


def test_lbm_column_capacity_binds_with_a_window() -> None:
    # Both predicted boxes want gt column 0 (cost 0), but a column carries at most 1 unit:
    # one unit goes to column 1 at D(A, B) = 0.4 -> cost 0.4 / 2 = 0.2 (not 0).
    assert lbm([A_BOX, A_BOX], [A_BOX, B_BOX], window=1) == pytest.approx(0.2)


def test_lbm_uneven_lengths_single_chunk() -> None:
    pred = _scalar_boxes([0.5, 0.1, 0.3])  # n1 = 3 (the shorter trace)
    gt = _scalar_boxes([0.0, 0.2, 0.4, 0.6, 0.8])  # n2 = 5
    # One chunk, slice gt[0:5]; p = 3, m = 5, m/p = 5/3. Window 0: row 0 j in [0, 5/3) -> {0, 1};
    # row 1 [5/3, 10/3) -> {2, 3}; row 2 [10/3, 5) -> {4}.
    # row 0: min(|.5-0|, |.5-.2|) = .3; row 1: min(|.1-.4|, |.1-.6|) = .3; row 2: |.3-.8| = .5.
    # LBM = (.3 + .3 + .5) / 3 = 1.1 / 3. (The globally nearest boxes lie outside the windows.)
    assert lbm(pred, gt) == pytest.approx(1.1 / 3)
    # Window 1: row 0 -> [-5/3, 10/3) = {0..3}; row 1 -> [0, 5) = {0..4}; row 2 -> [5/3, 20/3) = {2, 3, 4}.
    # Every pred value is an odd tenth and every gt value an even tenth, so each row costs >= 0.1, and
    # T: row 0 -> col 3 (.6), row 1 -> col 0 (0), row 2 -> col 2 (.4) reaches 0.1 each -> LBM 0.1.
    assert lbm(pred, gt, window=1) == pytest.approx(0.1)


def test_lbm_chunk_size_and_overlapping_slices() -> None:
    pred = _scalar_boxes([0.5, 0.1, 0.3])
    gt = _scalar_boxes([0.0, 0.2, 0.4, 0.6, 0.8])
    # chunk_size 2: c = 2 * 5 / 3 = 10/3.
    # Chunk 0 = pred[0:2] vs gt[floor(0) : ceil(10/3)] = gt[0:4]; p = 2, m = 4: row 0 {0, 1}, row 1 {2, 3}.
    #   row 0: min(.5, .3) = .3; row 1: min(.3, .5) = .3 -> chunk cost .3.
    # Chunk 1 = pred[2:3] vs gt[floor(10/3) : min(5, ceil(20/3))] = gt[3:5] (gt[3] is shared with chunk 0);
    #   p = 1, m = 2: row 0 {0, 1} -> min(|.3-.6|, |.3-.8|) = .3 -> chunk cost .3.
    # LBM = (.3 + .3) / 2 = .3.
    assert lbm(pred, gt, chunk_size=2) == pytest.approx(0.3)


def test_lbm_two_chunks_with_remainder_are_averaged_unweighted() -> None:
    gt_values = [j / 100 for j in range(50)]  # n2 = 50
    # n1 = 25 -> chunks pred[0:20] vs gt[0:40] and pred[20:25] vs gt[40:50] (c = 40); in both m/p = 2,
    # so row i (global index) may use gt columns {2i, 2i+1}.
    # i < 20: pred = (2i - 1)/100 -> nearest in-window gt is column 2i at 0.01 (column 2i-1 would be 0 but is
    # outside the window) -> chunk 0 costs 0.01.
    # i >= 20: pred = 2i/100 - 0.05 -> column 2i at 0.05 (2i+1 at 0.06) -> chunk 1 costs 0.05.
    # LBM = (0.01 + 0.05) / 2 = 0.03 (a per-box mean would give (20*.01 + 5*.05) / 25 = 0.018).
    pred_values = [(2 * i - 1) / 100 if i < 20 else 2 * i / 100 - 0.05 for i in range(25)]
    pred, gt = _scalar_boxes(pred_values), _scalar_boxes(gt_values)
    assert lbm(pred, gt) == pytest.approx(0.03)
    assert lbm(gt, pred) == pytest.approx(0.03)  # the shorter trace is always the one cut into chunks


@pytest.mark.parametrize(("n1", "n2"), [(30, 47), (20, 20), (7, 3), (41, 41)])
@pytest.mark.parametrize("window", [0, 1])
def test_lbm_is_symmetric(n1: int, n2: int, window: int) -> None:
    # Swapping arguments keeps the shorter trace and D -> D^T with the same windows; on equal lengths the
    # window relation is |i - j| <= window on both sides and T is doubly stochastic, so the LP is the same.
    rng = np.random.default_rng(n1 * 100 + n2)
    a, b = rng.random((n1, 4)), rng.random((n2, 4))
    assert lbm(a, b, window=window) == pytest.approx(lbm(b, a, window=window))


def test_lbm_translation_invariant_and_scales_linearly() -> None:
    # D depends only on coordinate differences and is 1-homogeneous, so the optimal T is unchanged.
    rng = np.random.default_rng(3)
    a, b = rng.random((23, 4)), rng.random((31, 4))
    base = lbm(a, b)
    assert base > 0
    assert lbm(a + 5.0, b + 5.0) == pytest.approx(base)
    assert lbm(3.0 * a, 3.0 * b) == pytest.approx(3.0 * base)


def test_lbm_window_can_only_lower_the_cost() -> None:
    # A wider window relaxes the LP (window-0 feasible sets are contained in window-1 ones).
    rng = np.random.default_rng(4)
    a, b = rng.random((25, 4)), rng.random((37, 4))
    assert lbm(a, b, window=1) <= lbm(a, b, window=0) + 1e-12


def test_lbm_empty_traces_and_dataset_mean() -> None:
    trace = _scalar_boxes([0.1, 0.2])
    assert math.isnan(lbm(np.zeros((0, 4)), trace))
    assert math.isnan(lbm(trace, []))
    pred = _scalar_boxes([0.5, 0.1, 0.3])
    gt = _scalar_boxes([0.0, 0.2, 0.4, 0.6, 0.8])
    pairs = [
        (trace, trace),  # 0
        (np.asarray(trace) + 0.1, trace),  # 0.1 (equal lengths, identity transport)
        (pred, gt),  # 1.1 / 3 (hand-computed above)
        (np.zeros((0, 4)), trace),  # empty prediction
    ]
    assert lbm_dataset(pairs) == pytest.approx((0 + 0.1 + 1.1 / 3) / 3)  # empty image skipped
    assert lbm_dataset(pairs, empty_cost=1.0) == pytest.approx((0 + 0.1 + 1.1 / 3 + 1.0) / 4)
    assert math.isnan(lbm_dataset([(np.zeros((0, 4)), trace)]))
    assert math.isnan(lbm_dataset([]))


def test_lbm_validation() -> None:
    trace = _scalar_boxes([0.1, 0.2])
    with pytest.raises(ValueError, match="chunk_size"):
        lbm(trace, trace, chunk_size=0)
    with pytest.raises(ValueError, match="window"):
        lbm(trace, trace, window=-1)
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        lbm(trace[:, :2], trace)


# ----------------------------------------------------------------------------------------------- table


def test_format_table() -> None:
    rows = [
        {"model": "tiny", "P@0.5": 0.81234, "n": 12},
        {"model": "paper (ref)", "P@0.5": 0.898, "n": None},
    ]
    expected = "\n".join(
        [
            "model        P@0.5   n",
            "-----------  -----  --",
            "tiny         0.812  12",
            "paper (ref)  0.898   -",
        ]
    )
    assert format_table(rows) == expected


def test_format_table_column_selection_and_missing_cells() -> None:
    rows = [{"a": 1.0, "b": "x"}, {"b": "long text"}]
    expected = "\n".join(
        [
            "b             a",
            "---------  ----",
            "x          1.00",
            "long text     -",
        ]
    )
    assert format_table(rows, columns=["b", "a"], precision=2) == expected


def test_score_auroc_by_hand():
    # pairs (positive, negative): (0.9, 0.5) yes, (0.9, 0.1) yes, (0.4, 0.5) no, (0.4, 0.1) yes -> 3 of 4
    assert score_auroc([0.9, 0.4], [0.5, 0.1]) == pytest.approx(0.75)
    assert score_auroc([0.5, 0.5], [0.5]) == pytest.approx(0.5)  # ties count one half
    assert score_auroc([0.2], [0.3, 0.4]) == 0.0 and score_auroc([3.0], [1.0, 2.0]) == 1.0
    with pytest.raises(ValueError, match="positives and negatives"):
        score_auroc([], [0.1])
    with pytest.raises(ValueError, match="finite"):
        score_auroc([float("nan")], [0.1])
