"""Evaluate a PixelLLM checkpoint on a Shapes split (DESIGN.md §7): every model metric beside a trivial baseline.

```
python -m training.evaluate --checkpoint DIR --data DIR [--split test] [--limit N] [--json OUT] [--device cpu]
```

Three layers, so that the metric logic is testable without a model:

1. :func:`load_truth` reads the split into :class:`ImageTruth` records (objects, referring expressions, dense
   regions, instance map, LN word trace);
2. :func:`predict_image` is the only code that calls the model: one :class:`ImagePrediction` per image from a
   ``PixelLLMPredictor`` (or anything with the same methods);
3. :func:`compute_metrics` (built from :func:`referring_metrics`, :func:`location_caption_metrics`,
   :func:`dense_metrics`, :func:`trace_metrics`, :func:`narrative_metrics`) turns truths + predictions into
   numbers with ``training.metrics``.

The exact protocol and the baselines are documented in ``docs/metrics.md`` ("Evaluation protocol").
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from training.data.localized_narratives import read_localized_narratives
from training.data.shapes import (
    ALL_SHAPES,
    COLORS,
    SIZES,
    load_image,
    load_instance_map,
    load_split,
    parse_mentions,
)
from training.metrics import (
    dense_caption_ap,
    format_table,
    lbm_dataset,
    mask_iou_stats,
    point_in_mask_rate,
    precision_at_iou,
    recall_and_hallucination,
)

Triple = tuple[str, str, str]
BoxPx = tuple[float, float, float, float]

#: An image whose generated caption has no word counts at this LBM (``lbm_dataset(empty_cost=...)``), so that
#: emitting nothing is not rewarded; the ground-truth trace of a Shapes image is never empty.
LBM_EMPTY_COST = 1.0
#: Half side of the centre-box trace baseline, in normalised coordinates: (0.45, 0.45, 0.55, 0.55).
CENTRE_BOX_HALF = 0.05
#: Dense captioning: proposals kept before captioning, and the proposal score floor (low, so AP sees the
#: whole precision-recall curve).
DENSE_MAX_REGIONS = 16
DENSE_SCORE_THRESHOLD = 0.05
DENSE_NMS_IOU = 0.5

#: (key, task, metric, better, baseline description) in print order.
METRICS: tuple[tuple[str, str, str, str, str | None], ...] = (
    ("refer_p@0.5", "referring", "P@0.5", "higher", "whole-image box"),
    ("mask_mean_iou", "referring", "mask mean IoU", "higher", "whole-image mask"),
    ("mask_ciou", "referring", "mask cIoU", "higher", "whole-image mask"),
    ("loc_caption_accuracy", "location caption", "attributes exact", "higher", "most frequent triple"),
    ("dense_ap@0.5", "dense caption", "AP@0.5 (triple match)", "higher", None),
    ("trace_point_in_object", "trace", "point-in-object (content words)", "higher", "image-centre point"),
    ("trace_lbm_given_caption", "trace", "LBM, reference narrative given", "lower", "centre box ±0.05"),
    ("trace_lbm", "trace", "LBM, generated narrative", "lower", "centre box ±0.05"),
    ("object_recall", "narrative", "object recall", "higher", "most frequent triple once"),
    ("hallucination_rate", "narrative", "hallucination rate", "lower", "most frequent triple once"),
)
METRIC_KEYS = tuple(m[0] for m in METRICS)


# --------------------------------------------------------------------------------------------------------
# Ground truth and predictions


@dataclass
class ObjectTruth:
    object_id: int
    triple: Triple  # (size, colour, shape)
    box: BoxPx  # pixels, XYXY, exclusive x1/y1
    center: tuple[float, float]  # pixels, mean of the visible pixel centres (reading order key)


@dataclass
class ExpressionTruth:
    expression: str
    object_id: int
    box: BoxPx  # pixels


@dataclass
class ImageTruth:
    """Everything the metrics need to know about one image.

    ``instance_map``: HxW uint8, 0 = background, k = visible pixels of object k. ``regions``: dense-caption
    ground truth ``(box px, caption)``. ``narrative``: the LN words; ``trace``: nx4 float, their LN word boxes
    (x0, y0, x1, y1) normalised to the image; both None if the LN record was skipped by the reader (no trace).
    """

    image_id: str
    file_name: str
    width: int
    height: int
    instance_map: np.ndarray = field(repr=False)
    objects: list[ObjectTruth]
    expressions: list[ExpressionTruth]
    regions: list[tuple[BoxPx, str]]
    trace: np.ndarray | None = field(default=None, repr=False)
    narrative: list[str] | None = field(default=None, repr=False)


@dataclass
class PredictedWord:
    text: str
    box: BoxPx  # pixels of the original image


@dataclass
class ImagePrediction:
    """The model's outputs for one image, aligned with its :class:`ImageTruth`.

    ``refer_boxes[k]`` / ``refer_masks[k]`` (HxW bool, original resolution) answer ``truth.expressions[k]``;
    ``object_captions[k]`` is the caption of ``truth.objects[k].box``; ``dense`` holds ``(box px, score,
    caption)``; ``words`` is the full-image (global box, greedy) caption, one box per word; ``traced`` the
    boxes of the reference narrative's words (``truth.narrative``) given to the model (None without one).
    """

    refer_boxes: list[BoxPx]
    refer_masks: list[np.ndarray] = field(repr=False)
    object_captions: list[str]
    dense: list[tuple[BoxPx, float, str]]
    words: list[PredictedWord]
    traced: list[PredictedWord] | None = None

    @property
    def caption(self) -> str:
        return " ".join(w.text for w in self.words)


def _box(values: Sequence[float]) -> BoxPx:
    x0, y0, x1, y1 = (float(v) for v in values)
    return (x0, y0, x1, y1)


def load_truth(root: str | Path, split: str = "test", limit: int | None = None) -> list[ImageTruth]:
    """The first ``limit`` images (file order of ``<split>.objects.jsonl``) of a Shapes split, as ImageTruth."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    data = load_split(root, split)
    refer: dict[str, list[dict]] = defaultdict(list)
    for rec in data.refer:
        refer[rec["image_id"]].append(rec)
    dense = {rec["image_id"]: rec for rec in data.dense}
    samples, _ = read_localized_narratives(Path(root) / f"{split}.ln.jsonl")
    narratives = {s.image_id: (list(s.words), np.asarray(s.word_boxes, dtype=np.float64)) for s in samples}
    truths = []
    for rec in data.objects[:limit]:
        image_id = rec["image_id"]
        truths.append(ImageTruth(
            image_id=image_id, file_name=rec["file_name"], width=int(rec["width"]), height=int(rec["height"]),
            instance_map=load_instance_map(root, rec["mask_file"]),
            objects=[ObjectTruth(int(o["object_id"]), (o["size"], o["color"], o["shape"]), _box(o["box"]),
                                 (float(o["center"][0]), float(o["center"][1]))) for o in rec["objects"]],
            expressions=[ExpressionTruth(r["expression"], int(r["object_id"]), _box(r["box"]))
                         for r in refer[image_id]],
            regions=[(_box(g["box"]), g["caption"]) for g in dense.get(image_id, {"regions": []})["regions"]],
            trace=narratives[image_id][1] if image_id in narratives else None,
            narrative=narratives[image_id][0] if image_id in narratives else None,
        ))
    if not truths:
        raise ValueError(f"split {split!r} in {root} has no images")
    return truths


