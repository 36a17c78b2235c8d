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

Every user mistake raises `ValueError` inside and leaves as `gr.Error` (see `user_errors`); so does a new image
whose load failed on a server fault (`IMAGE_NOT_LOADED`), the page keeping the image it showed.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import time
from pathlib import Path

import gradio as gr
import numpy as np
from gradio.utils import get_upload_folder, is_in_or_equal
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
    IMAGE_LOST,
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

log = logging.getLogger(__name__)

# A load that failed on a server fault, not a user mistake (an OSError or MemoryError decoding the file, the image
# encoder's RuntimeError): `_new_session` turns it into this refusal, with the fault's type; its traceback is logged
IMAGE_NOT_LOADED = ("The new image could not be loaded (a fault on the server: {fault}). The page keeps the image "
                    "it showed: try again (clear the image and upload it anew), or pick another image.")

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
    the new image showed were dropped again (a photo: every time within half a second). An image an action loaded
    first (`shown_session`: Generate, Trace, Locate or Dense pressed while it loaded) keeps its session too, but its
    views still go to the page, once: all but those the action drew itself (a caption streaming or shown, referrals,
    dense regions), which its own update carries with the image.
    A file refused, or one whose load failed on a server fault (`IMAGE_NOT_LOADED`: the decoder's OSError or
    MemoryError, the encoder's RuntimeError), leaves the session as it was and is remembered on it
    (`Session.refused`): an action then keeps to the image shown."""
    if not isinstance(session, Session):
        opened = _open_image(studio, source, None)
        opened.shown = True
        return opened, *image_views(opened)
    with session.loading:  # the calls fired at once carry the same session: the second one waits for the first
        current = newest(session)
        if source and current.source == source:
            if current.shown:
                return current, gr.skip(), gr.skip(), gr.skip()
            current.shown = True  # an action loaded it (shown_session): the views go now, but for the action's own
            cap, ref, dense = image_views(current)
            return (current, gr.skip() if current.streaming is not None or current.caption else cap,
                    gr.skip() if current.refer is not None else ref, gr.skip() if current.dense is not None else dense)
        opened = _open_over(studio, source, current)
        opened.shown = True
        return opened, *image_views(opened)


def newest(session: Session) -> Session:
    """The session the last image loaded over `session` made (`Session.successor`), or `session` itself."""
    while session.successor is not None:
        session = session.successor
    return session


def _uploaded(source: str) -> bool:
    """A file in gradio's upload folder: what gradio's own preprocessing accepts from a page as a file."""
    try:
        return Path(source).is_file() and is_in_or_equal(source, get_upload_folder())  # both resolved: links, ".."
    except (OSError, ValueError):
        return False


@user_errors
def shown_session(studio: Studio, source: str | None, session: Session | None, showing: str | None = ""
                  ) -> Session | None:
    """The page's session for an action on the image the page shows (Generate, Trace, Locate, Dense: layout.py's
    `SEND_SHOWN_IMAGE` sends, when it is pressed, the image input's file as `source`, "" without one, and as
    `showing` the key of the image the action's view shows, "" for none).

    Pressed right after the first upload, an action ran before that image's load had given the page its session
    (its change event still running, or not started: gradio's queue starts the events of different concurrency
    groups in any order) and answered "Upload ... first"; pressed right after another upload, it worked on the
    previous image, which the new one then stopped. Both events now carry the page's one Session (an empty one at
    first) and meet on `Session.loading`: the action finds the image loaded, or loads it itself and the image's
    `load_image` only sends the views the action did not draw.
    The session as it is without a source, for the image it holds, for a file a load refused (the page works on
    its image), and for a path that is not an upload gradio holds (gone with its cache after an hour, or forged).
    The file is loaded only while the session's newest image is still the one `showing` names: an action that waited
    in the queue (the model's slots busy) while the page moved on to another image (its change event loaded it)
    sends the file it showed then, and loading it brought the image the page had left back over the one it shows.

    A page whose views show an image while its session never held one (`_dropped`) has lost its state: gradio keeps
    only the `STATE_SESSION_CAPACITY` most recent pages' states, and a closed page's for an hour, then gives the page
    a fresh empty Session. Its file is opened again when gradio still holds it as an upload (the views already show
    that image: load_image, if its change event comes, leaves them); otherwise the action is refused with
    `IMAGE_LOST`, not the "Upload ... first" of a page that shows no image."""
    if not isinstance(session, Session):
        return session
    with session.loading:
        current = newest(session)
        if source and current.source == source:
            return current
        dropped = _dropped(current, showing)
        if not source or current.refused == source or not _uploaded(source):
            if dropped:
                raise ValueError(IMAGE_LOST)
            return current
        if not dropped and (current.image or {}).get("key", "") != (showing or ""):
            return current
        opened = _open_over(studio, source, current)
        # reopened for a dropped state: the page's views show it already, unless its image input holds a newer file
        # than they do (that file's change event, still to come, then sends them)
        opened.shown = dropped and opened.image is not None and opened.image["key"] == showing
        return opened


def _dropped(current: Session, showing: str | None) -> bool:
    """The page's views show an image (`showing`, its key) but its newest session never held one: gradio dropped the
    page's state and gave it a fresh copy of the initial empty Session. (A cleared image's session was sent to the
    page, `shown`; the initial session never was: the page's first image replaces it.)"""
    return bool(showing) and current.image is None and not current.shown


def _open_over(studio: Studio, source: str | None, current: Session) -> Session:
    """`_open_image` over the page's newest session `current` (under its `loading` lock): the new session becomes
    its successor; a file refused, or one whose load failed (`IMAGE_NOT_LOADED`), is remembered on it
    (`Session.refused`), which keeps its image."""
    try:
        return _open_image(studio, source, current)
    except ValueError:
        current.refused = source
        raise


def _open_image(studio: Studio, source: str | None, session: Session | None) -> Session:
    """A new session for a new file (or none), its image encoded; `session`, the one it replaces, gets it as its
    `successor` (which makes it `replaced`)."""
    # Decoded and encoded first: a load that fails (a file refused, a fault in the decoder or the encoder) leaves the
    # page's session as it was, working on its image, and a caption streaming on it goes on. (Marked replaced first,
    # a fault left the page a session with no successor: its clicks and actions were dropped without a word.)
    opened = _new_session(studio, source)
    if isinstance(session, Session):
        session.successor = opened
        # A caption streaming on the old session stops at its next word: let it finish first (at most a second),
        # so that none of its frames reaches the page after this image's views (the old picture came back)
        deadline = time.monotonic() + STREAM_STOP_WAIT_S
        while session.streams > 0 and time.monotonic() < deadline:
            time.sleep(0.01)
    return opened


def _new_session(studio: Studio, source: str | None) -> Session:
    """A session on the file `source` (none without one), decoded and encoded (it warms the predictor's cache).
    A fault that is no user mistake leaves as the ValueError `IMAGE_NOT_LOADED`, its traceback in the host's log."""
    if not source:
        return Session()
    try:
        loaded = load_user_image(source)
        studio.predictor.set_image(loaded.array)
        h, w = loaded.array.shape[:2]
        image = {"key": imaging.image_key(loaded.array), "width": w, "height": h,
                 "src": render.display_data_url(loaded.array), "orig_width": loaded.orig_width,
                 "orig_height": loaded.orig_height}
    except ValueError:
        raise
    except Exception as err:  # noqa: BLE001 - any fault: the page keeps its image and says why
        log.exception("loading the image %s failed", source)
        raise ValueError(IMAGE_NOT_LOADED.format(fault=type(err).__name__)) from err
    return Session(array=loaded.array, source=source if isinstance(source, str) else None, image=image)


def image_views(session: Session) -> tuple[dict, dict, dict]:
    """The three viewers' values for a session's image as it was just opened (empty views without one)."""
    if session.image is None:
        return empty_views()
    w, h = session.image["width"], session.image["height"]
    orig = session.image["orig_width"], session.image["orig_height"]
    note = "" if (w, h) == orig else f" (downscaled from {orig[0]}×{orig[1]}; downloads use the original pixels)"
    return (
        caption_view(session, message=f"Image {w}×{h}{note}. Click to add prompts, or Generate for the whole image."),
        render.viewer_value(session.image, mode="refer", clickable=False,
                            message="Type referring expressions, one per line, then Locate."),
        render.viewer_value(session.image, mode="dense",
                            message="Detect regions, then click one (or drag a box) for its traced caption."),
    )
