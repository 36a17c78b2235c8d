"""Evaluate a PixelLLM checkpoint on a Shapes split (docs/metrics.md): every model metric beside a trivial baseline.

```
python -m training.evaluate --checkpoint DIR --data DIR [--split test] [--limit N] [--json OUT] [--device cpu]
python -m training.evaluate --checkpoint DIR --data DIR --split a --split b [...]   # + mean and s.e. over splits
```

Three layers, so that the metric logic is testable without a model:

1. :func:`load_truth` reads the split into :class:`ImageTruth` records (objects, referring expressions, dense
   regions, instance map, LN word trace);
2. :func:`predict_image` is the only code that calls the model: one :class:`ImagePrediction` per image from a
   ``PixelLLMPredictor`` (or anything with the same methods);
3. ``training.scoring.compute_metrics`` turns truths + predictions into numbers with ``training.metrics``
   (no model).

The exact protocol and the baselines are documented in ``docs/metrics.md`` ("Evaluation protocol").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pixelllm.files import json_target_problem
from training.data.localized_narratives import read_localized_narratives
from training.data.shapes import SHAPES, load_image, load_instance_map, load_split
from training.scoring import (
    CENTRE_BOX_HALF,
    LBM_EMPTY_COST,
    BoxPx,
    Triple,
    compute_metrics,
    metrics_table,
    split_summary,
    summary_table,
)

#: Dense captioning: proposals kept before captioning, and the proposal score floor (low, so AP sees the
#: whole precision-recall curve).
DENSE_MAX_REGIONS = 16
DENSE_SCORE_THRESHOLD = 0.05
DENSE_NMS_IOU = 0.5


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
    absent: list[str] = field(default_factory=list)  # expressions naming a shape the image does not have


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
    boxes of the reference narrative's words (``truth.narrative``) given to the model (None without one);
    ``refer_scores`` / ``absent_scores`` the referring scores of ``truth.expressions`` / ``truth.absent``.
    """

    refer_boxes: list[BoxPx]
    refer_masks: list[np.ndarray] = field(repr=False)
    object_captions: list[str]
    dense: list[tuple[BoxPx, float, str]]
    words: list[PredictedWord]
    traced: list[PredictedWord] | None = None
    refer_scores: list[float] = field(default_factory=list)  # the referrals' scores, as refer_boxes
    absent_scores: list[float] = field(default_factory=list)  # the scores of ``truth.absent``

    @property
    def caption(self) -> str:
        return " ".join(w.text for w in self.words)


def _box(values: Sequence[float]) -> BoxPx:
    x0, y0, x1, y1 = (float(v) for v in values)
    return (x0, y0, x1, y1)


def absent_expressions(image_id: str, expressions: Sequence[str], objects: Sequence[ObjectTruth]) -> list[str]:
    """Each expression with its shape word replaced by a shape no object of the image has, so that it refers to
    nothing there ("the small red star" -> "the small red hexagon"); the shape is drawn from the missing ones
    by a generator seeded with the image id and the expression (the same list on every run). Expressions
    without a shape word ("the small red shape"), and images that hold every shape, give none."""
    missing = [shape for shape in SHAPES if shape not in {o.triple[2] for o in objects}]
    absent = []
    for text in expressions:
        words = text.split()
        at = [k for k, word in enumerate(words) if word in SHAPES]
        if not missing or len(at) != 1:
            continue
        rng = np.random.default_rng(zlib.crc32(f"{image_id}|{text}".encode()))
        words[at[0]] = missing[int(rng.integers(len(missing)))]
        absent.append(" ".join(words))
    return absent


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
    if len(narratives) < len(samples):  # the trace metrics compare against one reference narrative per image
        seen = Counter(s.image_id for s in samples)
        image_id, count = seen.most_common(1)[0]
        raise ValueError(f"{split}.ln.jsonl holds {count} narratives of image {image_id!r}: the evaluation reads "
                         "one per image (a Shapes split has one each)")
    truths = []
    for rec in data.objects[:limit]:
        image_id = rec["image_id"]
        objects = [ObjectTruth(int(o["object_id"]), (o["size"], o["color"], o["shape"]), _box(o["box"]),
                               (float(o["center"][0]), float(o["center"][1]))) for o in rec["objects"]]
        expressions = [ExpressionTruth(r["expression"], int(r["object_id"]), _box(r["box"])) for r in refer[image_id]]
        image_file = Path(root) / rec["file_name"]
        if not image_file.is_file():  # read at its turn: a traceback after the model and the images before it
            raise ValueError(f"{split}: image {image_id!r} ({rec['file_name']}): no such file: {image_file}")
        truths.append(ImageTruth(
            image_id=image_id, file_name=rec["file_name"], width=int(rec["width"]), height=int(rec["height"]),
            instance_map=load_instance_map(root, rec["mask_file"]), objects=objects, expressions=expressions,
            regions=[(_box(g["box"]), g["caption"]) for g in dense.get(image_id, {"regions": []})["regions"]],
            trace=narratives[image_id][1] if image_id in narratives else None,
            narrative=narratives[image_id][0] if image_id in narratives else None,
            absent=absent_expressions(image_id, [e.expression for e in expressions], objects),
        ))
    if not truths:
        raise ValueError(f"split {split!r} in {root} has no images")
    return truths


