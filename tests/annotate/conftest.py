"""Fixtures and helpers of the Annotate tab's Python tests (this folder only): `studio` (a Studio on the small random
checkpoint and a fresh annotation store) and `captioned` (a session whose last output is a real streamed caption);
`opened` and `recording` are plain helpers the test modules import from here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixelllm.ui import annotate as an
from pixelllm.ui import callbacks as cb
from pixelllm.ui import records
from pixelllm.ui import workspace as ws


@pytest.fixture
def studio(small_predictor, annotation_store):
    torch.set_num_threads(1)
    return ws.Studio(predictor=small_predictor, store=annotation_store, min_word_interval=0.0)


@pytest.fixture
def captioned(studio, example_images):
    """A session whose last output is a real streamed caption (logged as a generation)."""
    session, *_ = ws.load_image(studio, str(example_images[0]), None)
    *_, (view, text, files, session) = list(cb.generate(studio, session, "", 6, False, 1.0, 1.0, None,
                                                        records.Visitor("s1")))
    assert session.last["generation_id"] is not None and len(session.last["words"]) >= 2
    return session


def opened(studio, session):
    state, view = an.open_current(studio, session, None)
    assert view["words"] and view["image"]["src"].startswith("data:image/png")
    return state


def recording(n: int, seed: int = 0) -> tuple[list, list]:
    """A plausible recording: 2 segments of points (normalised) and one time slot per word."""
    rng = np.random.default_rng(seed)
    t = np.sort(rng.uniform(0, 0.5 * n, 40))
    xy = rng.uniform(0.05, 0.95, (40, 2))
    points = [{"x": float(x), "y": float(y), "t": float(s)} for (x, y), s in zip(xy, t)]
    traces = [points[:25], points[25:]]
    edges = np.linspace(0, 0.5 * n, n + 1)
    timed = [{"utterance": f"w{i}", "start_time": float(edges[i]), "end_time": float(edges[i + 1])} for i in range(n)]
    return traces, timed
