"""The studio's callbacks that run the model: captioning (streamed or traced), referring, dense captioning and
the model panel; one function per user action, plain data in and out, tested directly.

The state they read and the prompt-editing callbacks are in `pixelllm.ui.workspace` (`Studio`, `Session`, the
coordinate frames); the decoding controls and the word stream are `pixelllm.ui.decoding`; what leaves a callback
for the store and the downloads is built in `pixelllm.ui.records`.
Every user mistake raises `ValueError` inside and leaves as `gr.Error` (`workspace.user_errors`); a failing store
only warns (`gr.Warning`) — the user still gets the result.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import gradio as gr
import numpy as np

from pixelllm import image as imaging
from pixelllm.predictor import ServedBy
from pixelllm.ui import records, render
from pixelllm.ui.decoding import WordStream, cut_note, decoding_options, form_whole_number
from pixelllm.ui.workspace import (
    Session,
    Studio,
    caption_view,
    checked_prompts,
    click_point,
    ensure_session,
    require_image,
    session_scale,
    session_size,
    streams_on_session,
    user_errors,
)

MAX_EXPRESSIONS = 16

# ------------------------------------------------------------------------------------------ captioning

def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _paced(studio: Studio, session: Session, stream: WordStream, words: list[dict],
           log: Callable[..., int | None], frame: Callable[[], tuple]) -> Iterator[tuple]:
    """Stream words into `words`, one `frame()` per word, at most one every `studio.min_word_interval` seconds.
    Another image opened meanwhile stops it; what was shown is then logged as abandoned, and so it is when the
    stream is closed (the page went away). Returns True when it stopped for another image."""
    last = 0.0
    try:
        for word in stream:
            wait = studio.min_word_interval - (time.monotonic() - last)
            if wait > 0:
                time.sleep(wait)
            last = time.monotonic()
            if session.replaced:
                if words:
                    log(True, "another image was opened")
                return True
            words.append(word)
            yield frame()
    except GeneratorExit:  # the page went away, or for_the_shown_image left the stream for another image
        if words:
            log(True, "another image was opened" if session.replaced else "the stream was closed")
        raise
    return False


# A stream the page has left ends on this no-op update. Ending it with no update at all, once logging had delayed
# the end, put the previous image's view back in the browser (seen in test_browser_image_loading's new-image test)
_NOTHING = (gr.skip(),) * 4


@user_errors
@streams_on_session
def generate(studio: Studio, session: Session | None, text: str | None, max_words: Any, sampling: Any,
             temperature: Any, top_p: Any, seed: Any, visitor: records.Visitor | None = None, *,
             repetition_penalty: Any = None) -> Iterator[tuple]:
    """Stream a caption: yields (caption view, caption text, files, session) once per decoded word, then a
    final update with the downloads. The view carries words + boxes; the browser draws the trace.
    repetition_penalty: None = the checkpoint's default."""
    session = ensure_session(session)
    require_image(session)
    text = imaging.check_text(text)
    studio.predictor.check_text_prompt(text)  # refused before "Generating…" is shown (it stayed up otherwise)
    options = decoding_options(max_words, sampling, temperature, top_p, seed, limit=studio.max_words,
                               repetition_penalty=studio.penalty(repetition_penalty),
                               default_words=studio.default_max_words)
    points, labels, box = checked_prompts(session)
    session.inspect = None
    session.pending = None
    array = session.array
    words: list[dict] = []
    prompts_model = records.model_prompts(points, labels, box, text)

    def log(cut: bool, abandoned: str | None = None) -> int | None:
        extra = {"decoding": options, "text": " ".join(w["text"] for w in words), "cut": cut}
        if abandoned:  # shown in part: flagged so that an export or a finetune can tell it apart
            extra["abandoned"] = abandoned
        return records.log_output(studio, session, array, "caption", [w["text"] for w in words],
                                  [w["box"] for w in words], prompts=prompts_model, extra=extra,
                                  visitor=visitor, served=stream.served)

    stream = WordStream(studio, array, points=points, point_labels=labels, box=box, text=text, options=options)
    # Until the caption is kept: prompt edits are refused, Inspect words reads the words so far (workspace)
    session.streaming = words
    try:
        yield (caption_view(session, words=[], status="streaming", message="Generating…"), "", gr.skip(), session)
        # The session object is already the page's state: streaming updates leave it alone (gr.skip()).
        abandoned = yield from _paced(studio, session, stream, words, log, lambda: (
            caption_view(session, words=words, status="streaming",
                         message=f"Generating… {_count(len(words), 'word')}"),
            " ".join(w["text"] for w in words), gr.skip(), gr.skip()))
        if abandoned:
            yield _NOTHING
            return
        gen_id = log(stream.cut)
        record = records.caption_record(studio, words, session_scale(session), session_size(session),
                                        prompts=prompts_model, options=options, generation_id=gen_id,
                                        cut=stream.cut, served=stream.served)
        files = _keep_caption(studio, session, array, record, "caption", {
            "words": words, "text": record["text"], "prompts": prompts_model, "decoding": options,
            "generation_id": gen_id})
    finally:
        session.streaming = None
    done = _count(len(words), "word") + cut_note(stream) + (
        f" · saved as generation #{gen_id}" if gen_id is not None else "")
    if options["do_sample"]:
        done += f" · seed {options['seed']}"
    if session.replaced:  # logged (it was shown), but the page has moved on to another image
        yield _NOTHING
        return
    yield (caption_view(session, words=words, status="done", message=done), record["text"], files, session)


