"""Evaluation metrics for PixelLLM (DESIGN.md §4 and §7), in NumPy and SciPy only.

Every metric here is defined precisely in ``docs/metrics.md``; the docstrings repeat the parts a caller needs.

Conventions shared by all functions:

* Boxes are ``(x0, y0, x1, y1)`` (XYXY) in any frame, as long as predictions and ground truth use the same
  one (pixels of the original image for the public API, or [0, 1] of the image as inside the model).
  A box with ``x1 <= x0`` or ``y1 <= y0`` has zero area.
* Points are ``(x, y)`` in continuous pixel coordinates: pixel ``(row r, column c)`` of an ``HxW`` map covers
  ``x ∈ [c, c+1)``, ``y ∈ [r, r+1)``, so the whole image is the box ``(0, 0, W, H)``.
* Bad input (wrong shapes, mismatched lengths, an empty data set where a rate is undefined) raises
  ``ValueError`` with a message saying what was wrong.

Metrics:

* :func:`box_iou`, :func:`precision_at_iou` — referring localization (RefCOCO P@0.5).
* :func:`mask_iou_stats` — referring segmentation (mean IoU and cumulative IoU).
* :func:`dense_caption_ap` — dense object captioning AP at one IoU threshold with a caption-match rule.
* :func:`recall_and_hallucination` — caption object recall and hallucination rate.
* :func:`point_in_mask_rate` — trace point-in-object accuracy.
* :func:`score_auroc` — how well a score ranks positives above negatives (area under the ROC curve).
* LBM, MITR's local bipartite matching distance between two traces of boxes, is in ``training.lbm``.
* Printing them: ``training.tables.format_table``.
"""

from __future__ import annotations

import math
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Hashable, Sequence

import numpy as np
import numpy.typing as npt
import scipy.optimize
import scipy.sparse
import scipy.stats

__all__ = [
    "as_boxes",
    "box_iou",
    "precision_at_iou",
    "mask_iou_stats",
    "normalize_caption",
    "exact_caption_match",
    "dense_caption_ap",
    "recall_and_hallucination",
    "point_in_mask_rate",
    "score_auroc",
]

Box = Sequence[float] | npt.NDArray[np.floating]

#: Slack on every IoU threshold test. An IoU equal to the threshold in exact arithmetic can come out a few ulp below
#: it in floating point (pred ``(10.1, 20, 30.4, 60)`` vs gt ``(10.1, 20, 50.7, 60)``: 20.3 / 40.6 = 0.5, computed
#: 0.49999999999999994), which made the inclusive ``IoU ≥ threshold`` exclusive there; ``IoU ≥ threshold − IOU_EPS``
#: keeps it inclusive. Far below any real IoU difference at the predictor's 0.01 px precision.
IOU_EPS = 1e-12


# --------------------------------------------------------------------------------------------------------
# Boxes


def as_boxes(boxes: npt.ArrayLike, name: str) -> npt.NDArray[np.float64]:
    """Validate and convert ``boxes`` to a float64 ``Nx4`` array (an empty input becomes ``0x4``)."""
    arr = np.asarray(boxes, dtype=np.float64)
    if arr.size == 0:
        return arr.reshape(0, 4)
    if arr.ndim != 2 or arr.shape[1] != 4:
        raise ValueError(f"{name} must have shape (N, 4) as (x0, y0, x1, y1); got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite coordinates")
    return arr


