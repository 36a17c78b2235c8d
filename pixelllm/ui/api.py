"""The HTTP API (`/caption`, `/trace`, `/refer`, `/dense`): an image file and plain arguments in, JSON out.

Each endpoint validates like its tab (the same `ValueError` → `gr.Error` messages), logs to the annotation store
with `extra.api`, and returns the record a tab's download holds, in the pixels of the image as sent.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from pixelllm import image as imaging
from pixelllm.ui import records
from pixelllm.ui.callbacks import dense_options, parse_expressions, trace_words
from pixelllm.ui.decoding import WordStream, decoding_options
from pixelllm.ui.workspace import Studio, load_user_image, user_errors


def parse_prompts(text: str | dict | None, scale: tuple[float, float], width: int, height: int) -> dict:
    """API prompts (JSON): {"points": [[x, y], ...], "point_labels": [1, 0, ...], "box": [x0, y0, x1, y1]},
    in pixels of the image as sent; any key optional. Returns model-frame arrays for the predictor."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return {"points": None, "point_labels": None, "box": None}
    if isinstance(text, str):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError('prompts must be JSON like {"points": [[x, y]], "point_labels": [1], '
                             f'"box": [x0, y0, x1, y1]}} (pixels): {err.msg}') from err
    else:
        data = text
    if not isinstance(data, dict):
        raise ValueError('prompts must be a JSON object such as {"box": [x0, y0, x1, y1]}')
    unknown = set(data) - {"points", "point_labels", "labels", "box"}
    if unknown:
        raise ValueError(f"unknown prompt keys {sorted(unknown)}; use points, point_labels, box")
    sx, sy = scale
    points = labels = box = None
    if data.get("points"):
        try:
            raw = np.asarray(data["points"], dtype=np.float64)
        except (TypeError, ValueError) as err:  # ragged lists, strings, objects
            raise ValueError("points must be a list of [x, y] pairs (pixels)") from err
        if raw.ndim != 2 or raw.shape[1] not in (2, 3):
            raise ValueError("points must be a list of [x, y] pairs")
        points = raw[:, :2] / np.array([sx, sy])
        labels = data.get("point_labels", data.get("labels"))
        if labels is None and raw.shape[1] == 3:
            labels = raw[:, 2]
        points, labels = imaging.check_points(points, labels, width, height)
    else:  # labels for no points were dropped: the caption came from the whole image with no error
        imaging.check_no_labels(data.get("point_labels", data.get("labels")))
    if data.get("box") is not None:
        try:
            raw_box = np.asarray(data["box"], dtype=np.float64).reshape(-1)
        except (TypeError, ValueError) as err:
            raise ValueError("box must be [x0, y0, x1, y1] (pixels)") from err
        if raw_box.shape != (4,):
            raise ValueError("box must be [x0, y0, x1, y1]")
        box = imaging.check_box(raw_box / np.array([sx, sy, sx, sy]), width, height).tolist()
    return {"points": points, "point_labels": labels, "box": box}


@user_errors
def caption(studio: Studio, image: str | None, prompts: str | None, text: str | None, max_words: Any,
            do_sample: Any, temperature: Any, top_p: Any, seed: Any, visitor: records.Visitor | None = None, *,
            repetition_penalty: Any = None) -> dict:
    """/caption: image file + prompts JSON + text prompt + decoding options -> words with pixel boxes.
    repetition_penalty: None = the checkpoint's default."""
    loaded = load_user_image(image)
    h, w = loaded.array.shape[:2]
    text = imaging.check_text(text)
    parsed = parse_prompts(prompts, loaded.scale, w, h)
    options = decoding_options(max_words, do_sample, temperature, top_p, seed, limit=studio.max_words,
                               repetition_penalty=studio.penalty(repetition_penalty),
                               default_words=studio.default_max_words)
    stream = WordStream(studio, loaded.array, points=parsed["points"], point_labels=parsed["point_labels"],
                        box=parsed["box"], text=text, options=options)
    words = list(stream)
    prompts_model = records.model_prompts(parsed["points"], parsed["point_labels"], parsed["box"], text)
    gen_id = records.log_output(studio, None, loaded.array, "caption", [x["text"] for x in words],
                                [x["box"] for x in words],
                                prompts=prompts_model, extra={"decoding": options, "api": True, "cut": stream.cut},
                                visitor=visitor, served=stream.served)
    return records.caption_record(studio, words, loaded.scale, loaded.size,
                                  prompts=prompts_model, options=options, generation_id=gen_id, cut=stream.cut,
                                  served=stream.served)


