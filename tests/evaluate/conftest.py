"""The hand-made world of the evaluation tests (this folder only): two images whose every expected number is
worked out in the comments, never by the code under test (`hand_world`), and `ScriptedPredictor`, a stand-in for
``PixelLLMPredictor`` (same methods, same output dataclasses) that answers from a script; `_predict`, `_model` and
`_baseline` run it and read a result. The test modules import them, and the world's names (`SGS`, `BG_A`,
`IN_B1`, ...), from here."""

from __future__ import annotations

import numpy as np

from pixelllm.predictor import Caption, Referral, Region, Word
from training.evaluate import (
    ExpressionTruth,
    ImageTruth,
    ObjectTruth,
    absent_expressions,
    predict_image,
)

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
