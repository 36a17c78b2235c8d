"""Hardening: malformed images, prompts and text, through the public API and through the predictor; store faults
behind the app. Each row of docs/hardening.md names the test that keeps it true.

Every bad input gets a clear message (the predictor raises ValueError; through the API gradio_client raises
AppError carrying the same message) or a documented normalisation, nothing is logged for a refused request, and
a normal request right after it succeeds. The API tests use `served_app` (conftest: the app launched by app.py's
own `launch` in this process, small random checkpoint, its own annotation store).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import io
import json
import logging
import os
import re
import sqlite3
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from pixelllm import image as imaging
from pixelllm.store import AnnotationStore
from pixelllm.ui import workspace as ws
from tests.helpers import png_claiming

torch.set_num_threads(1)

NORMAL_IMAGE = Path(__file__).resolve().parents[1] / "assets" / "examples" / "example_000000.png"  # 256x256

# ------------------------------------------------------------------------------------------ image files


def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _noise(width: int = 100, height: int = 60, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


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


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------------ API helpers

@functools.cache
def _client(url: str) -> Client:
    return Client(url, download_files=False, verbose=False)


@pytest.fixture
def client(served_app) -> Client:
    return _client(served_app.url)


def caption(client: Client, image: Path, prompts: str | dict = "", text: str = "", max_words: int = 3) -> dict:
    if isinstance(prompts, dict):
        prompts = json.dumps(prompts)
    return client.predict(image=handle_file(str(image)), prompts=prompts, text=text, max_words=max_words,
                          do_sample=False, temperature=1.0, top_p=1.0, seed=-1, api_name="/caption")


def refer(client: Client, image: Path, expressions: str) -> dict:
    return client.predict(image=handle_file(str(image)), expressions=expressions, api_name="/refer")


def dense(client: Client, image: Path, score_threshold: float = 0.0, max_regions: int = 2) -> dict:
    return client.predict(image=handle_file(str(image)), score_threshold=score_threshold, max_regions=max_regions,
                          api_name="/dense")


def trace(client: Client, image: Path, caption: str, prompts: str = "") -> dict:
    return client.predict(image=handle_file(str(image)), prompts=prompts, caption=caption, api_name="/trace")


def generations(db_path: Path) -> int:
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        return conn.execute("SELECT count(*) FROM generations").fetchone()[0]


def rows(db_path: Path) -> tuple[int, int]:
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        return (conn.execute("SELECT count(*) FROM images").fetchone()[0],
                conn.execute("SELECT count(*) FROM generations").fetchone()[0])


def assert_refused(served_app, call, message: str) -> None:
    """`call()` raises AppError carrying exactly `message` (as a substring), logs nothing, and the app then
    serves a normal request."""
    before = generations(served_app.db_path)
    with pytest.raises(AppError) as info:
        call()
    assert message in str(info.value), f"expected {message!r} in {str(info.value)!r}"
    assert generations(served_app.db_path) == before, "a refused request must not be logged"
    normal_request_works(served_app)


def normal_request_works(served_app) -> None:
    out = caption(_client(served_app.url), NORMAL_IMAGE, {"box": [100, 135, 200, 220]}, max_words=2)
    assert out["image"] == {"width": 256, "height": 256} and len(out["words"]) >= 1
    assert isinstance(out["generation_id"], int)


def assert_boxes_inside(boxes, width: int, height: int) -> None:
    assert boxes, "expected at least one box"
    for x0, y0, x1, y1 in boxes:
        assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height, ((x0, y0, x1, y1), (width, height))


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


# ------------------------------------------------------------------------------------------ prompts

BOX_CASES = [  # (id, prompts, message) on the 256x256 example
    ("zero-area", {"box": [10, 10, 10, 50]}, "the box has no area inside the image"),
    ("outside-the-image", {"box": [300, 300, 400, 400]}, "the box has no area inside the image"),
    ("negative-outside", {"box": [-90, -90, -10, -10]}, "the box has no area inside the image"),
    ("nan", '{"box": [NaN, 10, 50, 50]}', "box prompt contains NaN or infinite values"),
    ("infinity", '{"box": [0, 0, Infinity, 50]}', "box prompt contains NaN or infinite values"),
    ("overflow-1e999", '{"points": [[1e999, 5]]}', "point prompt contains NaN or infinite values"),
    ("101-points", {"points": [[i % 256, i % 200] for i in range(101)]}, "101 points given; at most 100 are allowed"),
    ("negative-points-only", {"points": [[10, 10]], "point_labels": [0]}, "give at least one positive point"),
    ("fractional-label", {"points": [[10, 10]], "point_labels": [0.5]}, "point labels must be 1 (positive) or 0"),
    ("ragged-points", {"points": [[1, 2], [3]]}, "points must be a list of [x, y] pairs"),
    ("box-is-an-object", {"box": {"x": 1}}, "box must be [x0, y0, x1, y1]"),
    ("box-3-numbers", {"box": [1, 2, 3]}, "box must be [x0, y0, x1, y1]"),
    ("not-json", "{box: [1, 2", "prompts must be JSON"),
    ("unknown-key", {"boxes": [1, 2, 3, 4]}, "unknown prompt keys ['boxes']"),
    ("labels-without-points", {"point_labels": [1]}, "point_labels given without points"),
    ("labels-for-no-points", {"points": [], "labels": [1, 0], "box": [10, 10, 50, 50]},
     "point_labels given without points"),
]


@pytest.mark.parametrize("case_id, prompts, message", BOX_CASES, ids=[c[0] for c in BOX_CASES])
def test_bad_prompt_through_the_api(case_id, prompts, message, served_app, client):
    assert_refused(served_app, lambda: caption(client, NORMAL_IMAGE, prompts), message)


def test_a_refused_call_leaves_no_traceback_in_the_hosts_log(served_app, client, monkeypatch, capfd):
    """Every refused call (a bad prompt, an empty expression, a bad correction) printed two chained tracebacks,
    ~40 lines, to the server's stderr: a client looping on its mistake filled the host's log, and a real fault
    was hard to find in it. A real fault still prints its traceback."""
    capfd.readouterr()
    mistakes = [lambda: caption(client, NORMAL_IMAGE, {"box": [1, 2, 3]}),
                lambda: client.predict(image=handle_file(NORMAL_IMAGE), expressions="", api_name="/refer"),
                lambda: client.predict(correction={"generation_id": 1}, api_name="/save_correction")]
    for call in mistakes:
        with pytest.raises(AppError):
            call()
    log = capfd.readouterr().err
    assert "Traceback" not in log, f"{log.count('Traceback')} tracebacks in the server's log:\n{log[-3000:]}"

    def fault(*args, **kwargs):
        raise RuntimeError("a real fault")

    monkeypatch.setattr(served_app.studio.predictor, "refer", fault)
    with pytest.raises(AppError):
        client.predict(image=handle_file(NORMAL_IMAGE), expressions="the shape", api_name="/refer")
    log = capfd.readouterr().err
    assert "Traceback" in log and "RuntimeError: a real fault" in log, log[-3000:]

NORMALISED_PROMPTS = [  # (id, prompts sent, prompts the answer reports): documented normalisations
    ("corners-swapped", {"box": [200, 220, 100, 135]}, {"box": [100, 135, 200, 220]}),
    ("box-partly-outside-is-clipped", {"box": [-50, -20, 100, 400]}, {"box": [0, 0, 100, 256]}),
    ("points-outside-are-clamped", {"points": [[-10, 300], [50, 50]]}, {"points": [[0, 256], [50, 50]]}),
    ("100-points-allowed", {"points": [[i, i] for i in range(100)]}, {"points": [[i, i] for i in range(100)]}),
    ("labels-as-third-column", {"points": [[20, 20, 1], [40, 40, 0]]}, {"point_labels": [1, 0]}),
    ("empty-prompts", "", {"box": None, "points": []}),
]


@pytest.mark.parametrize("case_id, sent, reported", NORMALISED_PROMPTS, ids=[c[0] for c in NORMALISED_PROMPTS])
def test_prompt_normalisation_through_the_api(case_id, sent, reported, client):
    out = caption(client, NORMAL_IMAGE, sent)
    for key, value in reported.items():
        assert out["prompts"][key] == value, (key, out["prompts"][key])
    assert_boxes_inside([w["box"] for w in out["words"]], 256, 256)


def test_bad_prompts_are_refused_by_the_predictor(small_predictor):
    state = small_predictor.set_image(imaging.load_image(NORMAL_IMAGE))
    cases = [
        (dict(box=[10, 10, 10, 50]), "the box has no area inside the image"),
        (dict(box=[300, 300, 400, 400]), "the box has no area inside the image"),
        (dict(box=[float("nan"), 0, 5, 5]), "box prompt contains NaN or infinite values"),
        (dict(box=[0, 0, float("inf"), 5]), "box prompt contains NaN or infinite values"),
        (dict(points=[[float("nan"), 3]]), "point prompt contains NaN or infinite values"),
        (dict(points=np.zeros((101, 2))), "101 points given; at most 100 are allowed"),
        (dict(points=[[1, 2]], point_labels=[0]), "give at least one positive point"),
        (dict(points=[[1, 2, 3]]), "the point prompt must be a list of [x, y] pixel pairs"),
        (dict(box={"x": 1}), "a box must be 4 numbers"),
        (dict(text="x" * 10_000), "the text is 10000 characters long; the limit is 2000"),
        (dict(text="bad \ud800 surrogate"), "not valid Unicode"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError) as info:
            small_predictor.caption(state, max_new_tokens=4, **kwargs)
        assert message in str(info.value), (kwargs.keys(), str(info.value))
    with pytest.raises(ValueError, match="no area inside the image"):
        small_predictor.caption_boxes(state, [[5, 5, 5, 5]])
    with pytest.raises(ValueError, match="score_threshold must be between 0 and 1"):
        small_predictor.dense_caption(state, score_threshold=float("nan"))
    # normalisations: swapped corners, partly outside; and a normal call afterwards
    swapped = small_predictor.caption(state, box=[200, 220, 100, 135], max_new_tokens=6)
    straight = small_predictor.caption(state, box=[100, 135, 200, 220], max_new_tokens=6)
    assert [w.box for w in swapped.words] == [w.box for w in straight.words]
    assert small_predictor.caption(state, points=[[-10, 999]], max_new_tokens=4).words


# ------------------------------------------------------------------------------------------ text

TEXTS_NORMALISED = [  # (id, text sent, text the answer reports)
    ("empty", "", None),
    ("whitespace", "  \n\t  ", None),
    ("inner-whitespace", "  the \n red\tcircle ", "the red circle"),
    ("non-latin", "这是一个红色的圆圈 и синий квадрат", "这是一个红色的圆圈 и синий квадрат"),
    ("emoji", "🔴 circle 👀🏳️‍🌈", "🔴 circle 👀🏳️‍🌈"),
    ("html", '<img src=x onerror="window.__pwned=1"><script>alert(1)</script>',
     '<img src=x onerror="window.__pwned=1"><script>alert(1)</script>'),
    ("long", "the red circle " * 12, " ".join(["the red circle"] * 12)),  # 36-60 tokens: under the 64 read
]


@pytest.mark.parametrize("case_id, text, reported", TEXTS_NORMALISED, ids=[c[0] for c in TEXTS_NORMALISED])
def test_text_prompt_through_the_api(case_id, text, reported, served_app, client):
    out = caption(client, NORMAL_IMAGE, text=text)
    assert out["prompts"]["text"] == reported
    stored = served_app.store.get_generation(out["generation_id"])
    assert stored["prompts"]["text"] == reported  # stored verbatim (as data, never as markup)
    if reported is not None and "\n" not in text:  # /refer takes one expression per line
        ref = refer(client, NORMAL_IMAGE, text)
        assert [r["expression"] for r in ref["results"]] == [reported]


def test_text_too_long_through_the_api(served_app, client):
    assert_refused(served_app, lambda: caption(client, NORMAL_IMAGE, text="word " * 2000),
                   "the text is 9999 characters long; the limit is 2000")
    assert_refused(served_app, lambda: refer(client, NORMAL_IMAGE, "x" * 10_000),
                   "the text is 10000 characters long; the limit is 2000")
    # Within 2000 characters but more tokens than the model reads: refused, not silently cut to 64 tokens
    # while the whole text is echoed and logged as the prompt.
    assert_refused(served_app, lambda: caption(client, NORMAL_IMAGE, text="a" * 2000),
                   "the text prompt is 2000 tokens long; the model reads at most 64")
    assert_refused(served_app, lambda: refer(client, NORMAL_IMAGE, "the red circle\n" + "a" * 2000),
                   "referring expression 2 is 2000 tokens long; the model reads at most 64")


def test_a_huge_text_is_refused_on_its_length_before_it_is_split():
    """A 17 MB prompt was split into words (about 200 MB) before its length was checked."""
    from pixelllm.ui.callbacks import parse_expressions

    with pytest.raises(ValueError, match="the text is 40000 characters long"):  # the raw length: not yet collapsed
        imaging.check_text("a " * 20_000)
    with pytest.raises(ValueError, match="the expressions are 600000 characters long; at most 16 of 2000"):
        parse_expressions("the red circle\n" * 40_000)
    assert imaging.check_text("a" + " " * 15_000 + "b") == "a b"  # runs of whitespace still collapse


def test_traced_captions_through_the_api(served_app, client):
    hostile = '<img src=x onerror="window.__pwned=1"> 🔴 圆圈  spaced   out'
    out = trace(client, NORMAL_IMAGE, hostile, json.dumps({"box": [100, 135, 200, 220]}))
    assert out["text"] == " ".join(hostile.split()) and [w["text"] for w in out["words"]] == hostile.split()
    assert_boxes_inside([w["box"] for w in out["words"]], 256, 256)
    stored = served_app.store.get_generation(out["generation_id"])
    assert stored["words"] == hostile.split() and stored["extra"]["traced"] is True
    assert_refused(served_app, lambda: trace(client, NORMAL_IMAGE, "  \n "), "Type the caption to trace.")
    assert_refused(served_app, lambda: trace(client, NORMAL_IMAGE, "a red circle", '{"box": [1, 2]}'),
                   "box must be [x0, y0, x1, y1]")
    assert_refused(served_app, lambda: trace(client, NORMAL_IMAGE, "a " * 600),
                   "the caption is 600 tokens long; the limit is 512")


@pytest.mark.parametrize("expressions, message", [
    ("", "Type at least one referring expression"),
    ("  \n \t\n", "Type at least one referring expression"),
    ("\n".join(f"thing {i}" for i in range(17)), "17 expressions given; at most 16 at once"),
], ids=["empty", "whitespace-lines", "17-lines"])
def test_bad_expressions_through_the_api(expressions, message, served_app, client):
    assert_refused(served_app, lambda: refer(client, NORMAL_IMAGE, expressions), message)


def test_bad_expressions_are_refused_by_the_predictor(small_predictor):
    state = small_predictor.set_image(imaging.load_image(NORMAL_IMAGE))
    with pytest.raises(ValueError, match="type at least one referring expression"):
        small_predictor.refer(state, ["", "   ", "\n"])
    with pytest.raises(ValueError, match="the text is 10000 characters long"):
        small_predictor.refer(state, ["x" * 10_000])
    hostile = "<b>bold</b> 🔴 圆圈"
    assert [r.expression for r in small_predictor.refer(state, [hostile, "  spaced   out "])] == [hostile, "spaced out"]


@pytest.mark.parametrize("call, message", [
    (lambda c: caption(c, NORMAL_IMAGE, max_words=0), "max words must be between 1 and 128"),
    (lambda c: dense(c, NORMAL_IMAGE, score_threshold=2.0), "the score threshold must be between 0 and 1"),
    (lambda c: dense(c, NORMAL_IMAGE, max_regions=0), "max regions must be between 1 and 100"),
    # the API's number fields reach the app's own checks unrounded: gradio's precision=0 made 3.5 four words and
    # answered "abc" with its generic "the upstream Gradio app has raised an exception"
    (lambda c: caption(c, NORMAL_IMAGE, max_words=3.5), "max words must be a whole number"),
    (lambda c: caption(c, NORMAL_IMAGE, max_words="abc"), "max words must be a whole number"),
    (lambda c: dense(c, NORMAL_IMAGE, max_regions="x"), "max regions must be a whole number"),
    (lambda c: c.predict(image=handle_file(str(NORMAL_IMAGE)), prompts="", text="", max_words=3, do_sample=True,
                         temperature=1.0, top_p=1.0, seed="x", api_name="/caption"),
     "the seed must be a whole number"),
], ids=["max-words-0", "threshold-2", "max-regions-0", "max-words-3.5", "max-words-abc", "max-regions-x",
        "seed-x"])
def test_bad_numbers_through_the_api(call, message, served_app, client):
    assert_refused(served_app, lambda: call(client), message)


# ------------------------------------------------------------------------------------------ store faults behind the app

def _log_messages(job) -> list[str]:
    """Warnings (gr.Warning) the server sent to this client while the job ran."""
    updates, queue = [], job.communicator.updates
    while not queue.empty():
        update = queue.get_nowait()
        log = getattr(update, "log", None)
        if log:
            updates.append(str(log[0]))
    return updates


def _caption_job(client: Client):
    job = client.submit(image=handle_file(str(NORMAL_IMAGE)), prompts="", text="fault", max_words=2,
                        do_sample=False, temperature=1.0, top_p=1.0, seed=-1, api_name="/caption")
    return job.result(timeout=120), job


@pytest.fixture
def store_swap(served_app):
    """Swap the served app's store for the test; the original comes back afterwards."""
    studio, original = served_app.studio, served_app.studio.store

    def swap(store):
        studio.store = store

    yield swap
    studio.store = original