def box_iou(a: npt.ArrayLike, b: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Pairwise intersection over union of two sets of boxes.

    Args:
        a: ``Nx4`` boxes, XYXY, in any frame shared with ``b``.
        b: ``Mx4`` boxes, XYXY, same frame.

    Returns:
        ``NxM`` float64 array, ``iou[i, j] = |a_i ∩ b_j| / |a_i ∪ b_j|``. Widths and heights are clamped at 0,
        so a zero-area (or inverted) box has area 0; a pair whose union has zero area gets IoU 0, never NaN.
    """
    a = as_boxes(a, "a")
    b = as_boxes(b, "b")
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    ix0 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy0 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix1 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    union = area_a[:, None] + area_b[None, :] - inter
    iou = np.zeros_like(inter)
    np.divide(inter, union, out=iou, where=union > 0)
    return iou


def _paired_iou(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """IoU of ``a[i]`` with ``b[i]`` for ``Nx4`` arrays (the diagonal of :func:`box_iou`, in O(N))."""
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    iw = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
    ih = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
    inter = iw * ih
    union = area_a + area_b - inter
    iou = np.zeros_like(inter)
    np.divide(inter, union, out=iou, where=union > 0)
    return iou


def precision_at_iou(pred: npt.ArrayLike, gt: npt.ArrayLike, threshold: float = 0.5) -> float:
    """Referring-localization precision: the fraction of pairs ``(pred_i, gt_i)`` with IoU ≥ ``threshold``.

    Args:
        pred: ``Nx4`` predicted boxes, XYXY; ``pred[i]`` answers the i-th referring expression.
        gt: ``Nx4`` ground-truth boxes, XYXY, same frame.
        threshold: IoU threshold (inclusive); RefCOCO's P@0.5 uses 0.5.

    Returns:
        A float in [0, 1].
    """
    pred = as_boxes(pred, "pred")
    gt = as_boxes(gt, "gt")
    if len(pred) != len(gt):
        raise ValueError(f"pred and gt must pair up: got {len(pred)} predictions and {len(gt)} ground truths")
    if len(pred) == 0:
        raise ValueError("precision_at_iou needs at least one (pred, gt) pair")
    return float(np.mean(_paired_iou(pred, gt) >= threshold - IOU_EPS))


# --------------------------------------------------------------------------------------------------------
# Masks


def mask_iou_stats(
    pred_masks: Sequence[npt.ArrayLike], gt_masks: Sequence[npt.ArrayLike]
) -> dict[str, float]:
    """Referring-segmentation mask IoU, averaged per sample and cumulated over the data set.

    Args:
        pred_masks: per sample an ``HxW`` mask (any dtype; non-zero means foreground).
        gt_masks: per sample an ``HxW`` mask of the same shape as the matching prediction.

    Returns:
        ``{"mean_iou": mean_k I_k / U_k, "ciou": Σ_k I_k / Σ_k U_k}`` where ``I_k``/``U_k`` are the pixel counts
        of intersection/union of sample k. A sample whose union is empty (both masks empty) has IoU 1 in the
        mean; it adds nothing to either sum of cIoU (cIoU is 1 if every union is empty).
    """
    if len(pred_masks) != len(gt_masks):
        raise ValueError(f"got {len(pred_masks)} predicted masks and {len(gt_masks)} ground-truth masks")
    if len(pred_masks) == 0:
        raise ValueError("mask_iou_stats needs at least one sample")
    ious: list[float] = []
    total_inter = 0
    total_union = 0
    for k, (p, g) in enumerate(zip(pred_masks, gt_masks)):
        p = np.asarray(p).astype(bool)
        g = np.asarray(g).astype(bool)
        if p.ndim != 2 or p.shape != g.shape:
            raise ValueError(f"sample {k}: masks must be HxW of equal shape; got {p.shape} and {g.shape}")
        inter = int(np.count_nonzero(p & g))
        union = int(np.count_nonzero(p | g))
        ious.append(inter / union if union > 0 else 1.0)
        total_inter += inter
        total_union += union
    ciou = total_inter / total_union if total_union > 0 else 1.0
    return {"mean_iou": float(np.mean(ious)), "ciou": float(ciou)}


# --------------------------------------------------------------------------------------------------------
# Dense captioning


_WHITESPACE = re.compile(r"\s+")


def normalize_caption(text: str) -> str:
    """Normalise a caption for exact matching.

    Unicode NFKC, case-folded, every punctuation character (Unicode category ``P*`` and ASCII
    ``string.punctuation``) replaced by a space, runs of whitespace collapsed to one space, stripped.
    ``"The  Red-Circle."`` → ``"the red circle"``. Articles are kept.
    """
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(
        " " if (unicodedata.category(ch).startswith("P") or ch in string.punctuation) else ch for ch in text
    )
    return _WHITESPACE.sub(" ", text).strip()


def exact_caption_match(predicted: str, reference: str) -> bool:
    """The default caption rule of :func:`dense_caption_ap`: equality after :func:`normalize_caption`."""
    return normalize_caption(predicted) == normalize_caption(reference)


def dense_caption_ap(
    predictions: Sequence[Sequence[tuple[Box, float, str]]],
    ground_truth: Sequence[Sequence[tuple[Box, str]]],
    iou_threshold: float = 0.5,
    caption_match: Callable[[str, str], bool] = exact_caption_match,
) -> float:
    """Average precision of dense object captioning at one IoU threshold and one caption-match rule.

    Args:
        predictions: per image, a list of ``(box, score, caption)``; ``box`` XYXY in the frame of that
            image's ground truth, ``score`` any finite float (higher = more confident).
        ground_truth: per image (same order and length as ``predictions``), a list of ``(box, caption)``.
        iou_threshold: minimum IoU (inclusive) between a prediction and a ground truth to match.
        caption_match: ``caption_match(predicted, reference) -> bool``; default normalised exact match.

    Matching: all predictions of the data set are sorted by descending score (stable: ties keep image order,
    then order within the image). Each prediction in turn is a true positive if its image has a ground truth
    not yet matched with IoU ≥ ``iou_threshold`` whose caption matches; it then takes the one of highest IoU
    among those (first in list order on ties), which becomes matched. Otherwise it is a false positive
    (duplicates, wrong captions, poor boxes). Unmatched ground truths are misses.

    AP: with ``P_k = TP_k / k`` and ``R_k = TP_k / G`` after the k-th prediction (G = number of ground truths),
    AP = area under the precision envelope ``p̂(r) = max_{k: R_k ≥ r} P_k`` (0 where no such k), i.e. the
    all-point interpolation of PASCAL VOC 2010+ (no 11-point sampling).

    Returns:
        AP in [0, 1]; 0 if there are ground truths but no predictions.
    """
    if len(predictions) != len(ground_truth):
        raise ValueError(
            f"predictions and ground_truth must list the same images: got {len(predictions)} and "
            f"{len(ground_truth)}"
        )
    gt_boxes = [
        as_boxes([g[0] for g in gts], f"ground_truth[{i}] boxes") for i, gts in enumerate(ground_truth)
    ]
    num_gt = sum(len(b) for b in gt_boxes)
    if num_gt == 0:
        raise ValueError("dense_caption_ap is undefined without any ground-truth region")

    flat: list[tuple[int, npt.NDArray[np.float64], str]] = []
    scores: list[float] = []
    for i, preds in enumerate(predictions):
        for box, score, caption in preds:
            score = float(score)
            if not math.isfinite(score):
                raise ValueError(f"image {i}: prediction score must be finite, got {score}")
            flat.append((i, as_boxes([box], f"predictions[{i}] box")[0], caption))
            scores.append(score)
    if not flat:
        return 0.0
    order = np.argsort(-np.asarray(scores), kind="stable")

    matched = [np.zeros(len(b), dtype=bool) for b in gt_boxes]
    is_tp = np.zeros(len(flat), dtype=bool)
    for rank, idx in enumerate(order):
        image, box, caption = flat[idx]
        if len(gt_boxes[image]) == 0:
            continue
        ious = box_iou(box[None], gt_boxes[image])[0]
        best_j, best_iou = -1, -1.0
        for j, (_, gt_caption) in enumerate(ground_truth[image]):
            if matched[image][j] or ious[j] < iou_threshold - IOU_EPS or ious[j] <= best_iou:
                continue
            if caption_match(caption, gt_caption):
                best_j, best_iou = j, float(ious[j])
        if best_j >= 0:
            matched[image][best_j] = True
            is_tp[rank] = True

    tp = np.cumsum(is_tp)
    precision = tp / np.arange(1, len(flat) + 1)
    recall = tp / num_gt
    return _all_point_ap(recall, precision)


def _all_point_ap(recall: npt.NDArray[np.float64], precision: npt.NDArray[np.float64]) -> float:
    """Area under the monotone precision envelope (VOC 2010+ all-point interpolation)."""
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    steps = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[steps + 1] - mrec[steps]) * mpre[steps + 1]))


# --------------------------------------------------------------------------------------------------------
# Caption object recall / hallucination


def recall_and_hallucination(
    mentioned: Sequence[Sequence[Hashable]], present: Sequence[Sequence[Hashable]]
) -> dict[str, float]:
    """Caption object recall and hallucination rate, micro-averaged over the data set.

    Args:
        mentioned: per image, the objects a caption mentions, each an attribute tuple such as
            ``("large", "red", "circle")`` (any hashable; compared with ``==``, order inside a tuple matters).
        present: per image (same order), the objects really in the image, in the same form.

    Within an image, mentions and present objects are matched as multisets: a tuple occurring ``a`` times in
    the mentions and ``b`` times in the image gives ``min(a, b)`` matches. Nothing matches across images.

    Returns:
        ``{"object_recall": Σ matched / Σ |present|, "hallucination_rate": Σ (|mentioned| - matched) /
        Σ |mentioned|}``; recall is 1 if no object is present anywhere and the hallucination rate is 0 if
        nothing is mentioned anywhere (nothing was missed, nothing was invented).
    """
    if len(mentioned) != len(present):
        raise ValueError(
            f"mentioned and present must list the same images: got {len(mentioned)} and {len(present)}"
        )
    total_matched = total_present = total_mentioned = 0
    for said, there in zip(mentioned, present):
        said_counts = Counter(said)
        there_counts = Counter(there)
        total_matched += sum((said_counts & there_counts).values())
        total_present += len(there)
        total_mentioned += len(said)
    recall = total_matched / total_present if total_present else 1.0
    hallucination = (total_mentioned - total_matched) / total_mentioned if total_mentioned else 0.0
    return {"object_recall": float(recall), "hallucination_rate": float(hallucination)}


# --------------------------------------------------------------------------------------------------------
# Trace point-in-object accuracy


def point_in_mask_rate(
    points: npt.ArrayLike,
    object_ids: npt.ArrayLike,
    instance_maps: Sequence[npt.ArrayLike],
    map_index: npt.ArrayLike | None = None,
) -> float:
    """Fraction of points that fall inside the mask of their object.

    Args:
        points: ``Nx2`` float, ``(x, y)`` in pixels of the instance map's image; pixel ``(r, c)`` covers
            ``x ∈ [c, c+1)``, ``y ∈ [r, r+1)``, so a point lands in pixel ``(floor(y), floor(x))``.
        object_ids: ``(N,)`` int, the id of the object point k should lie on.
        instance_maps: ``HxW`` int arrays whose value at a pixel is the id of the object covering it
            (0 conventionally for background). Maps may differ in size.
        map_index: ``(N,)`` int, ``instance_maps[map_index[k]]`` is the map of point k. If omitted,
            ``instance_maps`` must hold exactly one map per point.

    Returns:
        ``#{k : map_k[floor(y_k), floor(x_k)] == object_ids[k]} / N``. A point outside ``[0, W) × [0, H)`` of
        its map (or with a NaN coordinate) is a miss.
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"points must have shape (N, 2) as (x, y); got {pts.shape}")
    n = len(pts)
    if n == 0:
        raise ValueError("point_in_mask_rate needs at least one point")
    ids = np.asarray(object_ids)
    if ids.shape != (n,):
        raise ValueError(f"object_ids must have shape ({n},); got {ids.shape}")
    if map_index is None:
        if len(instance_maps) != n:
            raise ValueError(
                f"without map_index, instance_maps needs one map per point: got {len(instance_maps)} maps "
                f"for {n} points"
            )
        index = np.arange(n)
    else:
        index = np.asarray(map_index)
        if index.shape != (n,) or not np.issubdtype(index.dtype, np.integer):
            raise ValueError(
                f"map_index must be an integer array of shape ({n},); got {index.dtype} {index.shape}"
            )
        if np.any(index < 0) or np.any(index >= len(instance_maps)):
            raise ValueError(f"map_index values must lie in [0, {len(instance_maps)})")
    hits = 0
    for (x, y), obj, m in zip(pts, ids, index):
        inst = np.asarray(instance_maps[m])
        if inst.ndim != 2:
            raise ValueError(f"instance map {m} must be HxW; got shape {inst.shape}")
        height, width = inst.shape
        if not (0.0 <= x < width and 0.0 <= y < height):  # also False for NaN
            continue
        hits += int(inst[int(math.floor(y)), int(math.floor(x))] == obj)
    return hits / n


# --------------------------------------------------------------------------------------------------------
# Score ranking


def score_auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Area under the ROC curve of a score: the probability that a random positive scores above a random
    negative, ties counting one half (the Mann-Whitney U statistic over ``len(positive) * len(negative)``).
    0.5 is chance (a constant score), 1.0 a score that separates the two sets completely."""
    pos = np.asarray(positive, dtype=np.float64).reshape(-1)
    neg = np.asarray(negative, dtype=np.float64).reshape(-1)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"score_auroc needs positives and negatives, got {len(pos)} and {len(neg)}")
    if not (np.isfinite(pos).all() and np.isfinite(neg).all()):
        raise ValueError("score_auroc: scores must be finite")
    u = scipy.stats.mannwhitneyu(pos, neg).statistic  # U of `pos`; a tie counts one half
    return float(u / (len(pos) * len(neg)))