class Predictor(Protocol):
    """The subset of ``pixelllm.PixelLLMPredictor`` used here (tests pass scripted stand-ins)."""

    def set_image(self, image: np.ndarray) -> Any: ...
    def caption(self, state: Any, **kwargs: Any) -> Any: ...
    def caption_boxes(self, state: Any, boxes: Any) -> list[Any]: ...
    def refer(self, state: Any, expressions: list[str], *, masks: Any = True) -> list[Any]: ...
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
    asked = expressions + list(truth.absent)  # one batch: the present expressions, then the absent ones
    # Only the present expressions' masks are read (an absent one's score is all the metrics use).
    referrals = predictor.refer(state, asked, masks=[True] * len(expressions) + [False] * len(truth.absent)
                                ) if asked else []
    if len(referrals) != len(asked):
        raise RuntimeError(f"{truth.image_id}: {len(asked)} expressions but {len(referrals)} referrals")
    referrals, absent = referrals[:len(expressions)], referrals[len(expressions):]
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
        refer_scores=[float(r.score) for r in referrals],
        absent_scores=[float(r.score) for r in absent],
    )


# --------------------------------------------------------------------------------------------------------
# Driver and command line


def evaluate(predictor: Predictor, root: str | Path, split: str = "test", limit: int | None = None, *,
             max_regions: int = DENSE_MAX_REGIONS, score_threshold: float = DENSE_SCORE_THRESHOLD,
             nms_iou: float = DENSE_NMS_IOU, max_new_tokens: int | None = None,
             repetition_penalty: float | None = None, progress: bool = False,
             truths: list[ImageTruth] | None = None) -> dict[str, Any]:
    """Load the split (unless ``truths`` holds it already), predict every image, compute the metrics; adds
    ``seconds`` and a few ``examples``."""
    start = time.perf_counter()
    truths = truths if truths is not None else load_truth(root, split, limit)
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
    parser = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__.split("\n\n")[0],
                                     allow_abbrev=False)
    parser.add_argument("--checkpoint", required=True, help="PixelLLM checkpoint directory (or hub id)")
    parser.add_argument("--data", required=True, help="Shapes data directory (python -m training.shapes --out)")
    parser.add_argument("--split", action="append", default=None,
                        help="split name (default test); given several times, each split is evaluated and every "
                             "metric's mean and standard error over them is printed too")
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


