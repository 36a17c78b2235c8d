"""Fixtures and helpers of the finetune tests (this folder only), on a small random PixelLLM (tests/helpers.py):
`base_dir` (its checkpoint; module-scoped, so each test module saves its own) and `store` (an annotation store
holding four submitted corrections covering the prompt kinds, a referring one among them, and a draft). The test
modules import `settings` (FinetuneSettings on those, with small sizes) and the images' size `W`, `H` from here."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixelllm.store import AnnotationStore
from tests.helpers import save_small_checkpoint
from training import finetune as ft

W, H = 80, 48


def png_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return save_small_checkpoint(tmp_path_factory.mktemp("base"), seed=3)


def fill_store(store: AnnotationStore) -> None:
    """Four corrections covering the prompt kinds: global box, box, points + text, and a referring one."""
    prompts = [
        {"points": [], "point_labels": [], "box": None, "text": None},
        {"points": [], "point_labels": [], "box": [10.0, 5.0, 50.0, 40.0], "text": None},
        {"points": [[20.0, 20.0], [30.0, 25.0]], "point_labels": [1, 0], "box": None, "text": "In this picture"},
    ]
    for i, prompt in enumerate(prompts):
        sha = store.add_image(png_bytes(i), W, H)
        gen = store.log_generation(sha, "caption", ["a", "circle"], [[0, 0, 9, 9], [1, 1, 8, 8]], model_id="base",
                                   model_version="v", prompts=prompt)
        store.save_correction(annotator="ann", generation_id=gen, status="submitted",
                              caption="a large red circle", words=["a", "large", "red", "circle"],
                              boxes=[[0, 0, W, H], [10, 5, 50, 40], [10, 5, 50, 40], [10, 5, 50, 40]],
                              non_visual=[0])
    sha = store.add_image(png_bytes(9), W, H)
    gen = store.log_generation(sha, "refer", ["the red circle"], [[0, 0, 5, 5]], model_id="base", model_version="v",
                               prompts={"expressions": ["the red circle"]})
    store.save_correction(annotator="ann", generation_id=gen, status="submitted", words=["the red circle"],
                          boxes=[[20, 10, 60, 40]])
    draft = store.save_correction(annotator="ann", image_sha=sha, status="draft", words=["ignored"],
                                  boxes=[[0, 0, 1, 1]])
    assert draft


@pytest.fixture
def store(tmp_path):
    with AnnotationStore(tmp_path / "annotations.db") as s:
        fill_store(s)
        yield s


def settings(base_dir: Path, store: AnnotationStore, out: Path, **overrides) -> ft.FinetuneSettings:
    values = dict(db=str(store.path), base=str(base_dir), out=str(out), steps=4, batch_size=2, lr=5e-2, warmup=1,
                  log_every=2, replay_data=None)
    values.update(overrides)
    return ft.FinetuneSettings(**values)
