"""The studio's workspace: what users share, what each user holds, their image and their prompts.

`Studio` holds what every user shares (the thread-safe predictor, the annotation store, settings); a `Session`
(kept per browser tab in `gr.State`) holds one user's image, prompts and last results. Nothing mutable lives at
module level.

Coordinate frames. The model sees the image as `pixelllm.image.load_image` returns it (downscaled when a side
exceeds 2048 px). The viewer, the prompts and the store use that frame; downloads and the API map coordinates
back to the pixels of the image the user sent (after EXIF rotation), so a client never sees the downscale.
The callbacks that run the model are in `pixelllm.ui.callbacks`, the records for the store and the downloads in
`pixelllm.ui.records`, the HTTP API's endpoints in `pixelllm.ui.api`; this module holds the state they share and
the callbacks that only edit it (loading an image, adding and removing prompts).

Every user mistake raises `ValueError` inside and leaves as `gr.Error` (see `user_errors`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import io
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from pixelllm import image as imaging
from pixelllm.ui import render

log = logging.getLogger(__name__)

CLICK_MODES = {"Positive point": "positive", "Negative point": "negative", "Box (2 clicks)": "box",
               "Inspect words": "inspect"}


def user_errors(fn: Callable) -> Callable:
    """Turn ValueError (a user mistake: no image, bad box, empty expression...) into gr.Error, its message
    escaped (the page renders it as HTML, and it may quote what the user sent). The user gets the message; the
    host's log gets no traceback (gradio printed two, ~40 lines, for every refused call; real faults still print).
    The traceback goes to this module's logger at DEBUG: a ValueError from a bug, not the user, is found there."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args: Any, **kwargs: Any) -> Iterator:
            try:
                yield from fn(*args, **kwargs)
            except gr.Error:
                raise
            except ValueError as err:
                raise _refused(fn, err) from err
        return generator

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except ValueError as err:
            raise _refused(fn, err) from err
    return wrapper


def _refused(fn: Callable, err: ValueError) -> gr.Error:
    log.debug("%s refused: %s", fn.__name__, err, exc_info=err)
    return gr.Error(render.notice(err), print_exception=False)


STREAM_STOP_WAIT_S = 1.0

#: The queue's concurrency group of every event that runs the model (captions, traces, referring, dense captions,
#: region captions, the API endpoints, the adapter comparison): `--concurrency N` bounds them all together. Without
#: a shared id gradio gives each event listener its own group of N, so N = 1 still ran /caption, /trace, /refer and
#: /dense (and each tab's buttons) at once. Loading an image (it encodes it) keeps its own group: it stops a caption
#: streaming on the old image, which it could not do queued behind that caption.
MODEL_CALLS = "model"


def streams_on_session(fn: Callable) -> Callable:
    """A streaming handler `fn(studio, session, ...)`: counted in `session.streams` while it runs (until it ends or
    is closed), which `load_image` waits on."""
    @functools.wraps(fn)
    def generator(studio: Any, session: Any, *args: Any, **kwargs: Any) -> Iterator:
        owner = session if isinstance(session, Session) else None
        if owner is not None:
            owner.streams += 1
        try:
            yield from fn(studio, session, *args, **kwargs)
        finally:
            if owner is not None:
                owner.streams -= 1
    return generator


def for_the_shown_image(fn: Callable) -> Callable:
    """A handler whose first argument is the page's Session: its updates are dropped (gr.skip()) when the user
    picked another image while it ran. They would write the previous image's session and views back into the
    page, and Referring, Dense and a new caption would then work on an image no longer shown."""
    def left_behind(state: Any) -> bool:
        return isinstance(state, Session) and state.replaced

    def nothing(out: Any) -> Any:
        return tuple(gr.skip() for _ in out) if isinstance(out, tuple) else gr.skip()

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(state: Any, *args: Any, **kwargs: Any) -> Iterator:
            with contextlib.closing(fn(state, *args, **kwargs)) as updates:  # closed at once: it logs what it showed
                for out in updates:
                    if left_behind(state):
                        yield nothing(out)
                        return
                    yield out
        return generator

    @functools.wraps(fn)
    def wrapper(state: Any, *args: Any, **kwargs: Any) -> Any:
        out = fn(state, *args, **kwargs)
        return nothing(out) if left_behind(state) else out
    return wrapper


# ------------------------------------------------------------------------------------------ shared + per user