def _faulty_copy(served_app, tmp_path: Path, pragma: str) -> tuple[AnnotationStore, Path]:
    """A store on a copy of the served database whose every connection runs `pragma` when it opens."""
    path = tmp_path / "copy" / "annotations.db"
    path.parent.mkdir()
    with contextlib.closing(sqlite3.connect(served_app.db_path)) as src, \
            contextlib.closing(sqlite3.connect(path)) as dst:
        src.backup(dst)
    store = AnnotationStore(path)
    connect = store._connect

    def connect_with_fault():
        db = connect()
        db.conn.execute(pragma)
        return db

    store._connect = connect_with_fault
    store._local = type(store._local)()  # drop this thread's already-open connection: every thread reconnects
    return store, path


def test_read_only_store_keeps_the_result_warns_and_writes_nothing(served_app, client, store_swap, tmp_path,
                                                                    caplog):
    store, path = _faulty_copy(served_app, tmp_path, "PRAGMA query_only = ON")  # every write: SQLITE_READONLY
    store_swap(store)
    before = rows(path)
    with caplog.at_level(logging.ERROR, logger="pixelllm.ui.records"):
        out, job = _caption_job(client)
    assert out["generation_id"] is None and out["words"]  # the user keeps the result
    warnings = _log_messages(job)
    assert any("could not be saved to the annotation store" in w and str(path) in w and "read-only" in w
               for w in warnings), warnings
    assert any(str(path) in str(r.exc_info[1]) for r in caplog.records
               if r.exc_info and r.name == "pixelllm.ui.records"), "server log names the file"
    assert rows(path) == before  # no partial rows
    store.close()
    with AnnotationStore(path) as check:
        assert check.integrity_check() == "ok"
    store_swap(served_app.store)
    normal_request_works(served_app)


