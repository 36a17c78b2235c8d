"""Hardening: malformed and unusual image files — truncated, random bytes, empty, decompression bombs, mutated
files of every format; 1x1, 16-bit, CMYK, palette transparency, grayscale, EXIF-rotated, animated — through the
loader and predictor, the page's upload and the public API.

The rest of tests/hardening_inputs/: prompts, text, expressions and numbers: test_hardening_prompts.py; store faults
behind the app and app.py refusing to start: test_hardening_app_faults.py. Shared helpers: conftest.py."""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from pixelllm import image as imaging
from pixelllm.ui import workspace as ws
from tests.hardening_inputs.conftest import (
    NORMAL_IMAGE,
    _encode,
    _noise,
    _write,
    assert_boxes_inside,
    assert_refused,
    caption,
    dense,
    refer,
)
from tests.helpers import png_claiming

# ------------------------------------------------------------------------------------------ image files

def truncated_jpeg() -> bytes:
    data = _encode(_noise(), "JPEG", quality=90)
    return data[: len(data) // 2]


def sixteen_bit_png() -> bytes:
    ramp = np.tile(np.linspace(0, 65535, 100).astype(np.uint16), (60, 1))  # dark left -> bright right
    return _encode(Image.fromarray(ramp), "PNG")


def cmyk_jpeg() -> bytes:
    return _encode(Image.new("CMYK", (100, 60), (0, 255, 255, 0)), "JPEG", quality=95)  # pure red in CMYK


def palette_transparent_png() -> bytes:
    img = Image.new("P", (100, 60), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.paste(1, (50, 0, 100, 60))  # left half index 0 (transparent black), right half index 1 (red)
    return _encode(img, "PNG", transparency=0)


def grayscale_png() -> bytes:
    return _encode(_noise().convert("L"), "PNG")


def exif_rotated_jpeg(width: int = 100, height: int = 60, orientation: int = 6) -> bytes:
    """Stored width x height; EXIF orientation 6 = shown rotated 90° clockwise, i.e. height x width."""
    ramp = np.zeros((height, width, 3), dtype=np.uint8)
    ramp[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]  # smooth: compresses small at any size
    ramp[..., 1] = np.linspace(0, 255, height, dtype=np.uint8)[:, None]
    img = Image.fromarray(ramp)
    exif = img.getexif()
    exif[0x0112] = orientation
    return _encode(img, "JPEG", quality=90, exif=exif.tobytes())


def animated_gif() -> bytes:
    frames = []
    for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255)):
        frames.append(Image.new("RGB", (40, 30), colour).convert("P"))
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)


# (id, file name, bytes, message the user gets)
BAD_FILES = [
    ("truncated-jpeg", "photo.jpg", truncated_jpeg, "the image could not be decoded (truncated or corrupt file?)"),
    ("random-bytes-png", "random.png", lambda: np.random.default_rng(1).bytes(3000),
     "this file is not an image PIL can read"),
    ("zero-bytes", "empty.png", lambda: b"", "the image file is empty (0 bytes)"),
    ("bomb-30000x30000", "bomb.png", lambda: png_claiming(30000, 30000), "image is 900 MP; the limit is 40 MP"),
    ("bomb-7000x7000", "big.png", lambda: png_claiming(7000, 7000), "image is 7000x7000 = 49 MP; the limit is 40 MP"),
]


# (id, file name, bytes, size the user sees (w, h), check of the decoded pixels)
GOOD_FILES = [
    ("1x1", "dot.png", lambda: _encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), (1, 1),
     lambda a: a[0, 0].tolist() == [10, 20, 30]),
    ("16-bit-png", "deep.png", sixteen_bit_png, (100, 60),  # scaled to 8 bits, order kept
     lambda a: a[0, 0, 0] < 5 and a[0, -1, 0] > 250 and bool(np.all(np.diff(a[0, :, 0].astype(int)) >= 0))),
    ("cmyk-jpeg", "print.jpg", cmyk_jpeg, (100, 60),
     lambda a: a[..., 0].mean() > 200 and a[..., 1].mean() < 60 and a[..., 2].mean() < 60),
    ("palette-transparency", "sprite.png", palette_transparent_png, (100, 60),  # alpha composited on white
     lambda a: a[:, :50].min() == 255 and a[:, 50:, 0].min() == 255 and a[:, 50:, 1:].max() == 0),
    ("grayscale", "gray.png", grayscale_png, (100, 60),
     lambda a: bool(np.array_equal(a[..., 0], a[..., 1]) and np.array_equal(a[..., 1], a[..., 2]))),
    ("exif-orientation-6", "phone.jpg", exif_rotated_jpeg, (60, 100),  # saved 100x60, shown 60x100
     lambda a: a[0, -1, 1] < 30 and a[-1, -1, 1] < 30 and a[0, 0, 1] > 200),  # stored top row is now the right column
    ("animated-gif", "anim.gif", animated_gif, (40, 30),  # the first frame
     lambda a: a[..., 0].min() > 200 and a[..., 1:].max() < 50),
]


