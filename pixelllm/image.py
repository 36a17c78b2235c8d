"""Image and prompt inputs: decoding uploads safely, turning arrays into model input, and checking prompts.

Everything a user can get wrong raises `ValueError` with a message meant for that user. Coordinates given to and
returned by the public API are pixels of the original image (after EXIF orientation, i.e. as the user sees it).
"""

from __future__ import annotations

import hashlib
import io
import re
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 40_000_000  # larger images are refused before decoding (decompression bombs)
MAX_SIDE = 2048  # larger images are downscaled on load; coordinates then refer to the downscaled image
MAX_POINTS = 100
MAX_TEXT_CHARS = 2000
# What decoding a hostile or broken file can raise inside PIL (found by mutating valid PNG/JPEG/GIF/BMP/TIFF/WebP
# files): all of it means "this upload cannot be decoded", never a server error.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, ZeroDivisionError,
                  struct.error, Image.DecompressionBombError)


def load_image(source: bytes | str | Path | Image.Image, *, max_side: int = MAX_SIDE) -> np.ndarray:
    """Decode an image file (bytes or path) to an HxWx3 uint8 RGB array as the user sees it: EXIF orientation
    applied, first frame of animations, alpha composited on white, 16-bit/CMYK/palette/grayscale converted.
    A PIL image gives the frame it currently shows (an animation or multi-page TIFF the caller has `seek()`'d)
    and is left on that frame. Images with a side above `max_side` are downscaled (aspect kept)."""
    if isinstance(source, Image.Image):
        img = source  # never seek()'d here: that would change the caller's frame (a file opens on frame 0)
    else:
        data = Path(source).read_bytes() if isinstance(source, (str, Path)) else source
        if not data:
            raise ValueError("the image file is empty (0 bytes)")
        try:
            img = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as err:
            raise ValueError("this file is not an image PIL can read (PNG, JPEG, GIF, WebP, BMP, TIFF)") from err
        except Image.DecompressionBombError as err:  # PIL's own check: headers claiming > ~179 MP
            pixels = re.search(r"\((\d+) pixels\)", str(err))
            size = f"{int(pixels.group(1)) / 1e6:.0f} MP" if pixels else "far too large"
            raise ValueError(f"image is {size}; the limit is {MAX_PIXELS / 1e6:.0f} MP") from err
        except _DECODE_ERRORS as err:  # a recognised format with a broken header
            raise ValueError(f"the image could not be decoded (truncated or corrupt file?): {err}") from err
    width, height = img.size
    check_pixel_count(width, height)
    if width < 1 or height < 1:
        raise ValueError(f"the image is empty ({width}x{height} pixels)")
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        img = _to_rgb(img)
    except _DECODE_ERRORS as err:
        raise ValueError(f"the image could not be decoded (truncated or corrupt file?): {err}") from err
    if max(img.size) > max_side:
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8).copy()


def check_pixel_count(width: int, height: int) -> None:
    """ValueError for an image above MAX_PIXELS, the same message for files, PIL images and arrays; call it on
    the size alone, before anything of that size is decoded, copied or converted."""
    if width * height > MAX_PIXELS:
        raise ValueError(f"image is {width}x{height} = {width * height / 1e6:.0f} MP; the limit is "
                         f"{MAX_PIXELS / 1e6:.0f} MP")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):  # 16/32-bit integer or float grayscale: as an array
        img = Image.fromarray(_to_uint8(np.asarray(img)), mode="L")
    if img.mode == "La":  # premultiplied alpha: PIL converts it to LA only
        img = img.convert("LA")
    if img.mode == "P" or img.mode == "LA" or "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert("RGB")