def test_full_disk_keeps_the_result_warns_and_writes_nothing(served_app, client, monkeypatch, tmp_path):
    store = served_app.store
    before = rows(served_app.db_path)
    images_before = sorted((served_app.db_path.parent / "images").glob("*"))

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # A new image: its file is written before its row, so that write is the one that meets the full disk.
    path = _write(tmp_path, "fresh.png", _encode(_noise(64, 48, seed=7), "PNG"))
    monkeypatch.setattr(os, "replace", disk_full)
    fresh = client.submit(image=handle_file(str(path)), prompts="", text="", max_words=2, do_sample=False,
                          temperature=1.0, top_p=1.0, seed=-1, api_name="/caption")
    out = fresh.result(timeout=120)
    monkeypatch.undo()
    assert out["generation_id"] is None and out["words"]
    warnings = _log_messages(fresh)
    assert any("disk is full" in w and str(served_app.db_path) in w for w in warnings), warnings
    assert rows(served_app.db_path) == before  # no image row, no generation row
    assert sorted((served_app.db_path.parent / "images").glob("*")) == images_before  # no file, no temp file
    assert store.integrity_check() == "ok"
    again = caption(client, path, max_words=2)  # the disk has room again: the same request is logged
    assert isinstance(again["generation_id"], int)
    assert rows(served_app.db_path) == (before[0] + 1, before[1] + 1)