def trace_words(studio: Studio, array: np.ndarray, caption: str | None, *, points=None, point_labels=None,
                box=None) -> tuple[list[dict], float, ServedBy]:
    """A given caption's words with their boxes ({index, text, box}, model-frame pixels), its score and the
    weights that traced it (`predictor.reading()`)."""
    caption = imaging.check_text(caption)
    if caption is None:
        raise ValueError("Type the caption to trace.")
    with studio.predictor.reading() as served:
        traced = studio.predictor.trace(studio.predictor.set_image(array), caption, points=points,
                                        point_labels=point_labels, box=box)
    return [w.to_dict() for w in traced.words], traced.score, served


@user_errors
def trace(studio: Studio, session: Session | None, caption: str | None, visitor: records.Visitor | None = None
          ) -> tuple:
    """Trace a caption the user typed (MITR's controlled trace generation): the decoder reads the caption under
    the current prompts and every word gets the box the location head gives it. Shown, downloadable and logged
    like a generated caption (task caption, extra.traced), so an annotator can correct it in the Annotate tab.
    Returns (caption view, caption text, files, session)."""
    session = ensure_session(session)
    require_image(session)
    if session.streaming is not None:  # its frames would overwrite the trace in the same view
        raise ValueError("A caption is streaming: wait for it to finish, then trace the caption you typed.")
    points, labels, box = checked_prompts(session)
    array = session.array
    words, score, served = trace_words(studio, array, caption, points=points, point_labels=labels, box=box)
    text = " ".join(w["text"] for w in words)
    prompts_model = records.model_prompts(points, labels, box, None)
    gen_id = records.log_output(studio, session, array, "caption", [w["text"] for w in words],
                                [w["box"] for w in words],
                                prompts=prompts_model, extra={"traced": True, "text": text, "score": score},
                                visitor=visitor, served=served)
    record = records.caption_record(studio, words, session_scale(session), session_size(session),
                                    prompts=prompts_model, options=None, generation_id=gen_id, task="trace",
                                    served=served)
    record["score"] = score
    session.inspect = session.pending = None
    files = _keep_caption(studio, session, array, record, "trace", {
        "words": words, "text": text, "prompts": prompts_model, "decoding": None, "traced": True,
        "generation_id": gen_id})
    done = f"Traced {_count(len(words), 'word')} · geometric-mean token probability {score:.2f}" + (
        f" · saved as generation #{gen_id}" if gen_id is not None else "")
    return caption_view(session, words=words, status="done", message=done), text, files, session


def _keep_caption(studio: Studio, session: Session, array: np.ndarray, record: dict, name: str,
                  caption: dict) -> list[str]:
    """Remember a caption shown in the Caption tab (`Session.caption`, and `Session.last` for the Annotate tab)
    and write its downloads, `<name>.json` and `<name>_overlay.png` (drawn on `array`, the image it was made
    from); returns their paths."""
    session.caption = caption
    session.last = {"task": "caption", **caption}
    prompts = caption["prompts"]
    points = [(x, y, int(label)) for (x, y), label in zip(prompts["points"], prompts["point_labels"])]
    overlay = render.trace_overlay(array, caption["words"], points=points, box=prompts["box"])
    folder = records.download_dir(studio)
    return [records.write_json(folder, f"{name}.json", record),
            records.write_png(folder, f"{name}_overlay.png", overlay)]