class Predictor(Protocol):
    """The subset of ``pixelllm.PixelLLMPredictor`` used here (tests pass scripted stand-ins)."""

    def set_image(self, image: np.ndarray) -> Any: ...
    def caption(self, state: Any, **kwargs: Any) -> Any: ...
    def caption_boxes(self, state: Any, boxes: Any) -> list[Any]: ...
    def refer(self, state: Any, expressions: list[str]) -> list[Any]: ...
    def dense_caption(self, state: Any, **kwargs: Any) -> list[Any]: ...
    def trace(self, state: Any, text: str) -> Any: ...


def predict_image(predictor: Predictor, image: np.ndarray, truth: ImageTruth, *,
                  max_regions: int = DENSE_MAX_REGIONS, score_threshold: float = DENSE_SCORE_THRESHOLD,
                  nms_iou: float = DENSE_NMS_IOU, max_new_tokens: int | None = None,
                  repetition_penalty: float | None = None) -> ImagePrediction:
    """Run every task of the protocol on one image (HxWx3 uint8). The only function that calls the model.

    ``max_new_tokens`` and ``repetition_penalty`` apply to the full-image narrative; None = the checkpoint's."""
    state = predictor.set_image(image)
    expressions = [e.expression for e in truth.expressions]
    referrals = predictor.refer(state, expressions) if expressions else []
    if len(referrals) != len(expressions):
        raise RuntimeError(f"{truth.image_id}: {len(expressions)} expressions but {len(referrals)} referrals")
    boxes = np.array([o.box for o in truth.objects], dtype=np.float64).reshape(-1, 4)
    captions = predictor.caption_boxes(state, boxes) if len(boxes) else []  # one batched pass
    regions = predictor.dense_caption(state, max_regions=max_regions, score_threshold=score_threshold,
                                      nms_iou=nms_iou)
    caption = predictor.caption(state, max_new_tokens=max_new_tokens,  # global box, greedy
                                repetition_penalty=repetition_penalty)
    traced = None
    if truth.narrative:  # controlled trace generation: the reference narrative given, its words located
        words = predictor.trace(state, " ".join(truth.narrative)).words
        traced = [PredictedWord(w.text, _box(w.box)) for w in words]
        if len(traced) != len(truth.narrative):
            raise RuntimeError(f"{truth.image_id}: the narrative has {len(truth.narrative)} words but its trace "
                               f"{len(traced)}")
    return ImagePrediction(
        refer_boxes=[_box(r.box) for r in referrals],
        refer_masks=[np.asarray(r.mask, dtype=bool) for r in referrals],
        object_captions=[c.text for c in captions],
        dense=[(_box(r.box), float(r.score), r.caption.text) for r in regions],
        words=[PredictedWord(w.text, _box(w.box)) for w in caption.words],
        traced=traced,
    )