# ------------------------------------------------------------------------------------------ startup: app.py

def _corrupt(path: Path, kind: str) -> None:
    if kind == "random-bytes":
        path.write_bytes(np.random.default_rng(0).bytes(16384))
    elif kind == "not-a-store":
        with contextlib.closing(sqlite3.connect(path)) as conn:
            conn.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY)")
            conn.commit()
    else:  # garbled pages: keep the header
        with AnnotationStore(path) as s:
            sha = s.add_image(b"\x89PNG fake", 4, 4)
            for i in range(60):
                s.save_correction(annotator="a", image_sha=sha, caption=f"row {i} " * 300)
        data = bytearray(path.read_bytes())
        data[8192:-8192] = np.random.default_rng(1).bytes(len(data) - 16384)
        path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["random-bytes", "garbled-pages", "not-a-store"])
def test_app_refuses_to_start_on_a_bad_store_naming_the_file(kind, tmp_path, small_checkpoint, monkeypatch):
    import app as app_module

    path = tmp_path / "corrupt.db"
    _corrupt(path, kind)
    launched = []
    monkeypatch.setattr(app_module, "launch", lambda *a, **k: launched.append(a))
    monkeypatch.setattr(app_module, "check_address", lambda host, port: None)  # serves nothing
    with pytest.raises(SystemExit) as info:
        app_module.main(["--db", str(path), "--checkpoint", str(small_checkpoint), "--device", "cpu"])
    message = str(info.value.code)
    assert f"cannot open the annotation store {path}" in message and "--no-store" in message, message
    assert not launched
    app_module.main(["--db", str(path), "--no-store", "--checkpoint", str(small_checkpoint), "--device", "cpu"])
    assert len(launched) == 1  # running without logging is an explicit choice


