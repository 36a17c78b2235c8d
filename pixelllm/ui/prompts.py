"""The Caption tab's prompts and its view: the points and boxes a user clicks or drags on the image (`click`,
`drag_box`, `undo_prompt`, `clear_prompts`), their arrays for the predictor (`prompt_arrays`, `checked_prompts`), and
the caption viewer's value drawn from them with the words shown (`caption_view`, Inspect words' `words_at`). Prompt
edits wait while a caption streams (`require_no_caption_streaming`). The session and its image are in
`workspace.py`, which re-exports these names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from pixelllm import image as imaging
from pixelllm.ui import render
from pixelllm.ui.state import CLICK_MODES, Session, ensure_session, require_image, user_errors


def prompt_arrays(prompts: Sequence[dict]) -> tuple[np.ndarray | None, np.ndarray | None, list[float] | None]:
    """Prompt list -> (points Nx2, labels N, box) for the predictor; the last box drawn wins."""
    pts = [p for p in prompts if p["kind"] == "point"]
    boxes = [p["box"] for p in prompts if p["kind"] == "box"]
    points = np.array([p["xy"] for p in pts], dtype=np.float64).reshape(-1, 2) if pts else None
    labels = np.array([p["label"] for p in pts], dtype=np.int64) if pts else None
    return points, labels, (boxes[-1] if boxes else None)


def checked_prompts(session: Session) -> tuple[np.ndarray | None, np.ndarray | None, list[float] | None]:
    """`prompt_arrays` of the session's prompts, refused with a clear message (negative-only points etc.) before
    the model runs."""
    points, labels, box = prompt_arrays(session.prompts)
    if points is not None:
        imaging.check_points(points, labels, session.image["width"], session.image["height"])
    return points, labels, box


def shown_words(session: Session) -> list[dict]:
    """The words the caption view shows: those streamed so far while a caption streams, else the last caption's."""
    if session.streaming is not None:
        return list(session.streaming)  # a copy: the stream appends to it from its own thread
    return session.caption["words"] if session.caption else []


def caption_view(session: Session, *, include_src: bool = True, words: Sequence[dict] | None = None,
                 status: str | None = None, message: str = "") -> dict:
    """The caption viewer's value: the session's prompts with `words` (default `shown_words`); status None:
    "streaming" while a caption streams, else "idle". An inspected pixel's hits are computed against these words,
    so a pixel inspected while a caption streams follows it to the finished caption."""
    points, labels, box = prompt_arrays(session.prompts)
    pts = [] if points is None else [(x, y, int(lab)) for (x, y), lab in zip(points.tolist(), labels.tolist())]
    if words is None:
        words = shown_words(session)
    if status is None:
        status = "streaming" if session.streaming is not None else "idle"
    inspect = None
    if session.inspect is not None:
        x, y = session.inspect["x"], session.inspect["y"]
        inspect = {"x": x, "y": y, "hits": words_at(words, x, y)}
    return render.viewer_value(session.image, mode="caption", include_src=include_src, points=pts, box=box,
                               pending=session.pending, words=words, inspect=inspect, status=status,
                               message=message)


CAPTION_STREAMING = ("A caption is streaming with the prompts shown: wait for it to finish, then edit the prompts "
                     "(Inspect words works meanwhile).")


def require_no_caption_streaming(session: Session) -> None:
    """Prompt edits wait for the caption streaming on the page: the view draws the prompts with its words, and a
    point added meanwhile showed beside a caption made without it (the download and the store kept the true ones)."""
    if session.streaming is not None:
        raise ValueError(CAPTION_STREAMING)


def _prompt_summary(session: Session) -> str:
    points, labels, box = prompt_arrays(session.prompts)
    parts = []
    if points is not None:
        pos = int((labels == 1).sum())
        parts.append(f"{pos} positive / {len(labels) - pos} negative point(s)")
    if box is not None:
        parts.append("box " + ", ".join(f"{c:.0f}" for c in box))
    if session.pending is not None:
        parts.append("box: click the opposite corner")
    return "Prompt: " + ("; ".join(parts) if parts else "none (whole image)")