@dataclasses.dataclass
class Studio:
    """What all users share. `predictor` is thread-safe; `store` may be None (nothing is logged)."""

    predictor: Any
    store: Any = None
    checkpoint: str | None = None
    examples: list[str] = dataclasses.field(default_factory=list)
    max_words: int = 128
    min_word_interval: float = 0.03  # pace streamed words so the trace visibly draws on fast hardware
    download_root: Path | None = None
    store_notice: str | None = None  # Markdown atop the Annotate tab: no store, or one a Space restart wipes

    @property
    def model(self) -> Any:
        return self.predictor.model

    @property
    def default_max_words(self) -> int:
        """The "Max words" default: the checkpoint's own token limit (a word is at least one token), so by default
        the model's end-of-sequence or that limit ends a caption, as in `predictor.caption` and the evaluation.
        (A fixed 40 cut half of the embedded model's narratives: images of 4-6 objects take 49-64 words.)"""
        return min(self.max_words, int(self.model.config.max_new_tokens))

    def penalty(self, value: Any = None) -> Any:
        """A caption's repetition penalty: the one given, or the checkpoint's default (None or blank)."""
        blank = value is None or (isinstance(value, str) and not value.strip())
        return self.model.config.repetition_penalty if blank else value

    @property
    def model_id(self) -> str:
        return str(self.checkpoint or getattr(self.model, "source", None) or "in-memory")

    @functools.cached_property
    def evaluation(self) -> dict[str, Any] | None:
        """``metrics.json`` beside a local checkpoint (what `python -m training.evaluate --json` wrote), or None
        when there is none; ``{"error": ...}`` when it cannot be read. Read once: the checkpoint is fixed for the
        process's life, and the referring callback consults it on every call."""
        folder = Path(self.model_id)
        if not folder.is_dir():  # a hub id, or a relative path app.py resolved from its own folder
            folder = Path(getattr(self.model, "directory", None) or folder)
        path = folder / "metrics.json"
        try:
            if not path.is_file():
                return None
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            return {"error": f"{path.name}: {err}"}
        if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
            return {"error": f"{path.name} has no metrics table"}
        return data

    def low_refer_score(self) -> float | None:
        """The median referring score of absent expressions in the checkpoint's evaluation (metrics.json's
        ``refer_score_quantiles``), under which the app marks a referral as low; None without one."""
        result = self.evaluation or {}
        try:
            value = float(result["refer_score_quantiles"]["absent"]["p50"])
        except (KeyError, TypeError, ValueError):
            return None
        return value if 0.0 < value < 1.0 else None

    def model_info(self) -> dict[str, Any]:
        model = self.model
        params = sum(p.numel() for p in model.parameters())
        return {
            "checkpoint": self.model_id,
            "preset": model.config.preset,
            "version": model.version,
            "device": str(self.predictor.device),
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "parameters": params,
            "adapter": self.predictor.adapter,
            "adapters": list(model.adapters),
            "repetition_penalty": model.config.repetition_penalty,
        }


@dataclasses.dataclass
class Session:
    """One user's working state (lives in gr.State)."""

    image: dict | None = None          # {key, width, height, src, orig_width, orig_height}
    array: np.ndarray | None = None    # HxWx3 uint8, the model frame
    sha: str | None = None             # the image's id in the annotation store, once stored
    prompts: list[dict] = dataclasses.field(default_factory=list)  # in click order, for undo
    pending: list[float] | None = None  # first corner of a box being drawn with two clicks
    inspect: dict | None = None        # {x, y}: the pixel inspected; its hits are those of the words shown
    caption: dict | None = None        # last caption result (model frame)
    streaming: list[dict] | None = None  # the words so far of the caption streaming now (callbacks.generate)
    refer: list[dict] | None = None
    dense: list[dict] | None = None
    dense_selected: int | None = None
    dense_words: list[dict] = dataclasses.field(default_factory=list)
    last: dict | None = None           # the last output shown, any task: what an Annotate tab would correct
    replaced: bool = False             # a new image made a new Session: a caption still streaming stops
    streams: int = 0                   # captions streaming on this session (load_image waits for them to stop)
    source: str | None = None          # the file this session's image was loaded from (gradio's upload path)
    successor: Session | None = None   # the session a new image replaced this one with (load_image)
    loading: threading.Lock = dataclasses.field(default_factory=threading.Lock, repr=False, compare=False)


def ensure_session(session: Session | None) -> Session:
    return session if isinstance(session, Session) else Session()


# A page's session is dropped after the app's session cap (pixelllm.ui.STATE_SESSION_CAPACITY) of more recent ones:
# the page still shows its image, the server no longer has it
NO_IMAGE = "Upload, paste or pick an example image first (or pick it again if the page sat idle for long)."


def require_image(session: Session) -> None:
    if session.array is None or session.image is None:
        raise ValueError(NO_IMAGE)


# ------------------------------------------------------------------------------------------ images

