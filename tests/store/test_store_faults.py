"""Tests for pixelllm.store under concurrency, crashes and faults: racing threads, SIGKILL mid-write, read-only
files and folders, a full disk, corrupt files.

The store is checked from outside where it matters: row counts and integrity come from a separate plain
sqlite3 connection, crash and read-only cases run the store in a child process.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from pixelllm.store import AnnotationStore, StoreError
from tests.store.conftest import IMAGE, LOAD_STORE, count_rows, edit, run_child


@pytest.fixture
def world_readable_dir():
    """A temp folder an unprivileged user can reach (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="pixelllm-store-"))
    path.chmod(0o777)
    yield path
    for p in [path, *path.rglob("*")]:
        with contextlib.suppress(OSError):
            p.chmod(0o777)
    shutil.rmtree(path, ignore_errors=True)


# ---- concurrency and crashes ------------------------------------------------------------------------


def test_eight_threads_saving_at_once_lose_nothing(store: AnnotationStore, image: str, db_path: Path):
    n_threads, per_thread = 8, 25
    barrier = threading.Barrier(n_threads)
    saved: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def annotate(t: int) -> None:
        try:
            barrier.wait()
            ids, parent = [], None
            for i in range(per_thread):  # each thread grows its own chain, all chains share the file
                parent = store.save_correction(**edit(image_sha=image, parent_id=parent, annotator=f"a{t}",
                                                      caption=f"{t}:{i}", client_token=f"{t}:{i}"))
                ids.append(parent)
            saved[t] = ids
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=annotate, args=(t,)) for t in range(n_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    all_ids = [i for ids in saved.values() for i in ids]
    assert len(all_ids) == len(set(all_ids)) == n_threads * per_thread
    assert count_rows(db_path) == n_threads * per_thread
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        captions = {c for (c,) in conn.execute("SELECT caption FROM corrections")}
    assert captions == {f"{t}:{i}" for t in range(n_threads) for i in range(per_thread)}
    for ids in saved.values():
        assert [r["id"] for r in store.history(ids[0])] == ids
    assert store.integrity_check() == "ok"


def test_racing_edits_of_one_head_cannot_fork(store: AnnotationStore, image: str, db_path: Path):
    head = store.save_correction(**edit(image_sha=image, status="submitted"))
    n = 8
    barrier = threading.Barrier(n)
    outcomes: list[object] = []

    def race(t: int) -> None:
        barrier.wait()
        try:
            outcomes.append(store.save_correction(**edit(parent_id=head, annotator=f"a{t}")))
        except ValueError as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=race, args=(t,)) for t in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [o for o in outcomes if isinstance(o, int)]
    losers = [o for o in outcomes if isinstance(o, ValueError)]
    assert len(winners) == 1 and len(losers) == n - 1
    assert all("superseded" in str(e) for e in losers)
    assert [r["id"] for r in store.history(head)] == [head, winners[0]] and count_rows(db_path) == 2


WRITER = LOAD_STORE + """
s = store.AnnotationStore(sys.argv[1])
sha = s.add_image(b"sigkill test image", 8, 8)
trace = [[{"x": i / 400, "y": 0.5, "t": i / 40} for i in range(400)]]  # makes every commit a few pages
parent = None
while True:
    parent = s.save_correction(annotator="writer", image_sha=sha, parent_id=parent, status="submitted",
                               caption="a red circle", words=["a", "red", "circle"], boxes=[[0, 0, 1, 1]] * 3,
                               traces=trace)
    print(parent, flush=True)
"""


@pytest.mark.timeout(120)
def test_sigkill_mid_stream_loses_no_committed_row(db_path: Path):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(db_path)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while len(lines) < 40:
            line = proc.stdout.readline()
            assert line, f"writer died early: {proc.stderr.read()}"
            lines.append(line)
        for _ in range(random.randint(0, 20)):  # land the kill at an arbitrary point of a write
            lines.append(proc.stdout.readline())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        lines += proc.stdout.readlines()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    printed = [int(line) for line in lines if line.endswith("\n")]  # a torn last line was never fully printed

    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    s = AnnotationStore(db_path)
    try:
        assert s.integrity_check() == "ok"
        chain = [r["id"] for r in s.history(printed[0])]
        assert chain[:len(printed)] == printed, "every printed (committed) id must be in the file, in order"
        assert len(chain) - len(printed) <= 1  # at most the one committed just before the kill, unprinted
        next_id = s.save_correction(annotator="after", parent_id=chain[-1])  # the store still works
        assert s.head(printed[0])["id"] == next_id
    finally:
        s.close()