def as_rgb_array(image: np.ndarray | Image.Image) -> np.ndarray:
    """Accept an HxWx3 / HxWx4 / HxW array (or nested lists of one) or a PIL image; return HxWx3 uint8 at the
    image's own size (a PIL image is converted as `load_image` does, EXIF orientation included, but never
    downscaled: the caller's boxes and prompts are in its pixels, as they are for an array). Arrays that are not
    uint8 follow `_to_uint8` (floats in [0, 1], 16-bit integers, bool masks); above MAX_PIXELS they are refused as
    PIL images are, from their shape (a nested list's from its first row, before numpy converts it)."""
    if isinstance(image, Image.Image):
        return load_image(image, max_side=max(image.size))
    if image is None or isinstance(image, (str, bytes, Path)):  # np.asarray makes a 0-d array of them
        raise ValueError(f"the image must be an HxWx3 array or a PIL image, got {type(image).__name__} (for a "
                         "file, pass pixelllm.image.load_image(path))")
    if isinstance(image, (list, tuple)):
        _check_nested_pixel_count(image)
        shape = _shape_of_arrays(image)
        if shape is not None:  # a list of arrays (`[array]`, a batch): numpy would copy them all to refuse it
            _check_shape(shape)
    arr = np.asarray(image)  # no copy of an array (nor of a tensor on the CPU)
    _check_shape(arr.shape)  # before the grey -> RGB stack and the uint8 conversion
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return np.ascontiguousarray(_to_uint8(arr)[..., :3])


def _check_shape(shape: tuple[int, ...]) -> None:
    """ValueError for an array shape that is not an HxW / HxWx3 / HxWx4 image of at most MAX_PIXELS."""
    if len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (3, 4)):
        hint = " (channels first? give HxWxC)" if len(shape) == 3 and shape[0] in (1, 3, 4) else ""
        raise ValueError(f"expected an HxWx3 RGB image, got an array of shape {tuple(shape)}{hint}")
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError("the image is empty")
    check_pixel_count(shape[1], shape[0])


def _shape_of_arrays(items: list | tuple) -> tuple[int, ...] | None:
    """The shape np.asarray gives a list whose first item is an array (or tensor), from that item's shape alone;
    None for a list of anything else. A ragged list is not measured further: numpy refuses it."""
    shape = getattr(items[0], "shape", None) if len(items) else None
    return (len(items), *shape) if isinstance(shape, tuple) else None


def _check_nested_pixel_count(rows: list | tuple) -> None:
    """check_pixel_count for nested lists from their lengths (rows, then the first row's length or shape):
    np.asarray converts every element of a list, so a 42 MP list took minutes and gigabytes before it was refused.
    Channels first (a CHW tensor's ``tolist()``: its first "pixel" longer than 4) is measured one level down, the
    planes' rows and columns. A ragged list is not measured further: numpy refuses it."""
    first = rows[0] if len(rows) else None
    width = _nested_length(first)
    if width is None:
        return  # empty, or one row of values: refused as not HxWx3 after np.asarray
    check_pixel_count(width, len(rows))
    columns = _nested_length(first[0]) if width else None
    if columns is not None and columns > 4:  # not a pixel: CxHxW, refused after np.asarray (channels first)
        check_pixel_count(columns, width)