@dataclasses.dataclass
class LoadedImage:
    array: np.ndarray      # model frame (maybe downscaled)
    orig_width: int        # the image as the user sent it, after EXIF rotation
    orig_height: int

    @property
    def scale(self) -> tuple[float, float]:
        """Original pixels per model-frame pixel (x, y)."""
        return self.orig_width / self.array.shape[1], self.orig_height / self.array.shape[0]

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) of the image as the user sent it."""
        return self.orig_width, self.orig_height


def load_user_image(source: str | os.PathLike | bytes) -> LoadedImage:
    """Decode an upload with pixelllm.image.load_image and remember its original size for mapping back."""
    if source is None or (isinstance(source, str) and not source):
        raise ValueError("Upload, paste or pick an example image first.")
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    array = imaging.load_image(data)
    orig_w, orig_h = array.shape[1], array.shape[0]
    if max(array.shape[:2]) >= imaging.MAX_SIDE:  # maybe downscaled: read the true (oriented) size
        with Image.open(io.BytesIO(data)) as img:
            orig_w, orig_h = img.size
            if img.getexif().get(0x0112) in (5, 6, 7, 8):  # EXIF orientations that swap the axes
                orig_w, orig_h = orig_h, orig_w
    return LoadedImage(array=array, orig_width=int(orig_w), orig_height=int(orig_h))


def session_scale(session: Session) -> tuple[float, float]:
    img = session.image
    return img["orig_width"] / img["width"], img["orig_height"] / img["height"]


def session_size(session: Session) -> tuple[int, int]:
    """(width, height) of the session's image as the user sent it."""
    return session.image["orig_width"], session.image["orig_height"]


def empty_views() -> tuple[dict, dict, dict]:
    return (render.viewer_value(None, mode="caption"), render.viewer_value(None, mode="refer"),
            render.viewer_value(None, mode="dense"))


@user_errors
def load_image(studio: Studio, source: str | None, session: Session | None) -> tuple:
    """A new image (upload, paste, example) or none (cleared): reset the session, encode the image once
    (warms the predictor's embedding cache) and send it to the three viewers.
    Returns (session, caption view, refer view, dense view). The previous session is marked `replaced`, so a
    caption still streaming on it stops instead of writing the old image back into the page's state.

    The image the session already holds (the same file) keeps it: (session, gr.skip() x 3). Gradio 6 fires the
    image's `change` two or three times for one upload over another image, two of them at once and one after the
    first load's answer; each made a fresh Session, so the prompts clicked, or the caption started, as soon as
    the new image showed were dropped again (a photo: every time within half a second)."""
    if not isinstance(session, Session):
        return _open_image(studio, source, None)
    with session.loading:  # the calls fired at once carry the same session: the second one waits for the first
        current = session
        while current.successor is not None:
            current = current.successor
        if source and current.source == source and not current.replaced:  # (replaced: its load failed midway)
            return current, gr.skip(), gr.skip(), gr.skip()
        opened = _open_image(studio, source, current)
        current.successor = opened[0]
        return opened


def _open_image(studio: Studio, source: str | None, session: Session | None) -> tuple:
    """`load_image` for a new file (or none): the new session and the three views."""
    # decoded first: a file refused (not an image, too large) leaves the page's session working on its image
    loaded = load_user_image(source) if source else None
    if isinstance(session, Session):
        session.replaced = True
        # A caption streaming on the old session stops at its next word: let it finish first (at most a second),
        # so that none of its frames reaches the page after this image's views (the old picture came back)
        deadline = time.monotonic() + STREAM_STOP_WAIT_S
        while session.streams > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    if loaded is None:
        return (Session(), *empty_views())
    studio.predictor.set_image(loaded.array)
    h, w = loaded.array.shape[:2]
    session = Session(array=loaded.array, source=source if isinstance(source, str) else None)
    session.image = {"key": imaging.image_key(loaded.array), "width": w, "height": h,
                     "src": render.display_data_url(loaded.array), "orig_width": loaded.orig_width,
                     "orig_height": loaded.orig_height}
    note = "" if (w, h) == (loaded.orig_width, loaded.orig_height) else (
        f" (downscaled from {loaded.orig_width}×{loaded.orig_height}; downloads use the original pixels)")
    return (
        session,
        caption_view(session, message=f"Image {w}×{h}{note}. Click to add prompts, or Generate for the whole image."),
        render.viewer_value(session.image, mode="refer", clickable=False,
                            message="Type referring expressions, one per line, then Locate."),
        render.viewer_value(session.image, mode="dense",
                            message="Detect regions, then click one (or drag a box) for its traced caption."),
    )


# ------------------------------------------------------------------------------------------ prompts

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