def test_app_py_process_exits_with_a_message_on_a_corrupt_store(tmp_path, small_checkpoint):
    import subprocess
    import sys

    from tests.conftest import ROOT, free_port

    path = tmp_path / "corrupt.db"
    _corrupt(path, "random-bytes")
    proc = subprocess.run([sys.executable, str(ROOT / "app.py"), "--db", str(path), "--checkpoint",
                           str(small_checkpoint), "--device", "cpu", "--port", str(free_port())],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-2000:])
    assert f"cannot open the annotation store {path}" in proc.stderr
    assert re.search(r"not a SQLite database|corrupt", proc.stderr), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_app_refuses_pickle_weights_with_a_message(tmp_path, small_checkpoint, monkeypatch):
    import shutil

    import app as app_module

    ckpt = tmp_path / "pickled"
    shutil.copytree(small_checkpoint, ckpt)
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not even unpickled")
    monkeypatch.setattr(app_module, "launch", lambda *a, **k: pytest.fail("must not launch"))
    monkeypatch.setattr(app_module, "check_address", lambda host, port: None)  # serves nothing
    with pytest.raises(SystemExit, match=r"refusing to load pickle weights \['pytorch_model.bin'\]"):
        app_module.main(["--no-store", "--checkpoint", str(ckpt), "--device", "cpu"])