# ---- faults -----------------------------------------------------------------------------------------

UNPRIVILEGED = LOAD_STORE + """
import json, os, shutil, tempfile
# Run every code path once while still privileged: after setuid the interpreter's own lazily imported
# modules may be unreadable.
warm = tempfile.mkdtemp()
with store.AnnotationStore(os.path.join(warm, "warm.db")) as w:
    sha = w.add_image(b"warm", 1, 1)
    w.save_correction(annotator="w", image_sha=sha, words=["x"], boxes=[[0, 0, 1, 1]])
    w.list_corrections(search="x")
shutil.rmtree(warm)
if os.geteuid() == 0:  # root ignores file modes: act as nobody so read-only really is read-only
    os.setgid(65534)
    os.setuid(65534)
result = {}
try:
    s = store.AnnotationStore(sys.argv[1])
    result["rows_seen"] = len(s.list_corrections(heads_only=False))
    s.save_correction(annotator="ro", image_sha=sys.argv[2], words=["x"], boxes=[[0, 0, 1, 1]])
    result["saved"] = True
except store.StoreError as exc:
    result["store_error"] = str(exc)
except Exception as exc:
    result["other_error"] = repr(exc)
print(json.dumps(result))
"""


def _store_with_one_row(path: Path) -> str:
    with AnnotationStore(path) as s:
        sha = s.add_image(IMAGE, 64, 48)
        s.save_correction(**edit(image_sha=sha))
    return sha


def test_read_only_database_file_refuses_writes_cleanly(world_readable_dir: Path):
    path = world_readable_dir / "annotations.db"
    sha = _store_with_one_row(path)
    path.chmod(0o444)  # the folder stays writable: the file can be opened and read, not written
    proc = run_child(UNPRIVILEGED, str(path), sha)
    result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else proc.stderr
    assert isinstance(result, dict), result
    assert result.get("rows_seen") == 1, result
    assert "saved" not in result and "read-only" in result["store_error"] and str(path) in result["store_error"]
    path.chmod(0o644)
    assert count_rows(path) == 1
    with AnnotationStore(path) as s:
        assert s.integrity_check() == "ok"


def test_read_only_folder_fails_at_open_naming_the_file(world_readable_dir: Path):
    path = world_readable_dir / "annotations.db"
    sha = _store_with_one_row(path)
    path.chmod(0o444)
    world_readable_dir.chmod(0o555)  # cannot create the WAL index next to the file
    proc = run_child(UNPRIVILEGED, str(path), sha)
    world_readable_dir.chmod(0o777)
    path.chmod(0o644)
    result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else proc.stderr
    assert isinstance(result, dict) and "store_error" in result, result
    assert str(path) in result["store_error"] and "read-only" in result["store_error"]
    assert "writes its WAL journal beside the file" in result["store_error"], result  # not "missing folder"
    assert count_rows(path) == 1


APP_OPEN_STORE = UNPRIVILEGED.replace("if os.geteuid() == 0:", "import app\nif os.geteuid() == 0:", 1).split(
    "result = {}")[0] + """
result = {}
try:
    s = app.open_store(sys.argv[1])
    result["opened"] = True
    s.save_correction(annotator="ro", image_sha=sys.argv[2], words=["x"], boxes=[[0, 0, 1, 1]])
    result["saved"] = True
except SystemExit as exc:
    result["refused"] = str(exc)
except Exception as exc:
    result["other_error"] = repr(exc)
print(json.dumps(result))
"""


@pytest.mark.parametrize("case", ["read-only file", "read-only folder holding the WAL files"])
def test_app_refuses_at_start_a_store_it_cannot_write(world_readable_dir: Path, case: str):
    """The app promises to stop at start on a store it cannot save to; a read-only file (writable folder), or a
    read-only folder whose -wal/-shm exist (another process has the store open, or was killed), opens and reads
    fine, so only a write probe finds out."""
    path = world_readable_dir / "annotations.db"
    sha = _store_with_one_row(path)
    path.chmod(0o444)
    keep_open = None
    if case != "read-only file":
        keep_open = AnnotationStore(path)  # holds annotations.db-wal and -shm beside the file
        keep_open.list_corrections()
        world_readable_dir.chmod(0o555)
    try:
        proc = run_child(APP_OPEN_STORE, str(path), sha)
    finally:
        world_readable_dir.chmod(0o777)
        path.chmod(0o644)
        if keep_open is not None:
            keep_open.close()
    result = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else proc.stderr
    assert isinstance(result, dict) and "refused" in result, result
    assert "read-only" in result["refused"] and str(path) in result["refused"], result
    assert count_rows(path) == 1


