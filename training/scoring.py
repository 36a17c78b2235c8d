"""Truths and predictions -> the evaluation's numbers: the model-free third layer of `training.evaluate`.

:func:`compute_metrics` is built from :func:`referring_metrics`, :func:`location_caption_metrics`,
:func:`dense_metrics`, :func:`trace_metrics` and :func:`narrative_metrics`, each beside its trivial baseline, with
the metric functions of ``training.metrics``. The protocol is in ``docs/metrics.md`` ("Evaluation protocol").
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import stats

from training.data.shapes import ALL_SHAPES, COLORS, SIZES, parse_mentions
from training.lbm import lbm_dataset
from training.metrics import (
    dense_caption_ap,
    mask_iou_stats,
    point_in_mask_rate,
    precision_at_iou,
    recall_and_hallucination,
    score_auroc,
)
from training.tables import format_table

if TYPE_CHECKING:
    from training.evaluate import ImagePrediction, ImageTruth, ObjectTruth

Triple = tuple[str, str, str]
BoxPx = tuple[float, float, float, float]

#: An image whose generated caption has no word counts at this LBM (``lbm_dataset(empty_cost=...)``), so that
#: emitting nothing is not rewarded; the ground-truth trace of a Shapes image is never empty.
LBM_EMPTY_COST = 1.0
#: Half side of the centre-box trace baseline, in normalised coordinates: (0.45, 0.45, 0.55, 0.55).
CENTRE_BOX_HALF = 0.05
#: (key, task, metric, better, baseline description) in print order.
METRICS: tuple[tuple[str, str, str, str, str | None], ...] = (
    ("refer_p@0.5", "referring", "P@0.5", "higher", "whole-image box"),
    ("mask_mean_iou", "referring", "mask mean IoU", "higher", "whole-image mask"),
    ("mask_ciou", "referring", "mask cIoU", "higher", "whole-image mask"),
    ("refer_score_auroc", "referring", "score AUROC, present vs absent", "higher", "constant score"),
    ("loc_caption_accuracy", "location caption", "attributes exact", "higher", "most frequent triple"),
    ("dense_ap@0.5", "dense caption", "AP@0.5 (triple match)", "higher", None),
    ("trace_point_in_object", "trace", "point-in-object (content words)", "higher", "image-centre point"),
    ("trace_lbm_given_caption", "trace", "LBM, reference narrative given", "lower", "centre box ±0.05"),
    ("trace_lbm", "trace", "LBM, generated narrative", "lower", "centre box ±0.05"),
    ("object_recall", "narrative", "object recall", "higher", "most frequent triple once"),
    ("hallucination_rate", "narrative", "hallucination rate", "lower", "most frequent triple once"),
)
METRIC_KEYS = tuple(m[0] for m in METRICS)



def mention_spans(words: Sequence[str]) -> list[tuple[Triple, tuple[int, int, int]]]:
    """``parse_mentions(" ".join(words))`` with, for each mention, the indices of the words it came from.

    Same scan as ``parse_mentions``: the text is cut into ``[a-z]+`` runs (lower-cased); a run never spans a
    space, so every run belongs to exactly one word.
    """
    runs = [(run, k) for k, word in enumerate(words) for run in re.findall(r"[a-z]+", word.lower())]
    spans, i = [], 0
    while i + 2 < len(runs):
        (size, a), (color, b), (shape, c) = runs[i:i + 3]
        if size in SIZES and color in COLORS and shape in ALL_SHAPES:
            spans.append(((size, color, shape), (a, b, c)))
            i += 3
        else:
            i += 1
    assert [s[0] for s in spans] == parse_mentions(" ".join(words))
    return spans


def match_mentions(mentions: Sequence[Triple], objects: Sequence[ObjectTruth]) -> list[ObjectTruth | None]:
    """The object each mention refers to: the k-th mention of a triple is the k-th object of that triple in
    reading order (centre x, then y: the narrative's order, which only matters for twins); None once the
    image has no further object of that triple (a hallucination or a repeat)."""
    queues: dict[Triple, list[ObjectTruth]] = defaultdict(list)
    for obj in sorted(objects, key=lambda o: (o.center[0], o.center[1])):
        queues[obj.triple].append(obj)
    return [queues[m].pop(0) if queues[m] else None for m in mentions]


def _pair(model: float | None, baseline: float | None) -> dict[str, float | None]:
    def clean(v: float | None) -> float | None:
        return None if v is None or math.isnan(v) else float(v)

    return {"model": clean(model), "baseline": clean(baseline)}


def most_frequent_triple(truths: Sequence[ImageTruth]) -> Triple:
    """The split's most frequent object triple (ties: the alphabetically first)."""
    counts = Counter(o.triple for t in truths for o in t.objects)
    if not counts:
        raise ValueError("no objects in the evaluated images")
    return min(counts, key=lambda tr: (-counts[tr], tr))


def referring_metrics(truths: Sequence[ImageTruth], preds: Sequence[ImagePrediction]) -> dict[str, dict]:
    """P@0.5 of the boxes and mask mean IoU / cIoU against ``instance_map == object_id``, one sample per
    referring expression; baseline: the whole-image box and the whole-image mask. None (not available) when the
    images have no referring expressions (a split without them is still evaluated on every other task)."""
    gt_boxes, pred_boxes, full_boxes, gt_masks, pred_masks, full_masks = [], [], [], [], [], []
    for truth, pred in zip(truths, preds, strict=True):
        full = np.ones_like(truth.instance_map, dtype=bool)
        for k, expr in enumerate(truth.expressions):
            gt_boxes.append(expr.box)
            pred_boxes.append(pred.refer_boxes[k])
            full_boxes.append((0.0, 0.0, float(truth.width), float(truth.height)))
            gt_masks.append(truth.instance_map == expr.object_id)
            pred_masks.append(pred.refer_masks[k])
            full_masks.append(full)
    if not gt_boxes:  # was a ValueError once every image had been predicted
        return {key: _pair(None, None) for key in ("refer_p@0.5", "mask_mean_iou", "mask_ciou")}
    model, base = mask_iou_stats(pred_masks, gt_masks), mask_iou_stats(full_masks, gt_masks)
    return {
        "refer_p@0.5": _pair(precision_at_iou(pred_boxes, gt_boxes, 0.5), precision_at_iou(full_boxes, gt_boxes)),
        "mask_mean_iou": _pair(model["mean_iou"], base["mean_iou"]),
        "mask_ciou": _pair(model["ciou"], base["ciou"]),
    }


def _refer_scores(preds: Sequence[ImagePrediction]) -> tuple[list[float], list[float]]:
    """The referring scores of every present and of every absent expression."""
    return ([score for pred in preds for score in pred.refer_scores],
            [score for pred in preds for score in pred.absent_scores])


def refer_score_metrics(truths: Sequence[ImageTruth], preds: Sequence[ImagePrediction]) -> dict[str, dict]:
    """Does the referring score tell whether the expression is in the image? AUROC of the scores of the
    split's expressions against those of the same expressions with a shape the image lacks (``truth.absent``);
    baseline: a constant score (0.5). None when either set is empty."""
    present, absent = _refer_scores(preds)
    if len(present) != sum(len(t.expressions) for t in truths) or \
            len(absent) != sum(len(t.absent) for t in truths):
        raise ValueError("refer_scores / absent_scores do not match the expressions / absent expressions")
    model = score_auroc(present, absent) if present and absent else None
    return {"refer_score_auroc": _pair(model, 0.5 if model is not None else None)}


def refer_score_quantiles(preds: Sequence[ImagePrediction]) -> dict[str, dict[str, float]] | None:
    """Quantiles (p05, p25, p50, p75, p95) of the referring scores of the present and of the absent expressions,
    so that a user can read one score (the app marks a score under the absent expressions' median). None when
    either set is empty."""
    present, absent = _refer_scores(preds)
    if not present or not absent:
        return None
    levels = {"p05": 0.05, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p95": 0.95}
    return {name: {key: float(np.quantile(scores, q)) for key, q in levels.items()}
            for name, scores in (("present", present), ("absent", absent))}


def caption_is_triple(caption: str, triple: Triple) -> bool:
    """The "attributes exact" rule: the caption names exactly one object, and it is ``triple``."""
    return parse_mentions(caption) == [tuple(triple)]


def location_caption_metrics(truths: Sequence[ImageTruth], preds: Sequence[ImagePrediction]) -> dict[str, dict]:
    """Accuracy of the captions of the ground-truth boxes; baseline: always the split's most frequent triple."""
    majority = most_frequent_triple(truths)
    correct = baseline = total = 0
    for truth, pred in zip(truths, preds, strict=True):
        for obj, caption in zip(truth.objects, pred.object_captions, strict=True):
            correct += caption_is_triple(caption, obj.triple)
            baseline += obj.triple == majority
            total += 1
    return {"loc_caption_accuracy": _pair(correct / total, baseline / total)}


def triple_caption_match(predicted: str, reference: str) -> bool:
    """Dense-caption match: the prediction names exactly one object, with the reference's (only) triple."""
    ref = parse_mentions(reference)
    return len(ref) == 1 and caption_is_triple(predicted, ref[0])


def dense_metrics(truths: Sequence[ImageTruth], preds: Sequence[ImagePrediction]) -> dict[str, dict]:
    """AP at IoU 0.5 with :func:`triple_caption_match`; no trivial baseline (documented)."""
    ap = dense_caption_ap([p.dense for p in preds], [t.regions for t in truths], iou_threshold=0.5,
                          caption_match=triple_caption_match)
    return {"dense_ap@0.5": _pair(ap, None)}


def _centre(box: BoxPx) -> tuple[float, float]:
    return ((box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0)


def trace_metrics(truths: Sequence[ImageTruth], preds: Sequence[ImagePrediction]) -> tuple[dict, dict]:
    """Point-in-object rate of the content words, LBM of the full-image caption's word boxes, and LBM of the
    reference narrative's word boxes when the model is given that narrative.

    Point-in-object: the caption's mentions are matched to objects (:func:`match_mentions`); for each matched
    mention, the centres of its size, colour and shape word boxes are looked up in the instance map. Baseline:
    the same words, each at the image centre ``(W/2, H/2)``. Undefined (None) if no mention matched.

    LBM: predicted trace = the caption's word boxes / (W, H, W, H); ground truth = the LN word boxes;
    ``lbm_dataset(..., empty_cost=LBM_EMPTY_COST)``. Baseline: as many boxes as the caption has words, each
    ``(0.5 ± CENTRE_BOX_HALF)`` on both axes. Images without an LN trace are left out of both.

    LBM, reference narrative given (MITR's controlled trace generation, the task LBM was defined for):
    predicted trace = ``pred.traced`` / (W, H, W, H), one box per reference word, against the same
    LN word boxes; baseline: the centre box for every word. It measures where the model points, apart from
    what it says.

    Returns (metrics, counts).
    """
    points, centres, ids, index = [], [], [], []
    pairs, centre_pairs, given_pairs, given_centre = [], [], [], []
    mentions_matched = empty = 0
    lo, hi = 0.5 - CENTRE_BOX_HALF, 0.5 + CENTRE_BOX_HALF
    for i, (truth, pred) in enumerate(zip(truths, preds, strict=True)):
        spans = mention_spans([w.text for w in pred.words])
        for (_, word_ids), obj in zip(spans, match_mentions([s[0] for s in spans], truth.objects)):
            if obj is None:
                continue
            mentions_matched += 1
            for k in word_ids:
                points.append(_centre(pred.words[k].box))
                centres.append((truth.width / 2.0, truth.height / 2.0))
                ids.append(obj.object_id)
                index.append(i)
        if truth.trace is None:
            continue
        scale = np.array([truth.width, truth.height, truth.width, truth.height], dtype=np.float64)
        trace = np.array([w.box for w in pred.words], dtype=np.float64).reshape(-1, 4) / scale
        empty += len(trace) == 0
        pairs.append((trace, truth.trace))
        centre_pairs.append((np.tile([lo, lo, hi, hi], (len(trace), 1)), truth.trace))
        if pred.traced is not None:
            given_pairs.append((np.array([w.box for w in pred.traced], dtype=np.float64).reshape(-1, 4) / scale,
                                truth.trace))
            given_centre.append((np.tile([lo, lo, hi, hi], (len(truth.trace), 1)), truth.trace))
    maps = [t.instance_map for t in truths]
    if points:
        rate = point_in_mask_rate(points, ids, maps, map_index=index)
        base = point_in_mask_rate(centres, ids, maps, map_index=index)
    else:
        rate = base = None
    metrics = {
        "trace_point_in_object": _pair(rate, base),
        "trace_lbm": _pair(lbm_dataset(pairs, empty_cost=LBM_EMPTY_COST),
                           lbm_dataset(centre_pairs, empty_cost=LBM_EMPTY_COST)),
        "trace_lbm_given_caption": _pair(lbm_dataset(given_pairs), lbm_dataset(given_centre)),
    }
    counts = {"trace_mentions_matched": mentions_matched, "trace_content_words": len(points),
              "lbm_images": len(pairs), "empty_captions": empty, "traced_narratives": len(given_pairs)}
    return metrics, counts


def narrative_metrics(truths: Sequence[ImageTruth], preds: Sequence[ImagePrediction]) -> dict[str, dict]:
    """Object recall / hallucination rate of the full-image caption's mentions vs the objects present;
    baseline: a caption mentioning the split's most frequent triple once, for every image."""
    present = [[o.triple for o in t.objects] for t in truths]
    model = recall_and_hallucination([parse_mentions(p.caption) for p in preds], present)
    majority = most_frequent_triple(truths)
    base = recall_and_hallucination([[majority]] * len(truths), present)
    return {"object_recall": _pair(model["object_recall"], base["object_recall"]),
            "hallucination_rate": _pair(model["hallucination_rate"], base["hallucination_rate"])}


def compute_metrics(truths: Sequence[ImageTruth], preds: Sequence[ImagePrediction]) -> dict[str, Any]:
    """All metrics (``{"metrics": {key: {"model", "baseline"}}, "counts": {...}}``) from truths + predictions."""
    if len(truths) != len(preds):
        raise ValueError(f"{len(truths)} images but {len(preds)} predictions")
    trace, trace_counts = trace_metrics(truths, preds)
    metrics = {**referring_metrics(truths, preds), **refer_score_metrics(truths, preds),
               **location_caption_metrics(truths, preds),
               **dense_metrics(truths, preds), **trace, **narrative_metrics(truths, preds)}
    counts = {"images": len(truths), "objects": sum(len(t.objects) for t in truths),
              "expressions": sum(len(t.expressions) for t in truths),
              "absent_expressions": sum(len(t.absent) for t in truths),
              "dense_regions": sum(len(t.regions) for t in truths),
              "dense_predictions": sum(len(p.dense) for p in preds), **trace_counts}

    def half(key: str) -> bool | None:
        lbm = metrics[key]
        return None if None in (lbm["model"], lbm["baseline"]) else lbm["model"] <= 0.5 * lbm["baseline"]

    return {"metrics": {key: metrics[key] for key in METRIC_KEYS}, "counts": counts,
            "refer_score_quantiles": refer_score_quantiles(preds),
            "baselines": {m[0]: m[4] for m in METRICS},
            "targets": {"lbm_given_caption_at_most_half_centre_baseline": half("trace_lbm_given_caption"),
                        "lbm_at_most_half_centre_baseline": half("trace_lbm")}}


def metrics_table(result: dict[str, Any]) -> str:
    """The metrics as an aligned table: task, metric, model, baseline, what the baseline is, better."""
    rows = [{"task": task, "metric": label, "model": result["metrics"][key]["model"],
             "baseline": result["metrics"][key]["baseline"], "baseline is": base or "-", "better": better}
            for key, task, label, better, base in METRICS]
    return format_table(rows, precision=3)


def split_summary(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every model metric over several splits (name -> an ``evaluate`` result): its per-split values, their mean
    and the standard error of that mean (sample standard deviation / sqrt(n)); mean and s.e. are None when a
    split has no value. How far one 500-image split can move a metric: docs/referring.md §19."""
    summary = {}
    for key in METRIC_KEYS:
        values = {name: result["metrics"][key]["model"] for name, result in results.items()}
        known = [v for v in values.values() if v is not None]
        complete = len(known) == len(values) and len(known) > 1
        summary[key] = {"values": values, "mean": float(np.mean(known)) if complete else None,
                        "se": float(stats.sem(known)) if complete else None}
    return summary


def summary_table(summary: dict[str, dict[str, Any]]) -> str:
    """``split_summary`` as an aligned table: task, metric, one column per split, mean, s.e."""
    rows = [{"task": task, "metric": label, **summary[key]["values"], "mean": summary[key]["mean"],
             "s.e.": summary[key]["se"]} for key, task, label, _, _ in METRICS]
    return format_table(rows, precision=3)
