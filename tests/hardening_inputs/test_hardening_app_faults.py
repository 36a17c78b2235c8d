"""Hardening: store faults behind the running app (a read-only store, a full disk: the user keeps the result, is
warned, nothing partial is written) and app.py refusing to start, with a message and no traceback, on a corrupt
store, pickle weights, an unservable checkpoint or bad flags.

The rest of tests/hardening_inputs/: image files (predictor, page upload, API): test_hardening_images.py; prompts,
text, expressions and numbers: test_hardening_prompts.py. Shared helpers: conftest.py."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file

from pixelllm.store import AnnotationStore
from tests.hardening_inputs.conftest import (
    NORMAL_IMAGE,
    _encode,
    _noise,
    _write,
    caption,
    normal_request_works,
)

# ------------------------------------------------------------------------------------------ store faults behind the app

def rows(db_path: Path) -> tuple[int, int]:
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        return (conn.execute("SELECT count(*) FROM images").fetchone()[0],
                conn.execute("SELECT count(*) FROM generations").fetchone()[0])


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
