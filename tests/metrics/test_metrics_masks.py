"""Tests for training/metrics.py: mask mean IoU and cIoU, and the point-in-mask rate.

Every expected value is computed by hand in the comments next to it (or follows from a property of the
definition stated in docs/metrics.md), never by the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest

from training.metrics import (
    mask_iou_stats,
    point_in_mask_rate,
)

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
