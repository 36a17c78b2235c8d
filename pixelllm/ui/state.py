"""The studio's state: what users share and what each user holds.

`Studio` holds what every user shares (the thread-safe predictor, the annotation store, settings); a `Session`
(kept per browser tab in `gr.State`) holds one user's image, prompts and last results. Nothing mutable lives at
module level. Beside them, the decorators every callback wears: `user_errors` (a user mistake raises `ValueError`
inside and leaves as `gr.Error`), `streams_on_session`, `for_the_shown_image`. `workspace.py` re-exports these
names, with the image loading; the prompts are in `prompts.py`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import inspect
import json
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

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
    streams: int = 0                   # captions streaming on this session (load_image waits for them to stop)
    source: str | None = None          # the file this session's image was loaded from (gradio's upload path)
    successor: Session | None = None   # the session a new image replaced this one with (load_image)
    shown: bool = False                # the page's views show this image: load_image sent them (an action may
                                       # load it first: shown_session), or it was reopened for a dropped state
    refused: str | None = None         # the last file load_image refused, or failed to load, on this session (the
                                       # page keeps its image)

    @property
    def replaced(self) -> bool:
        """A new image made a new Session (its `successor`): a caption still streaming on this one stops."""
        return self.successor is not None

    def __post_init__(self) -> None:
        # Held while an image loads over this session (load_image, shown_session). Not a field: gradio's config
        # of the gr.State holding the initial Session (layout.py) takes it through dataclasses.asdict, which copies
        # every field, and a lock cannot be copied.
        self.loading = threading.Lock()

    def __deepcopy__(self, memo: dict) -> Session:
        """A copy with a lock of its own. gr.State deep-copies its initial value, an empty Session, for every page
        (layout.py): the events of a page then all carry that one object, from the first."""
        return Session(**{field.name: copy.deepcopy(getattr(self, field.name), memo)
                          for field in dataclasses.fields(self)})


def ensure_session(session: Session | None) -> Session:
    return session if isinstance(session, Session) else Session()


# A page's session is dropped after the app's session cap (pixelllm.ui.STATE_SESSION_CAPACITY) of more recent ones:
# the page still shows its image, the server no longer has it
NO_IMAGE = "Upload, paste or pick an example image first (or pick it again if the page sat idle for long)."
# An action pressed on a page whose session was dropped while the file it shows cannot be opened again (gone with
# gradio's hourly cache cleanup): workspace.shown_session
IMAGE_LOST = ("The server no longer holds the image this page shows (the page sat idle for long, or many other "
              "visitors came since): upload or pick it again.")


def require_image(session: Session) -> None:
    if session.array is None or session.image is None:
        raise ValueError(NO_IMAGE)
