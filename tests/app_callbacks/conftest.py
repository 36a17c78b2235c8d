"""Fixtures and helpers of the studio callback tests (this folder only).

`studio` is a Studio on the small random checkpoint (`small_predictor`, tests/conftest.py) with a fresh annotation
store and its own download folder; `prefix_calls` records the keyword arguments of every PixelLLM.encode_prefix call
(what reaches the language model); `demo` is the whole app (`build_demo`) on them, for tests that run the handlers
layout.py registers; `page_session` is what a page's events carry before its first image (gr.State's initial
Session, deep-copied) and `loads` lists the files decoded for new sessions. `VISITOR` (the browser session outputs
are logged under), `_loaded` (a session on an opened image) and `_run` (a whole Generate, its last update unpacked)
are imported from here by the test modules. Decoding runs on one thread, as in the rest of the suite.
"""

from __future__ import annotations

import copy

import pytest
import torch

from pixelllm.ui import build_demo, records
from pixelllm.ui import callbacks as cb
from pixelllm.ui import workspace as ws

torch.set_num_threads(1)


@pytest.fixture
def studio(small_predictor, annotation_store, tmp_path):
    return ws.Studio(predictor=small_predictor, store=annotation_store, checkpoint="tests/small-checkpoint",
                     min_word_interval=0.0, download_root=tmp_path / "downloads")


@pytest.fixture
def demo(small_predictor, annotation_store, tmp_path):
    demo = build_demo(small_predictor, annotation_store, min_word_interval=0.0)
    demo.studio.download_root = tmp_path / "downloads"
    return demo


@pytest.fixture
def page_session():
    """The session a page's events carry before its first image, and again once gradio dropped its state: gr.State's
    initial empty Session, deep-copied for the page (layout.py)."""
    return copy.deepcopy(ws.Session())


@pytest.fixture
def loads(monkeypatch):
    """The files decoded for a new session (`load_user_image`), in order."""
    decoded: list[str] = []
    decode = ws.load_user_image

    def counted(source):
        decoded.append(source)
        return decode(source)

    monkeypatch.setattr(ws, "load_user_image", counted)
    return decoded


@pytest.fixture
def prefix_calls(small_pixelllm, monkeypatch):
    """Record the keyword arguments of every PixelLLM.encode_prefix call (what reaches the language model)."""
    calls: list[dict] = []
    original = small_pixelllm.encode_prefix

    def spy(features, **kwargs):
        calls.append({k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})
        return original(features, **kwargs)

    monkeypatch.setattr(small_pixelllm, "encode_prefix", spy)
    return calls


def _loaded(studio, path):
    session, cap, ref, dense = ws.load_image(studio, str(path), None)
    return session


VISITOR = records.Visitor("test")  # the browser session the outputs are logged under


def _run(studio, session, *, text=None, max_words=12, sampling=False, temperature=1.0, top_p=1.0, seed=None):
    outputs = list(cb.generate(studio, session, text, max_words, sampling, temperature, top_p, seed, VISITOR))
    view, caption, files, session = outputs[-1]
    return outputs, view, caption, files, session