def test_stored_images_get_the_same_permissions_as_the_database(store: AnnotationStore, db_path: Path):
    """Images are written like any file the process creates (0o666 less the umask), not 0o600: another account
    that can read the database (an export or a finetune run by a teammate) can read the images too."""
    sha = store.add_image(IMAGE, 64, 48)
    plain = db_path.parent / "plain"
    plain.write_bytes(b"x")
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(Path(store.get_image(sha)["abs_path"])) == mode(plain)


def test_check_writable_changes_nothing(store: AnnotationStore, image: str, db_path: Path):
    store.save_correction(**edit(image_sha=image))
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        # data_version moves when another connection commits anything (the probe rewrites user_version with its
        # own value, so comparing values could not tell a commit from a rollback)
        before = conn.execute("PRAGMA data_version").fetchone()[0], conn.execute("PRAGMA user_version").fetchone()[0]
        store.check_writable()
        after = conn.execute("PRAGMA data_version").fetchone()[0], conn.execute("PRAGMA user_version").fetchone()[0]
    assert after == before
    assert count_rows(db_path) == 1 and store.integrity_check() == "ok"
    store.save_correction(**edit(image_sha=image))  # the connection is usable afterwards


def test_database_full_raises_store_error_and_writes_nothing(store: AnnotationStore, image: str, db_path: Path):
    store.save_correction(**edit(image_sha=image))
    conn = store._db().conn
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")  # this connection may not grow the file: SQLITE_FULL
    big_trace = [[{"x": i / 5000, "y": 0.5, "t": i / 50} for i in range(5000)]]
    with pytest.raises(StoreError, match="disk is full") as info:
        store.save_correction(**edit(image_sha=image, traces=big_trace))
    assert str(db_path) in str(info.value)
    assert not conn.in_transaction and count_rows(db_path) == 1
    conn.execute("PRAGMA max_page_count = 1073741823")
    store.save_correction(**edit(image_sha=image, traces=big_trace))
    assert count_rows(db_path) == 2 and store.integrity_check() == "ok"


@pytest.mark.parametrize("code, message", [(errno.ENOSPC, "disk is full"), (errno.EROFS, "read-only")])
def test_image_write_failure_leaves_no_file_and_no_row(store, db_path, monkeypatch, code, message):
    def fail(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(StoreError, match=message):
        store.add_image(IMAGE, 64, 48)
    monkeypatch.undo()
    assert count_rows(db_path, "images") == 0
    assert list((db_path.parent / "images").iterdir()) == []  # the temp file was removed
    sha = store.add_image(IMAGE, 64, 48)
    assert store.get_image(sha) is not None


@pytest.mark.parametrize("damage", ["random_bytes", "truncated", "garbled_pages"])
def test_corrupt_file_raises_store_error_naming_the_file(tmp_path: Path, damage: str):
    path = tmp_path / "annotations.db"
    if damage == "random_bytes":
        path.write_bytes(random.Random(0).randbytes(16384))
    else:
        with AnnotationStore(path) as s:
            sha = s.add_image(IMAGE, 64, 48)
            for i in range(60):
                s.save_correction(**edit(image_sha=sha, caption=f"row {i} " * 300))
        data = bytearray(path.read_bytes())
        assert len(data) > 16 * 4096
        if damage == "truncated":
            data = data[: len(data) // 2]
        else:  # keep the header, overwrite the pages in the middle with noise
            data[8192:-8192] = random.Random(1).randbytes(len(data) - 16384)
        path.write_bytes(bytes(data))
    with pytest.raises(StoreError) as info:
        AnnotationStore(path)
    assert str(path) in str(info.value)
    assert "corrupt" in str(info.value) or "not a SQLite database" in str(info.value)


def test_other_sqlite_database_is_not_taken_over(tmp_path: Path):
    path = tmp_path / "someone_elses.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY)")
        conn.commit()
    with pytest.raises(StoreError, match="not an annotation store"):
        AnnotationStore(path)
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"  # not even switched to WAL
        assert [n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")] == ["accounts"]