def words_at(words: Sequence[dict], x: float, y: float) -> list[int]:
    """Indices of the words whose box covers pixel (x, y)."""
    return [i for i, w in enumerate(words)
            if w["box"][0] <= x <= w["box"][2] and w["box"][1] <= y <= w["box"][3]]


def click_point(data: Any, session: Session) -> tuple[float, float]:
    try:
        x, y = float(data["x"]), float(data["y"])
    except (TypeError, KeyError, ValueError) as err:
        raise ValueError("the click did not carry image coordinates") from err
    if not (np.isfinite(x) and np.isfinite(y)):
        raise ValueError("the click did not carry image coordinates")
    return (min(max(x, 0.0), session.image["width"]), min(max(y, 0.0), session.image["height"]))


@user_errors
def click(session: Session | None, mode: str, data: Any) -> tuple[Session, dict]:
    """A click on the caption viewer at data = {x, y} (model-frame pixels). mode: a CLICK_MODES label or value:
    add a positive/negative point, place a box corner (the second click completes the box), or inspect which
    words' boxes cover the pixel. Returns (session, caption view)."""
    session = ensure_session(session)
    require_image(session)
    mode = CLICK_MODES.get(mode, mode)
    x, y = click_point(data, session)
    if mode != "inspect":
        require_no_caption_streaming(session)
    if mode in ("positive", "negative"):
        if len([p for p in session.prompts if p["kind"] == "point"]) >= imaging.MAX_POINTS:
            raise ValueError(f"at most {imaging.MAX_POINTS} points are allowed")
        session.prompts.append({"kind": "point", "xy": [x, y], "label": 1 if mode == "positive" else 0})
        session.pending = None
    elif mode == "box":
        if session.pending is None:
            session.pending = [x, y]
        else:
            x0, y0 = session.pending
            session.pending = None
            box = imaging.check_box((x0, y0, x, y), session.image["width"], session.image["height"])
            session.prompts.append({"kind": "box", "box": [round(float(c), 1) for c in box]})
    elif mode == "inspect":  # against the words shown: those streamed so far while a caption streams
        words = shown_words(session)
        session.inspect = {"x": x, "y": y}
        hits = len(words_at(words, x, y))
        msg = (f"{hits} word(s) cover ({x:.0f}, {y:.0f})" if words or session.streaming is not None else
               "Generate a caption first, then click a pixel to list the words whose boxes cover it.")
        return session, caption_view(session, include_src=False, words=words, message=msg)
    else:
        raise ValueError(f"unknown click mode {mode!r}")
    session.inspect = None
    return session, caption_view(session, include_src=False, message=_prompt_summary(session))


@user_errors
def drag_box(session: Session | None, data: Any) -> tuple[Session, dict]:
    """A box dragged on the caption viewer: data = {box: [x0, y0, x1, y1]} (model-frame pixels)."""
    session = ensure_session(session)
    require_image(session)
    require_no_caption_streaming(session)
    try:
        raw = [float(c) for c in data["box"]]
    except (TypeError, KeyError, ValueError) as err:
        raise ValueError("the drag did not carry a box") from err
    box = imaging.check_box(raw, session.image["width"], session.image["height"])
    session.prompts.append({"kind": "box", "box": [round(float(c), 1) for c in box]})
    session.pending = None
    session.inspect = None
    return session, caption_view(session, include_src=False, message=_prompt_summary(session))


@user_errors
def undo_prompt(session: Session | None) -> tuple[Session, dict]:
    session = ensure_session(session)
    require_no_caption_streaming(session)
    if session.pending is not None:
        session.pending = None
    elif session.prompts:
        session.prompts.pop()
    session.inspect = None
    return session, caption_view(session, include_src=False, message=_prompt_summary(session))


@user_errors
def clear_prompts(session: Session | None) -> tuple[Session, dict]:
    session = ensure_session(session)
    require_no_caption_streaming(session)
    session.prompts, session.pending, session.inspect = [], None, None
    return session, caption_view(session, include_src=False, message=_prompt_summary(session))
