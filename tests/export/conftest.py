"""Fixtures and helpers of the training.export tests (this folder only): `store` (an empty annotation store in the
test's folder); the test modules import `add_caption` (a generation and its correction, with traces and timing if
given), `png_bytes`, `read_back` (an export's LN records) and the image size `W`, `H` from here."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelllm.store import AnnotationStore
from training import export
from training.data.localized_narratives import read_localized_narratives

W, H = 160, 120


def png_bytes(seed: int, width: int = W, height: int = H) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def store(tmp_path):
    with AnnotationStore(tmp_path / "store" / "annotations.db") as s:
        yield s


def add_caption(store, seed: int, words, boxes, *, traces=(), timed_caption=(), status="submitted",
                prompts=None, non_visual=()) -> int:
    sha = store.add_image(png_bytes(seed), W, H)
    gen = store.log_generation(sha, "caption", words, boxes, model_id="test", model_version="v0",
                               prompts=prompts or {"box": None, "points": [], "point_labels": [], "text": None})
    return store.save_correction(annotator="alice", generation_id=gen, status=status, caption=" ".join(words),
                                 words=words, boxes=boxes, traces=traces, timed_caption=timed_caption,
                                 non_visual=non_visual)


def read_back(out: Path):
    samples, stats = read_localized_narratives(out / export.LN_FILE)
    return samples, stats