def test_app_refuses_an_unservable_checkpoint_or_flags_with_a_message(tmp_path, small_checkpoint, monkeypatch):
    """No tokenizer, a config key this version does not know, a hub error, or --concurrency 0 (every call would
    wait in the queue forever): one line, no traceback, nothing launched."""
    import json
    import shutil

    from huggingface_hub.errors import RepositoryNotFoundError

    import app as app_module
    from pixelllm import PixelLLM

    monkeypatch.setattr(app_module, "launch", lambda *a, **k: pytest.fail("must not launch"))
    monkeypatch.setattr(app_module, "check_address", lambda host, port: None)  # serves nothing
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(small_checkpoint, no_tokenizer)
    for path in no_tokenizer.glob("tokenizer*"):
        path.unlink()
    newer = tmp_path / "newer"
    shutil.copytree(small_checkpoint, newer)
    config = json.loads((newer / "config.json").read_text())
    config["image_encoder"]["bogus"] = 1
    (newer / "config.json").write_text(json.dumps(config))
    for folder, match in ((no_tokenizer, "has no tokenizer"), (newer, r"image_encoder has unknown keys \['bogus'\]")):
        with pytest.raises(SystemExit, match=match):
            app_module.main(["--no-store", "--checkpoint", str(folder), "--device", "cpu"])

    def missing_repo(*args, **kwargs):  # what the hub client raises for a mistyped id, in the family it belongs to
        assert issubclass(RepositoryNotFoundError, OSError)
        raise OSError("404 Client Error: Repository Not Found for url: https://x")

    monkeypatch.setattr(PixelLLM, "from_pretrained", missing_repo)
    with pytest.raises(SystemExit, match="cannot load the checkpoint someone/typo-model: 404"):
        app_module.main(["--no-store", "--checkpoint", "someone/typo-model", "--device", "cpu"])
    for bad in ("0", "-3"):
        with pytest.raises(SystemExit):
            app_module.parse_args(["--concurrency", bad])