def print_result(result: dict[str, Any], title: str, decoding: str) -> None:
    """One split's evaluation as printed: what was measured, how the narratives were decoded, the table."""
    c = result["counts"]
    print(f"{title}: {c['images']} images, {c['objects']} objects, {c['expressions']} expressions, "
          f"{c['dense_regions']} dense regions, {c['trace_content_words']} traced content words, "
          f"{c['lbm_images']} LBM images ({c['empty_captions']} empty captions) in {result['seconds']['total']:.1f} s")
    print(decoding)
    if not c["expressions"]:
        print("Referring: not available (the split has no referring expressions; its metrics are null)")
    print(metrics_table(result))
    for key, what in (("lbm_given_caption_at_most_half_centre_baseline", "reference narrative given"),
                      ("lbm_at_most_half_centre_baseline", "generated narrative")):
        target = result["targets"][key]
        print(f"LBM target, {what} (at most half the centre baseline): "
              f"{'-' if target is None else 'met' if target else 'not met'}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    finished: list[str] = []  # of several splits, those evaluated (and written to --json)
    try:
        return _evaluate_cli(parser, args, finished)
    except KeyboardInterrupt:  # Ctrl+C: one line, not a traceback from wherever the evaluation was
        kept = (f"{args.json} holds the splits finished before ({', '.join(finished)}), without the summary"
                if args.json and finished else
                "no results were written" + (f"; {args.json} is as it was" if args.json else ""))
        print(f"evaluate: interrupted; {kept}", file=sys.stderr)
        return 130


def _evaluate_cli(parser: argparse.ArgumentParser, args: argparse.Namespace, finished: list[str]) -> int:
    """`main` after parsing; `finished` gains each of several splits once evaluated and written to --json."""
    import torch

    from pixelllm import PixelLLM, PixelLLMPredictor
    from pixelllm.arguments import MAX_TRACE_TOKENS, whole_number
    from pixelllm.files import write_atomically

    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    penalty = args.repetition_penalty
    source = "--repetition-penalty" if penalty is not None else "the checkpoint's default"
    if penalty is not None and not 1.0 <= penalty <= 2.0:
        parser.error(f"--repetition-penalty must be between 1 (off) and 2, got {penalty}")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit must be at least 1, got {args.limit}")
    try:  # the predictor's limits: out of them, the first image's call was a traceback once the model had loaded
        whole_number(args.max_regions, "--max-regions", 1, 100)
        if args.max_new_tokens is not None:
            whole_number(args.max_new_tokens, "--max-new-tokens", 1, MAX_TRACE_TOKENS)
    except ValueError as err:
        parser.error(str(err))
    if not 0.0 <= args.score_threshold <= 1.0:
        parser.error(f"--score-threshold must be between 0 and 1, got {args.score_threshold}")
    splits = list(dict.fromkeys(args.split or ["test"]))
    clash = [name for name in splits if name in ("task", "metric", "mean", "s.e.")] if len(splits) > 1 else []
    if clash:
        parser.error(f"--split: {clash[0]!r} is a column of the summary table; rename the split")
    if args.json:  # an unwritable --json failed with a traceback after the whole evaluation had run
        problem = json_target_problem(Path(args.json), "runs/eval/test.json")
        if problem:
            parser.error(f"--json {args.json}: {problem}")
    try:  # a device this machine lacks was a RuntimeError traceback once the model had loaded
        device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device {args.device}: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: no CUDA device is available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        parser.error(f"--device {args.device}: MPS is not available")
    truths = {}
    for split in splits:  # the user's mistakes as one line each, before the model loads
        try:
            truths[split] = load_truth(args.data, split, args.limit)
        except (OSError, ValueError) as err:
            parser.error(f"--data/--split: {err}")
    try:
        model = PixelLLM.from_pretrained(args.checkpoint)
    except (OSError, ValueError) as err:
        parser.error(f"--checkpoint: {err}")
    if model.tokenizer is None:  # PixelLLMPredictor's ValueError, a traceback, said to load it with from_pretrained
        parser.error(f"--checkpoint {args.checkpoint}: it has no tokenizer (tokenizer.json or spiece.model beside "
                     "its weights)")
    predictor = PixelLLMPredictor(model, device=args.device)
    if penalty is None:  # record the value the narratives were decoded with, not "default"
        penalty = model.config.repetition_penalty
    results = {}

    def write_json(result: dict[str, Any]) -> None:
        if args.json:  # atomically: a kill while writing keeps the previous split's file whole
            write_atomically(args.json, json.dumps(result, indent=2, allow_nan=False) + "\n")

    for split in splits:  # failures from here on keep their traceback
        result = evaluate(predictor, args.data, split, args.limit, max_regions=args.max_regions,
                          score_threshold=args.score_threshold, max_new_tokens=args.max_new_tokens,
                          repetition_penalty=penalty, progress=sys.stderr.isatty(), truths=truths[split])
        result = results[split] = {"checkpoint": str(args.checkpoint), "data": str(args.data), "device": args.device,
                                   **result}
        print_result(result, f"PixelLLM {model.config.preset} on {args.data} [{split}]",
                     f"Narratives: greedy, repetition penalty {penalty:g} ({source}; 1 = off)")
        if len(splits) > 1:  # after every split: a failure later keeps the splits done (summary at the end)
            write_json({"checkpoint": str(args.checkpoint), "data": str(args.data), "splits": results,
                        "summary": None})
            finished.append(split)
    if len(splits) > 1:
        summary = split_summary(results)
        print(f"\nOver {len(splits)} splits (mean and standard error of the mean):")
        print(summary_table(summary))
        result = {"checkpoint": str(args.checkpoint), "data": str(args.data), "splits": results, "summary": summary}
    write_json(result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