def _nested_length(item: object) -> int | None:
    """The length of a list or tuple, or of an array's first axis; None for anything else (a number)."""
    if isinstance(item, (list, tuple)):
        return len(item)
    shape = getattr(item, "shape", None)
    return shape[0] if isinstance(shape, tuple) and len(shape) >= 1 else None


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Pixel values as uint8, the same rules for arrays and PIL images: bool -> 0/255; floats with a maximum of
    at most 1 are scaled by 255, other floats clipped to [0, 255]; integers above 255 (16-bit images) are scaled
    so that their maximum becomes 255, as a 16-bit PNG is."""
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.integer):
        top = int(arr.max()) if arr.size else 0
        arr = arr.astype(np.float64) / top * 255.0 if top > 255 else arr
    elif np.issubdtype(arr.dtype, np.floating) and arr.size and float(np.nanmax(arr)) <= 1.0:
        arr = arr * 255.0
    return np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)


def image_key(image: np.ndarray) -> str:
    """sha256 of the pixels and shape: the image part of the embedding-cache key."""
    digest = hashlib.sha256(str(image.shape).encode())
    digest.update(np.ascontiguousarray(image).tobytes())
    return digest.hexdigest()


def to_model_input(image: np.ndarray, size: int) -> torch.Tensor:
    """HxWx3 uint8 -> 3xSxS float in [0, 255], resized without padding (antialiased bilinear).

    We squash instead of SAM's pad-to-square so that coordinates normalised to the model input are exactly the
    coordinates normalised to the original image (the LN convention the model predicts in)."""
    tensor = torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1).unsqueeze(0)
    if tensor.shape[-2:] != (size, size):
        tensor = F.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return tensor[0].clamp(0, 255)


def numbers(values: object, what: str, shape: str) -> np.ndarray:
    """values as float64, or ValueError naming the expected shape (JSON from API clients can be anything)."""
    try:
        return np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{what} must be {shape} (numbers only)") from err


def _finite(values: np.ndarray, what: str) -> np.ndarray:
    if not np.all(np.isfinite(values)):
        raise ValueError(f"{what} contains NaN or infinite values")
    return values


def check_points(points: object, labels: object, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """Points Nx2 (x, y) pixels + labels N (1 positive, 0 negative). Points outside the image are clamped to its
    border (documented normalisation); at most MAX_POINTS; at least one positive point."""
    raw = numbers(points, "the point prompt", "a list of [x, y] pixel pairs")
    if raw.size % 2:
        raise ValueError(f"the point prompt must be a list of [x, y] pixel pairs, got {raw.size} numbers")
    pts = _finite(raw.reshape(-1, 2), "point prompt")
    if len(pts) == 0:
        raise ValueError("the point prompt is empty")
    if len(pts) > MAX_POINTS:
        raise ValueError(f"{len(pts)} points given; at most {MAX_POINTS} are allowed")
    lab = np.ones(len(pts)) if labels is None else numbers(labels, "point labels", "1 (positive) or 0 (negative)")
    lab = lab.reshape(-1)
    if len(lab) != len(pts):
        raise ValueError(f"{len(pts)} points but {len(lab)} labels")
    if not np.isin(lab, (0, 1)).all():  # before any cast: 0.5 must not silently become 0
        raise ValueError("point labels must be 1 (positive) or 0 (negative)")
    lab = lab.astype(np.int64)
    if not (lab == 1).any():
        raise ValueError("give at least one positive point (negative points only say where the object is not)")
    pts[:, 0] = pts[:, 0].clip(0, width)
    pts[:, 1] = pts[:, 1].clip(0, height)
    return pts, lab


def check_no_labels(labels: object) -> None:
    """Without a point prompt (points None or empty) there is nothing to label: point labels other than None or
    an empty list are refused (they were ignored, and the caption came from the whole image)."""
    count = 0 if labels is None else np.asarray(labels, dtype=object).size  # object: ragged / text still count
    if count:
        raise ValueError(f"point_labels given without points: {count} labels but 0 points (pass the [x, y] points "
                         "they label, or leave point_labels out)")


def check_box(box: object, width: int, height: int) -> np.ndarray:
    """A box (x0, y0, x1, y1) in pixels. Corners given in any order are sorted; the box is clipped to the image;
    a box with no area inside the image is refused."""
    arr = _finite(numbers(box, "a box", "4 numbers (x0, y0, x1, y1)").reshape(-1), "box prompt")
    if arr.shape != (4,):
        raise ValueError(f"a box is 4 numbers (x0, y0, x1, y1), got {arr.size}")
    x0, x1 = sorted((arr[0], arr[2]))
    y0, y1 = sorted((arr[1], arr[3]))
    x0, x1 = np.clip([x0, x1], 0, width)
    y0, y1 = np.clip([y0, y1], 0, height)
    if x1 - x0 < 1 or y1 - y0 < 1:
        raise ValueError("the box has no area inside the image: drag a larger box")
    return np.array([x0, y0, x1, y1])


def check_text(text: str | None, *, allow_empty: bool = True) -> str | None:
    """Trim a text prompt; None/blank = no prompt. Over MAX_TEXT_CHARS is refused."""
    if text is None:
        return None
    if not isinstance(text, str):
        raise ValueError("the text prompt must be a string")
    if len(text) > 8 * MAX_TEXT_CHARS:  # before splitting it: a huge paste costs nothing (whitespace may collapse)
        raise ValueError(f"the text is {len(text)} characters long; the limit is {MAX_TEXT_CHARS}")
    text = " ".join(text.split())
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # e.g. an unpaired surrogate sent as "\ud800" in JSON
        raise ValueError("the text contains characters that are not valid Unicode (unpaired surrogates)") from err
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"the text is {len(text)} characters long; the limit is {MAX_TEXT_CHARS}")
    if not text:
        if allow_empty:
            return None
        raise ValueError("the text is empty")
    return text