@user_errors
def trace(studio: Studio, image: str | None, prompts: str | None, caption: str | None,
          visitor: records.Visitor | None = None) -> dict:
    """/trace: image file + prompts JSON + a caption -> the caption's words, each with the pixel box the model
    grounds it to, and the caption's score (geometric-mean token probability)."""
    loaded = load_user_image(image)
    h, w = loaded.array.shape[:2]
    parsed = parse_prompts(prompts, loaded.scale, w, h)
    words, score, served = trace_words(studio, loaded.array, caption, points=parsed["points"],
                               point_labels=parsed["point_labels"], box=parsed["box"])
    text = " ".join(x["text"] for x in words)
    prompts_model = records.model_prompts(parsed["points"], parsed["point_labels"], parsed["box"], None)
    gen_id = records.log_output(studio, None, loaded.array, "caption", [x["text"] for x in words],
                                [x["box"] for x in words],
                                prompts=prompts_model,
                                extra={"traced": True, "text": text, "score": score, "api": True},
                                visitor=visitor, served=served)
    record = records.caption_record(studio, words, loaded.scale, loaded.size,
                                    prompts=prompts_model, options=None, generation_id=gen_id, task="trace",
                                    served=served)
    return {**record, "score": score}


@user_errors
def refer(studio: Studio, image: str | None, expressions: str | None, visitor: records.Visitor | None = None) -> dict:
    """/refer: image file + expressions (one per line) -> box, score and RLE mask per expression."""
    loaded = load_user_image(image)
    lines = parse_expressions(expressions)
    with studio.predictor.reading() as served:
        referrals = studio.predictor.refer(studio.predictor.set_image(loaded.array), lines)
    gen_id = records.log_output(studio, None, loaded.array, "refer", lines, [list(r.box) for r in referrals],
                                prompts={"expressions": lines},
                                extra={"scores": [r.score for r in referrals], "api": True},
                                visitor=visitor, served=served)
    return records.refer_record(studio, referrals, loaded.scale, loaded.size, gen_id, served)


@user_errors
def dense(studio: Studio, image: str | None, score_threshold: Any, max_regions: Any,
          visitor: records.Visitor | None = None) -> dict:
    """/dense: image file + score threshold + max regions -> regions with boxes, scores, captions, word boxes."""
    loaded = load_user_image(image)
    threshold, top_k = dense_options(score_threshold, max_regions)
    with studio.predictor.reading() as served:
        regions = studio.predictor.dense_caption(studio.predictor.set_image(loaded.array), max_regions=top_k,
                                                 score_threshold=threshold)
    rows = [{"box": list(r.box), "score": r.score, "caption": r.caption.text,
             "words": [w.to_dict() for w in r.caption.words]} for r in regions]
    gen_id = None
    if rows:
        gen_id = records.log_output(studio, None, loaded.array, "dense", [r["caption"] for r in rows],
                                    [r["box"] for r in rows],
                                    prompts={"score_threshold": threshold, "max_regions": top_k},
                                    extra={"scores": [r["score"] for r in rows], "api": True}, visitor=visitor,
                                    served=served)
    return records.dense_record(studio, rows, loaded.scale, loaded.size, gen_id, served)