# ------------------------------------------------------------------------------------------ referring

def parse_expressions(text: str | None) -> list[str]:
    if text is not None and len(text) > 8 * MAX_EXPRESSIONS * imaging.MAX_TEXT_CHARS:  # before splitting it
        raise ValueError(f"the expressions are {len(text)} characters long; at most {MAX_EXPRESSIONS} of "
                         f"{imaging.MAX_TEXT_CHARS} characters each")
    lines = [" ".join(line.split()) for line in (text or "").splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        raise ValueError("Type at least one referring expression (one per line), e.g. “the red circle”.")
    if len(lines) > MAX_EXPRESSIONS:
        raise ValueError(f"{len(lines)} expressions given; at most {MAX_EXPRESSIONS} at once")
    for line in lines:
        imaging.check_text(line)
    return lines


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "expression"


@user_errors
def refer(studio: Studio, session: Session | None, expressions: str | None,
          visitor: records.Visitor | None = None) -> tuple:
    """Referring localisation + segmentation. Returns (session, refer view, files)."""
    session = ensure_session(session)
    require_image(session)
    # Read before the results are kept on the session: a change event that comes after that (load_image) leaves
    # this view to this update, so whether the page's views show the picture yet is what it found now
    send_picture = not session.shown
    lines = parse_expressions(expressions)
    with studio.predictor.reading() as served:
        referrals = studio.predictor.refer(studio.predictor.set_image(session.array), lines)
    boxes = [list(r.box) for r in referrals]
    gen_id = records.log_output(studio, session, session.array, "refer", lines, boxes,
                                prompts={"expressions": lines},
                                extra={"scores": [r.score for r in referrals],
                                       "mask_scores": [r.mask_score for r in referrals]},
                                visitor=visitor, served=served)
    low = studio.low_refer_score()  # from the checkpoint's evaluation, when it has one

    def is_low(r: Any) -> bool:
        return low is not None and r.score < low

    def detail(r: Any) -> str:
        text = f"score {r.score:.2f} · mask {r.mask_score:.2f}"
        return text + " · low score: may not be in the image" if is_low(r) else text

    # `low` also tells the viewer to draw the box dashed and the mask faint
    regions = [{"box": [round(c, 2) for c in r.box], "label": r.expression, "detail": detail(r), "score": r.score,
                "low": is_low(r), "color": render.palette_color(i),
                "mask": render.mask_overlay_url(r.mask, render.palette_color(i))}
               for i, r in enumerate(referrals)]
    session.refer = [{"expression": r.expression, "box": list(r.box), "score": r.score,
                      "mask_score": r.mask_score} for r in referrals]
    session.last = {"task": "refer", "results": session.refer, "generation_id": gen_id}
    scale = session_scale(session)
    size = session_size(session)
    folder = records.download_dir(studio)
    record = records.refer_record(studio, referrals, scale, size, gen_id, served)
    files = [records.write_json(folder, "refer.json", record)]
    for i, r in enumerate(referrals):
        files.append(records.write_png(folder, f"mask_{i + 1}_{_slug(r.expression)}.png",
                                       render.mask_png(r.mask, size)))
    files.append(records.write_png(folder, "refer_overlay.png", render.regions_overlay(
        session.array, [{"box": r.box, "label": f"{i + 1}. {r.expression}"} for i, r in enumerate(referrals)],
        [r.mask for r in referrals])))
    msg = f"{len(referrals)} expression(s) located" + (f" · generation #{gen_id}" if gen_id is not None else "")
    # the picture goes along when the page's views do not show it yet (Locate loaded it: workspace.shown_session)
    view = render.viewer_value(session.image, mode="refer", include_src=send_picture, regions=regions,
                               clickable=False, status="done", message=msg)
    return session, view, files


# ------------------------------------------------------------------------------------------ dense captions

def dense_options(score_threshold: Any, max_regions: Any) -> tuple[float, int]:
    try:
        threshold = float(score_threshold)
    except (TypeError, ValueError) as err:
        raise ValueError("the score threshold must be a number") from err
    if not 0.0 <= threshold <= 1.0:
        raise ValueError("the score threshold must be between 0 and 1")
    # read as the library reads counts: 5.9 regions were cut to 5, True taken as 1, infinity a server error
    regions = form_whole_number(max_regions, "max regions must be a whole number")
    if not 1 <= regions <= 100:
        raise ValueError("max regions must be between 1 and 100")
    return threshold, regions


def _dense_regions(regions: Sequence[dict], selected: int | None = None) -> list[dict]:
    return [{"box": [round(c, 2) for c in r["box"]], "label": r["caption"] or "(no words)",
             "detail": "drawn, not detected" if r["score"] is None else f"{r['score']:.2f}", "score": r["score"],
             "color": render.palette_color(i), "mask": None}
            for i, r in enumerate(regions)]


def dense_view(session: Session, *, words: Sequence[dict] = (), status: str = "idle", message: str = "",
               include_src: bool = False) -> dict:
    return render.viewer_value(session.image, mode="dense", include_src=include_src,
                               regions=_dense_regions(session.dense or []), selected=session.dense_selected,
                               words=words, status=status, message=message)


@user_errors
def dense(studio: Studio, session: Session | None, score_threshold: Any, max_regions: Any,
          visitor: records.Visitor | None = None) -> tuple:
    """Dense captioning: proposals -> one batched captioning pass. Returns (session, dense view, files)."""
    session = ensure_session(session)
    require_image(session)
    send_picture = not session.shown  # read before the results are kept on the session (see refer)
    threshold, top_k = dense_options(score_threshold, max_regions)
    with studio.predictor.reading() as served:
        regions = studio.predictor.dense_caption(studio.predictor.set_image(session.array), max_regions=top_k,
                                                 score_threshold=threshold)
    session.dense = [{"box": list(r.box), "score": r.score, "caption": r.caption.text,
                      "words": [w.to_dict() for w in r.caption.words]} for r in regions]
    session.dense_selected, session.dense_words = None, []
    gen_id = None
    if regions:
        gen_id = records.log_output(studio, session, session.array, "dense", [r["caption"] for r in session.dense],
                                    [r["box"] for r in session.dense],
                                    prompts={"score_threshold": threshold, "max_regions": top_k},
                                    extra={"scores": [r["score"] for r in session.dense]}, visitor=visitor,
                                    served=served)
    session.last = {"task": "dense", "regions": session.dense, "generation_id": gen_id}
    folder = records.download_dir(studio)
    record = records.dense_record(studio, session.dense, session_scale(session), session_size(session), gen_id,
                                  served)
    files = [records.write_json(folder, "dense.json", record)]
    if regions:
        files.append(records.write_png(folder, "dense_overlay.png", render.regions_overlay(
            session.array, [{"box": r["box"], "label": f"{i + 1}. {r['caption']}"}
                            for i, r in enumerate(session.dense)])))
        msg = (f"{len(regions)} region(s)" + (f" · generation #{gen_id}" if gen_id is not None else "")
               + ". Click a region (or drag a box) to trace its caption.")
    else:
        msg = f"No region scored above {threshold:.2f}: lower the score threshold."
    # the picture goes along when the page's views do not show it yet (Dense loaded it: workspace.shown_session)
    return session, dense_view(session, status="done", message=msg, include_src=send_picture), files


def region_at(regions: Sequence[dict], x: float, y: float) -> int | None:
    """The smallest region whose box covers (x, y)."""
    hits = [(max(r["box"][2] - r["box"][0], 0) * max(r["box"][3] - r["box"][1], 0), i) for i, r in enumerate(regions)
            if r["box"][0] <= x <= r["box"][2] and r["box"][1] <= y <= r["box"][3]]
    return min(hits)[1] if hits else None


@user_errors
@streams_on_session
def dense_select(studio: Studio, session: Session | None, data: Any, visitor: records.Visitor | None = None
                 ) -> Iterator[tuple]:
    """Trace-caption one region: data = {i} (a listed region), {x, y} (a click: the smallest region under it)
    or {box} (a dragged box). Streams (session, dense view, region caption text)."""
    session = ensure_session(session)
    require_image(session)
    regions = session.dense or []
    data = data if isinstance(data, dict) else {}
    if "box" in data:
        box = imaging.check_box([float(c) for c in data["box"]], session.image["width"], session.image["height"])
        box, index = [round(float(c), 1) for c in box], None
    else:
        if "i" in data:
            index = int(data["i"])
            if not 0 <= index < len(regions):
                raise ValueError("that region no longer exists: detect regions again")
        else:
            x, y = click_point(data, session)
            index = region_at(regions, x, y)
            if index is None:
                raise ValueError("No detected region there: click inside a box, or drag a box of your own.")
        box = regions[index]["box"]
    session.dense_selected = index
    options = decoding_options(None, False, 1.0, 1.0, None, default_words=studio.default_max_words,
                               limit=studio.max_words, repetition_penalty=studio.penalty())
    extra_region = {"region_box": box}
    view_regions = list(regions)
    if index is None:  # a dragged box: show it as the selected region
        view_regions = regions + [{"box": box, "score": None, "caption": "your box", "words": []}]  # no score
        session.dense_selected = len(regions)
    words: list[dict] = []
    shown = dataclasses.replace(session, dense=view_regions)
    yield session, dense_view(shown, status="streaming", message="Tracing the region's caption…"), ""

    def log(cut: bool, abandoned: str | None = None) -> int | None:
        extra = {"decoding": options, "text": " ".join(w["text"] for w in words), "cut": cut, **extra_region}
        if abandoned:  # shown in part, as a caption abandoned in the Caption tab
            extra["abandoned"] = abandoned
        return records.log_output(studio, session, session.array, "caption", [w["text"] for w in words],
                                  [w["box"] for w in words], prompts={"box": box, "region": index}, extra=extra,
                                  visitor=visitor, served=stream.served)

    stream = WordStream(studio, session.array, box=box, options=options)
    abandoned = yield from _paced(studio, session, stream, words, log, lambda: (
        session, dense_view(shown, words=words, status="streaming", message=f"Tracing… {_count(len(words), 'word')}"),
        " ".join(w["text"] for w in words)))
    if abandoned:
        yield gr.skip(), gr.skip(), gr.skip()
        return
    text = " ".join(w["text"] for w in words)
    gen_id = log(stream.cut)
    session.dense_words = words
    session.last = {"task": "caption", "words": words, "text": text, "prompts": {"box": box},
                    "generation_id": gen_id}
    label = f"region {index + 1}" if index is not None else "your box"
    yield session, dense_view(shown, words=words, status="done",
                              message=f"{label}: {_count(len(words), 'word')}" + cut_note(stream) + (
                                  f" · generation #{gen_id}" if gen_id is not None else "")), text


# ------------------------------------------------------------------------------------------ API

# ------------------------------------------------------------------------------------------ model panel

def model_panel(studio: Studio) -> str:
    """The Model tab: the model's facts, then its evaluation when the checkpoint folder holds a metrics.json
    (every value escaped: the file is data)."""
    info = studio.model_info()
    rows = [("Checkpoint", info["checkpoint"]), ("Preset", info["preset"]), ("Weights version", info["version"]),
            ("Device", info["device"]), ("dtype", info["dtype"]), ("Parameters", f"{info['parameters']:,}"),
            ("Adapter in use", info["adapter"] or "none (base model)"),
            ("Adapters available", ", ".join(info["adapters"]) or "none"),
            ("Caption repetition penalty (default)", f"{info['repetition_penalty']:g}")]
    body = "".join(f"<tr><th>{render.escape(name)}</th><td><code>{render.escape(value)}</code></td></tr>"
                   for name, value in rows)
    return f'<table class="px-model-table">{body}</table>' + _evaluation_table(studio.evaluation)


def _evaluation_table(result: dict | None) -> str:
    """metrics.json as a table: metric, model, baseline and what the baseline is (the base model's numbers:
    an active adapter is not what was evaluated)."""
    if result is None:
        return ""
    if "error" in result:
        return f'<p class="px-model-note">Evaluation: {render.escape(result["error"])}</p>'

    def number(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, int | float) and not isinstance(value, bool) else "–"

    settings = result.get("settings") if isinstance(result.get("settings"), dict) else {}
    counts = result.get("counts") if isinstance(result.get("counts"), dict) else {}
    baselines = result.get("baselines") if isinstance(result.get("baselines"), dict) else {}
    head = (f"Evaluation of the base model (metrics.json: split {settings.get('split', '?')}, "
            f"{counts.get('images', '?')} images; docs/metrics.md defines each metric)")
    rows = "".join(
        f"<tr><td><code>{render.escape(key)}</code></td><td>{number(pair.get('model'))}</td>"
        f"<td>{number(pair.get('baseline'))}</td><td>{render.escape(baselines.get(key) or '–')}</td></tr>"
        for key, pair in result["metrics"].items() if isinstance(pair, dict))
    return (f'<p class="px-model-note">{render.escape(head)}</p><table class="px-model-table px-eval-table">'
            f"<tr><th>metric</th><th>model</th><th>baseline</th><th>baseline is</th></tr>{rows}</table>")