# --------------------------------------------------------------------------------------------------------
# Metric computation (no model)


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
    referring expression; baseline: the whole-image box and the whole-image mask."""
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
    if not gt_boxes:
        raise ValueError("no referring expressions in the evaluated images")
    model, base = mask_iou_stats(pred_masks, gt_masks), mask_iou_stats(full_masks, gt_masks)
    return {
        "refer_p@0.5": _pair(precision_at_iou(pred_boxes, gt_boxes, 0.5), precision_at_iou(full_boxes, gt_boxes)),
        "mask_mean_iou": _pair(model["mean_iou"], base["mean_iou"]),
        "mask_ciou": _pair(model["ciou"], base["ciou"]),
    }


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
    metrics = {**referring_metrics(truths, preds), **location_caption_metrics(truths, preds),
               **dense_metrics(truths, preds), **trace, **narrative_metrics(truths, preds)}
    counts = {"images": len(truths), "objects": sum(len(t.objects) for t in truths),
              "expressions": sum(len(t.expressions) for t in truths),
              "dense_regions": sum(len(t.regions) for t in truths),
              "dense_predictions": sum(len(p.dense) for p in preds), **trace_counts}

    def half(key: str) -> bool | None:
        lbm = metrics[key]
        return None if None in (lbm["model"], lbm["baseline"]) else lbm["model"] <= 0.5 * lbm["baseline"]

    return {"metrics": {key: metrics[key] for key in METRIC_KEYS}, "counts": counts,
            "baselines": {m[0]: m[4] for m in METRICS},
            "targets": {"lbm_given_caption_at_most_half_centre_baseline": half("trace_lbm_given_caption"),
                        "lbm_at_most_half_centre_baseline": half("trace_lbm")}}


def metrics_table(result: dict[str, Any]) -> str:
    """The metrics as an aligned table: task, metric, model, baseline, what the baseline is, better."""
    rows = [{"task": task, "metric": label, "model": result["metrics"][key]["model"],
             "baseline": result["metrics"][key]["baseline"], "baseline is": base or "-", "better": better}
            for key, task, label, better, base in METRICS]
    return format_table(rows, precision=3)


# --------------------------------------------------------------------------------------------------------
# Driver and command line


def evaluate(predictor: Predictor, root: str | Path, split: str = "test", limit: int | None = None, *,
             max_regions: int = DENSE_MAX_REGIONS, score_threshold: float = DENSE_SCORE_THRESHOLD,
             nms_iou: float = DENSE_NMS_IOU, max_new_tokens: int | None = None,
             repetition_penalty: float | None = None, progress: bool = False) -> dict[str, Any]:
    """Load the split, predict every image, compute the metrics; adds ``seconds`` and a few ``examples``."""
    start = time.perf_counter()
    truths = load_truth(root, split, limit)
    predict_start = time.perf_counter()
    preds = []
    for n, truth in enumerate(truths, 1):
        image = load_image(root, truth.file_name)
        preds.append(predict_image(predictor, image, truth, max_regions=max_regions,
                                   score_threshold=score_threshold, nms_iou=nms_iou, max_new_tokens=max_new_tokens,
                                   repetition_penalty=repetition_penalty))
        if progress:
            print(f"\r{n}/{len(truths)} images", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    predict_seconds = time.perf_counter() - predict_start
    result = compute_metrics(truths, preds)
    result["settings"] = {"split": split, "limit": limit, "dense_max_regions": max_regions,
                          "dense_score_threshold": score_threshold, "dense_nms_iou": nms_iou,
                          "max_new_tokens": max_new_tokens, "repetition_penalty": repetition_penalty,
                          "lbm_empty_cost": LBM_EMPTY_COST,
                          "centre_box_half": CENTRE_BOX_HALF}
    result["examples"] = [{"image_id": t.image_id, "caption": p.caption} for t, p in list(zip(truths, preds))[:3]]
    result["seconds"] = {"predict": round(predict_seconds, 2), "total": round(time.perf_counter() - start, 2)}
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="PixelLLM checkpoint directory (or hub id)")
    parser.add_argument("--data", required=True, help="Shapes data directory (python -m training.shapes --out)")
    parser.add_argument("--split", default="test", help="split name (default test)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N images")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--max-regions", type=int, default=DENSE_MAX_REGIONS, help="dense: proposals kept")
    parser.add_argument("--score-threshold", type=float, default=DENSE_SCORE_THRESHOLD,
                        help="dense: minimum proposal score")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="full-image caption length cap (default: the model config's)")
    parser.add_argument("--repetition-penalty", type=float, default=None,
                        help="full-image caption repetition penalty, 1 = off (default: the model config's)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from pixelllm import PixelLLM, PixelLLMPredictor

    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    penalty = args.repetition_penalty
    source = "--repetition-penalty" if penalty is not None else "the checkpoint's default"
    if penalty is not None and not 1.0 <= penalty <= 2.0:
        build_parser().error(f"--repetition-penalty must be between 1 (off) and 2, got {penalty}")
    model = PixelLLM.from_pretrained(args.checkpoint)
    predictor = PixelLLMPredictor(model, device=args.device)
    if penalty is None:  # record the value the narratives were decoded with, not "default"
        penalty = model.config.repetition_penalty
    result = evaluate(predictor, args.data, args.split, args.limit, max_regions=args.max_regions,
                      score_threshold=args.score_threshold, max_new_tokens=args.max_new_tokens,
                      repetition_penalty=penalty, progress=sys.stderr.isatty())
    result = {"checkpoint": str(args.checkpoint), "data": str(args.data), "device": args.device, **result}
    c = result["counts"]
    print(f"PixelLLM {model.config.preset} on {args.data} [{args.split}]: {c['images']} images, {c['objects']} "
          f"objects, {c['expressions']} expressions, {c['dense_regions']} dense regions, "
          f"{c['trace_content_words']} traced content words, {c['lbm_images']} LBM images "
          f"({c['empty_captions']} empty captions) in {result['seconds']['total']:.1f} s")
    print(f"Narratives: greedy, repetition penalty {penalty:g} ({source}; 1 = off)")
    print(metrics_table(result))
    for key, what in (("lbm_given_caption_at_most_half_centre_baseline", "reference narrative given"),
                      ("lbm_at_most_half_centre_baseline", "generated narrative")):
        target = result["targets"][key]
        print(f"LBM target, {what} (at most half the centre baseline): "
              f"{'-' if target is None else 'met' if target else 'not met'}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
