"""Rendering helpers of the studio: colours, escaping, data URLs, the viewer's value, and overlay PNGs.

The browser draws the live view (an SVG over the image, `static/viewer.js`); this module only prepares what
the viewer needs (plain JSON: boxes in the pixels of the image the model saw, colours) and renders the
downloadable PNG overlays with PIL (vectorised: masks are blended with numpy, never pixel by pixel).
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# The word gradient: first word -> last word ("plasma"-like, readable on light and dark images with a halo).
GRADIENT_STOPS = ("#3b0f9e", "#8c1ea8", "#d1477a", "#f58a3c", "#e8c518")
# Categorical colours for referring expressions and dense regions (Tableau 10), the hues that name no Shapes colour
# first: "the red diamond" drawn in blue over a red diamond read as a purple one (the Shapes world names red, green,
# blue, yellow, purple and orange), so cyan, pink, brown, grey and olive come before the rest.
PALETTE = ("#17becf", "#e377c2", "#8c564b", "#7f7f7f", "#bcbd22", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728",
           "#9467bd")
POSITIVE, NEGATIVE = "#16a34a", "#dc2626"
DISPLAY_MAX_SIDE = 1280  # the browser gets at most this; the SVG viewBox keeps model-frame coordinates
PNG_DISPLAY_MAX_PIXELS = 512 * 512  # small images go as exact PNG, larger ones as JPEG


def escape(text: object) -> str:
    """HTML-escape anything shown as HTML (model words, user text, file names)."""
    return html.escape(str(text), quote=True)


def notice(text: object) -> str:
    """Text for a `gr.Error` / `gr.Warning` message, which the page renders as HTML: `<`, `>` and `&` escaped,
    quotes kept (the message is element content, never an attribute, and `gradio_client` callers read it too)."""
    return html.escape(str(text), quote=False)


def _rgb(color: str) -> tuple[int, int, int]:
    color = color.lstrip("#")
    return int(color[0:2], 16), int(color[2:4], 16), int(color[4:6], 16)


def _hex(rgb: Sequence[float]) -> str:
    return "#" + "".join(f"{int(round(max(0, min(255, c)))):02x}" for c in rgb)


def gradient_colors(n: int) -> list[str]:
    """n colours from the first to the last word along GRADIENT_STOPS (linear in RGB between stops)."""
    if n <= 0:
        return []
    stops = np.array([_rgb(c) for c in GRADIENT_STOPS], dtype=np.float64)
    out = []
    for i in range(n):
        t = 0.0 if n == 1 else i / (n - 1)
        pos = t * (len(stops) - 1)
        k = min(int(pos), len(stops) - 2)
        frac = pos - k
        out.append(_hex(stops[k] * (1 - frac) + stops[k + 1] * frac))
    return out


def ink_for(color: str) -> str:
    """Black or white text, whichever reads better on `color` (WCAG relative luminance)."""
    def channel(c: int) -> float:
        c = c / 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(c) for c in _rgb(color))
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return "#000000" if luminance > 0.35 else "#ffffff"


def palette_color(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


# ------------------------------------------------------------------------------------------ encoding

def png_bytes(image: np.ndarray | Image.Image) -> bytes:
    img = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def display_data_url(image: np.ndarray) -> str:
    """The image for the browser, encoded once per upload: exact PNG when small, else a JPEG of at most
    DISPLAY_MAX_SIDE px (the viewer stretches it over the model-frame viewBox, so coordinates stay exact)."""
    h, w = image.shape[:2]
    if h * w <= PNG_DISPLAY_MAX_PIXELS:
        return data_url(png_bytes(image), "image/png")
    img = Image.fromarray(image)
    img.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=88)
    return data_url(buf.getvalue(), "image/jpeg")


def mask_overlay_url(mask: np.ndarray, color: str, alpha: float = 0.45) -> str:
    """A mask (HxW bool) as a coloured, partly transparent RGBA PNG data URL for the SVG overlay."""
    h, w = mask.shape
    rgba = np.zeros((h, w, 4), dtype=np.uint8)
    rgba[mask] = (*_rgb(color), int(alpha * 255))
    return data_url(png_bytes(Image.fromarray(rgba, mode="RGBA")), "image/png")


def mask_png(mask: np.ndarray, size: tuple[int, int] | None = None) -> bytes:
    """A binary mask as an 8-bit PNG (0 / 255), optionally resized (nearest) to size=(width, height)."""
    img = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    if size is not None and img.size != tuple(size):
        img = img.resize(tuple(size), Image.Resampling.NEAREST)
    return png_bytes(img)


def mask_rle(mask: np.ndarray) -> dict:
    """COCO-style uncompressed RLE: column-major run lengths starting with a run of zeros."""
    flat = np.asarray(mask, dtype=bool).reshape(-1, order="F")
    if flat.size == 0:
        return {"size": list(mask.shape), "counts": []}
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": counts}


# ------------------------------------------------------------------------------------------ viewer value

def word_items(words: Sequence[dict]) -> list[dict]:
    """Words ({text, box}) -> the viewer's word list with gradient colours by position."""
    colors = gradient_colors(len(words))
    return [{"i": i, "text": str(w["text"]), "box": [round(float(c), 2) for c in w["box"]], "color": colors[i],
             "ink": ink_for(colors[i])} for i, w in enumerate(words)]


