"""Helpers of the input-hardening tests (this folder only). Each row of docs/hardening.md names the test that keeps
it true.

Every bad input gets a clear message (the predictor raises ValueError; through the API gradio_client raises
AppError carrying the same message) or a documented normalisation, nothing is logged for a refused request, and
a normal request right after it succeeds (`assert_refused`). The API tests use `served_app` (tests/conftest.py: the
app launched by app.py's own `launch` in this process, small random checkpoint, its own annotation store) through
the `client` fixture. `NORMAL_IMAGE`, the image makers `_encode` / `_noise` / `_write` and the API helpers
(`caption`, `refer`, `dense`, `assert_refused`, `normal_request_works`, `assert_boxes_inside`) are imported from
here by the test modules.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

torch.set_num_threads(1)


NORMAL_IMAGE = Path(__file__).resolve().parents[2] / "assets" / "examples" / "example_000000.png"  # 256x256


# ------------------------------------------------------------------------------------------ image files

def _encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _noise(width: int = 100, height: int = 60, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


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


def generations(db_path: Path) -> int:
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        return conn.execute("SELECT count(*) FROM generations").fetchone()[0]


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