# ------------------------------------------------------------------------------------------ images: predictor

@pytest.mark.parametrize("case_id, name, make, message", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_image_file_is_refused_by_the_loader(case_id, name, make, message, tmp_path, small_predictor):
    path = _write(tmp_path, name, make())
    for source in (path, path.read_bytes()):
        with pytest.raises(ValueError) as info:
            imaging.load_image(source)
        assert message in str(info.value)
    state = small_predictor.set_image(imaging.load_image(NORMAL_IMAGE))  # the predictor still works
    assert small_predictor.caption(state, max_new_tokens=4).words


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP"])
def test_mutated_image_files_only_ever_raise_value_error(fmt):
    """Bytes flipped in the header, truncation anywhere, bytes flipped anywhere: PIL raises OSError,
    DecompressionBombError (a header claiming billions of pixels), SyntaxError... — the loader turns every one
    into ValueError with a user message (before the fix some reached Gradio as a bare server error)."""
    import random
    import warnings

    valid = _encode(_noise(50, 40), fmt)
    rng = random.Random(fmt)
    for i in range(120):
        data = bytearray(valid)
        if i % 3 == 0:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(min(len(data), 200))] = rng.randrange(256)
        elif i % 3 == 1:
            data = data[: rng.randrange(1, len(data))]
        else:
            for _ in range(rng.randint(1, 20)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PIL warns about odd metadata on the way
            try:
                array = imaging.load_image(bytes(data))
            except ValueError as err:
                assert str(err), "a refusal carries a message"
            else:
                assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3


def test_bomb_is_refused_without_allocating(tmp_path):
    import tracemalloc

    data = png_claiming(30000, 30000)  # 2.7 GB if decoded
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="the limit is 40 MP"):
            imaging.load_image(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(data) < 200 and peak < 5_000_000, peak


@pytest.mark.parametrize("case_id, name, make, size, pixels_ok", GOOD_FILES, ids=[c[0] for c in GOOD_FILES])
def test_unusual_image_is_normalised_by_the_loader(case_id, name, make, size, pixels_ok, tmp_path, small_predictor):
    array = imaging.load_image(_write(tmp_path, name, make()))
    assert array.dtype == np.uint8 and array.shape == (size[1], size[0], 3)
    assert pixels_ok(array), f"{case_id}: unexpected pixels after normalisation"
    state = small_predictor.set_image(array)
    assert (state.width, state.height) == size
    words = small_predictor.caption(state, max_new_tokens=6).words
    assert_boxes_inside([w.box for w in words], *size)


def test_a_large_pil_image_keeps_its_own_pixel_frame(small_predictor):
    # The predictor's boxes are pixels of the image it was given: a PIL image above MAX_SIDE (2048) was
    # downscaled inside set_image, so a valid box was refused and every output came back in the smaller frame.
    array = np.zeros((1000, 3000, 3), np.uint8)
    array[100:900, 2500:2900] = 255
    state = small_predictor.set_image(Image.fromarray(array))
    assert (state.width, state.height) == (3000, 1000) == (small_predictor.set_image(array).width, 1000)
    words = small_predictor.caption(state, box=[2500, 100, 2900, 900], max_new_tokens=4).words
    assert_boxes_inside([w.box for w in words], 3000, 1000)
    assert small_predictor.refer(state, ["the white square"])[0].mask.shape == (1000, 3000)


def test_exif_rotated_photo_takes_prompts_in_the_frame_the_user_sees(small_predictor):
    array = imaging.load_image(exif_rotated_jpeg(100, 60, orientation=6))
    state = small_predictor.set_image(array)
    assert (state.width, state.height) == (60, 100)
    box = [10, 70, 50, 95]  # only has area in the rotated 60x100 frame (y > 60)
    words = small_predictor.caption(state, box=box, max_new_tokens=6).words
    assert_boxes_inside([w.box for w in words], 60, 100)
    referral = small_predictor.refer(state, ["the red circle"])[0]
    assert referral.mask.shape == (100, 60)
    assert_boxes_inside([referral.box], 60, 100)


# ------------------------------------------------------------------------------------------ images: API

@pytest.mark.parametrize("case_id, name, make, message", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_image_file_through_the_api(case_id, name, make, message, tmp_path, served_app, client):
    path = _write(tmp_path, name, make())
    assert_refused(served_app, lambda: caption(client, path), message)
    assert_refused(served_app, lambda: refer(client, path, "the red circle"), message)
    assert_refused(served_app, lambda: dense(client, path), message)


@pytest.mark.parametrize("case_id, name, make, size, pixels_ok", GOOD_FILES, ids=[c[0] for c in GOOD_FILES])
def test_unusual_image_through_the_page_upload(case_id, name, make, size, pixels_ok, tmp_path, served_app):
    """The page's image input hands the uploaded file itself to the app's loader. With gradio's default
    image_mode "RGB" it decoded and re-saved every non-RGB upload first: transparency came out black instead of
    white, a 16-bit PNG mostly white, and the size limit was checked only after gradio had decoded the image."""
    from gradio.data_classes import ImageData

    path = _write(tmp_path, name, make())
    [upload] = [b for b in served_app.demo.blocks.values() if getattr(b, "elem_id", None) == "image-input"]
    handed = upload.preprocess(ImageData(path=str(path), orig_name=name))
    assert Path(handed).read_bytes() == path.read_bytes()
    session = ws.load_image(served_app.studio, handed, None)[0]
    assert (session.image["width"], session.image["height"]) == size and pixels_ok(session.array)


def test_a_bomb_uploaded_on_the_page_is_refused_before_anything_decodes_it(tmp_path, served_app):
    from gradio.data_classes import ImageData

    path = _write(tmp_path, "big.png", png_claiming(7000, 7000))
    [upload] = [b for b in served_app.demo.blocks.values() if getattr(b, "elem_id", None) == "image-input"]
    handed = upload.preprocess(ImageData(path=str(path), orig_name="big.png"))
    assert Path(handed) == path  # gradio did not decode it (its default decoded 49 MP before the app saw it)
    with pytest.raises(gr.Error, match="the limit is 40 MP"):
        ws.load_image(served_app.studio, handed, None)


@pytest.mark.parametrize("case_id, name, make, size, pixels_ok", GOOD_FILES, ids=[c[0] for c in GOOD_FILES])
def test_unusual_image_through_the_api(case_id, name, make, size, pixels_ok, tmp_path, served_app, client):
    path = _write(tmp_path, name, make())
    width, height = size
    out = caption(client, path, max_words=4)
    assert out["image"] == {"width": width, "height": height}
    assert_boxes_inside([w["box"] for w in out["words"]], width, height)
    assert isinstance(out["generation_id"], int)
    stored = served_app.store.get_generation(out["generation_id"])
    image_row = served_app.store.get_image(stored["image_sha"])
    assert (image_row["width"], image_row["height"]) == (width, height)  # the store keeps the frame the user sees
    with Image.open(image_row["abs_path"]) as kept:
        assert pixels_ok(np.asarray(kept.convert("RGB")))
    ref = refer(client, path, "the red circle")
    assert ref["results"][0]["mask"]["size"] == [height, width]
    assert_boxes_inside([r["box"] for r in ref["results"]], width, height)


def test_exif_rotated_photo_through_the_api(tmp_path, served_app, client):
    path = _write(tmp_path, "phone.jpg", exif_rotated_jpeg(100, 60, orientation=6))
    box = [10, 70, 50, 95]  # has area only in the rotated 60x100 frame
    out = caption(client, path, {"box": box, "points": [[30, 80]]}, max_words=4)
    assert out["image"] == {"width": 60, "height": 100}
    assert out["prompts"]["box"] == box and out["prompts"]["points"] == [[30, 80]]
    assert_boxes_inside([w["box"] for w in out["words"]], 60, 100)
    ref = refer(client, path, "the red circle")
    assert ref["image"] == {"width": 60, "height": 100} and ref["results"][0]["mask"]["size"] == [100, 60]
    regions = dense(client, path)["regions"]
    assert_boxes_inside([r["box"] for r in regions] + [w["box"] for r in regions for w in r["words"]], 60, 100)
    # the same box in the stored (unrotated 100x60) frame has no area: proof the rotated frame is the one used
    unrotated = _write(tmp_path, "flat.jpg", exif_rotated_jpeg(100, 60, orientation=1))
    assert_refused(served_app, lambda: caption(client, unrotated, {"box": box}), "the box has no area inside the image")


def test_large_exif_rotated_photo_maps_back_to_the_rotated_original(tmp_path, served_app, client):
    """3000x1000 stored, orientation 6: the user sees 1000x3000; the model gets a 683x2048 copy; prompts and
    outputs stay in the user's 1000x3000 frame."""
    path = _write(tmp_path, "panorama.jpg", exif_rotated_jpeg(3000, 1000, orientation=6))
    box = [100, 2500, 900, 2900]
    out = caption(client, path, {"box": box}, max_words=4)
    assert out["image"] == {"width": 1000, "height": 3000}
    assert out["prompts"]["box"] == pytest.approx(box, abs=2)
    assert_boxes_inside([w["box"] for w in out["words"]], 1000, 3000)
    ref = refer(client, path, "the red circle")
    assert ref["results"][0]["mask"]["size"] == [3000, 1000]