def viewer_value(image: dict | None, *, mode: str, include_src: bool = True, points: Sequence = (),
                 box: Sequence[float] | None = None, pending: Sequence[float] | None = None,
                 words: Sequence[dict] = (), regions: Sequence[dict] = (), selected: int | None = None,
                 inspect: dict | None = None, status: str = "idle", message: str = "",
                 clickable: bool = True) -> dict:
    """The JSON the viewer component renders. `image` is the session's image meta ({key, width, height, src});
    the data URL is sent only when `include_src` (the browser caches it by key), so a click does not resend
    the picture. All coordinates are pixels of the image the model saw."""
    img = None
    if image is not None:
        img = {"key": image["key"], "width": image["width"], "height": image["height"],
               "src": image["src"] if include_src else None}
    return {
        "mode": mode, "image": img, "clickable": bool(clickable and image is not None),
        "points": [[float(x), float(y), int(label)] for x, y, label in points],
        "box": None if box is None else [float(c) for c in box],
        "pending": None if pending is None else [float(c) for c in pending],
        "words": word_items(words), "regions": list(regions), "selected": selected, "inspect": inspect,
        "status": status, "message": message,
    }


# ------------------------------------------------------------------------------------------ PNG overlays

def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # very old Pillow
        return ImageFont.load_default()


def _centre(box: Sequence[float]) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _scale(image: np.ndarray) -> float:
    return max(image.shape[:2]) / 256


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, color: str, size: int) -> None:
    font = _font(size)
    x, y = xy
    left, top, right, bottom = draw.textbbox((x, y), text, font=font)
    pad = max(1, size // 5)
    draw.rectangle((left - pad, top - pad, right + pad, bottom + pad), fill=color)
    draw.text((x, y), text, fill=ink_for(color), font=font)


def draw_prompts(draw: ImageDraw.ImageDraw, points: Sequence, box: Sequence[float] | None, s: float) -> None:
    if box is not None:
        draw.rectangle(tuple(box), outline="#ffffff", width=max(1, round(3 * s)))
        draw.rectangle(tuple(box), outline="#111111", width=max(1, round(1 * s)))
    r = 4 * s
    for x, y, label in points:
        draw.ellipse((x - r, y - r, x + r, y + r), fill=POSITIVE if int(label) == 1 else NEGATIVE,
                     outline="#ffffff", width=max(1, round(1.5 * s)))


def trace_overlay(image: np.ndarray, words: Sequence[dict], *, points: Sequence = (),
                  box: Sequence[float] | None = None) -> np.ndarray:
    """The caption's trace over the image: a polyline through the word-box centres, each segment in its
    word's gradient colour, a dot per word, and the prompts. Returns HxWx3 uint8."""
    img = Image.fromarray(image).convert("RGB")
    draw = ImageDraw.Draw(img)
    s = _scale(image)
    colors = gradient_colors(len(words))
    centres = [_centre(w["box"]) for w in words]
    width = max(2, round(3 * s))
    for i in range(1, len(centres)):
        draw.line((centres[i - 1], centres[i]), fill="#ffffff", width=width + 2)
    for i in range(1, len(centres)):
        draw.line((centres[i - 1], centres[i]), fill=colors[i], width=width)
    r = 3.5 * s
    for (x, y), color in zip(centres, colors):
        draw.ellipse((x - r, y - r, x + r, y + r), fill=color, outline="#ffffff", width=1)
    draw_prompts(draw, points, box, s)
    return np.asarray(img)


def regions_overlay(image: np.ndarray, regions: Sequence[dict], masks: Sequence[np.ndarray | None] = ()
                    ) -> np.ndarray:
    """Boxes (and masks, HxW bool) in palette colours with their labels. regions: [{box, label}]."""
    out = image.astype(np.float32).copy()
    for i, mask in enumerate(masks):
        if mask is not None and mask.any():
            color = np.array(_rgb(palette_color(i)), dtype=np.float32)
            out[mask] = out[mask] * 0.55 + color * 0.45
    img = Image.fromarray(out.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    s = _scale(image)
    for i, region in enumerate(regions):
        color = palette_color(i)
        x0, y0, x1, y1 = region["box"]
        draw.rectangle((x0, y0, x1, y1), outline=color, width=max(2, round(2 * s)))
        _label(draw, (x0 + 2 * s, max(0, y0 - 12 * s)), str(region["label"])[:60], color, max(10, round(10 * s)))
    return np.asarray(img)
