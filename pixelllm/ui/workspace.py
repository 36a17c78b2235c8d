"""The studio's workspace: what users share, what each user holds, their image and their prompts.

`Studio` holds what every user shares (the thread-safe predictor, the annotation store, settings); a `Session`
(kept per browser tab in `gr.State`) holds one user's image, prompts and last results. Nothing mutable lives at
module level.

Coordinate frames. The model sees the image as `pixelllm.image.load_image` returns it (downscaled when a side
exceeds 2048 px). The viewer, the prompts and the store use that frame; downloads and the API map coordinates
back to the pixels of the image the user sent (after EXIF rotation), so a client never sees the downscale.
The callbacks that run the model are in `pixelllm.ui.callbacks`, the records for the store and the downloads in
`pixelllm.ui.records`, the HTTP API's endpoints in `pixelllm.ui.api`; this module holds loading an image and
re-exports the state they share (`state.py`: Studio, Session, the callback decorators) and the prompts
(`prompts.py`: clicks, boxes, the caption view), so callers import every name from here.

Every user mistake raises `ValueError` inside and leaves as `gr.Error` (see `user_errors`).
"""

from __future__ import annotations

import dataclasses
import io
import os
import time
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from pixelllm import image as imaging
from pixelllm.ui import render
from pixelllm.ui.prompts import (  # noqa: F401 - re-exported: callers use workspace.<name>
    CAPTION_STREAMING,
    caption_view,
    checked_prompts,
    clear_prompts,
    click,
    click_point,
    drag_box,
    prompt_arrays,
    require_no_caption_streaming,
    shown_words,
    undo_prompt,
    words_at,
)
from pixelllm.ui.state import (  # noqa: F401 - re-exported
    CLICK_MODES,
    MODEL_CALLS,
    NO_IMAGE,
    STREAM_STOP_WAIT_S,
    Session,
    Studio,
    ensure_session,
    for_the_shown_image,
    require_image,
    streams_on_session,
    user_errors,
)

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
