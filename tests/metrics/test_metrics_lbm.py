"""Tests for training/lbm.py: LBM, the trace metric (chunks, windows, column capacity, symmetry, invariances, the
dataset mean).

Every expected value is computed by hand in the comments next to it (or follows from a property of the
definition stated in docs/metrics.md), never by the code under test.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.lbm import lbm, lbm_dataset

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
