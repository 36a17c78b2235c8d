"""Fixtures and helpers of the annotation store tests (this folder only).

`db_path` is a store file under a `data/` folder not yet created, `store` an AnnotationStore on it (closed after
the test), `image` the sha of a fake image added to it. The constants and helpers beside them (`IMAGE`, `WORDS`,
`BOXES`, `edit`, `count_rows`, `run_child`, `LOAD_STORE`) are imported from here by the test modules.
"""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

# Child processes import the store alone: pixelllm/__init__.py is lazy, so this must not import torch.
LOAD_STORE = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
import pixelllm.store as store
"""
IMAGE = b"\x89PNG fake image bytes: the store never decodes them"
WORDS = ["a", "red", "circle", "left"]
BOXES = [[0, 0, 10, 10], [5, 5, 20, 20], [5, 5, 20, 20], [0, 0, 40, 30]]


def count_rows(path: Path, table: str = "corrections") -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def run_child(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout)


def edit(**overrides):
    """Keyword arguments for a valid save_correction call."""
    kwargs = dict(annotator="alice", caption="a red circle on the left", words=WORDS, boxes=BOXES)
    kwargs.update(overrides)
    return kwargs


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "annotations.db"


@pytest.fixture
def store(db_path: Path):
    from pixelllm.store import AnnotationStore

    s = AnnotationStore(db_path)
    yield s
    s.close()


@pytest.fixture
def image(store) -> str:
    return store.add_image(IMAGE, 64, 48)
