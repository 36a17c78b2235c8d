"""Tests for pixelllm.store: round trips, append-only history, and that the store imports without torch.
Concurrency, crashes and faults are in test_store_faults.py, schema migrations in test_store_migrations.py;
the shared fixtures (`db_path`, `store`, `image`) and helpers are in conftest.py.

The store is checked from outside where it matters: row counts and integrity come from a separate plain
sqlite3 connection.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import threading
from pathlib import Path

import pytest

from pixelllm import store as store_module
from pixelllm.store import AnnotationStore, StoreError, change_summary
from tests.store.conftest import BOXES, IMAGE, LOAD_STORE, WORDS, count_rows, edit, run_child

# ---- round trips ------------------------------------------------------------------------------------


def test_open_creates_parent_folders_and_sets_pragmas_per_thread(store: AnnotationStore, db_path: Path):
    assert db_path.is_file() and store.schema_version() == len(store_module.MIGRATIONS)
    seen = []

    def pragmas():
        conn = store._db().conn
        seen.append((id(conn), *(conn.execute(f"PRAGMA {p}").fetchone()[0]
                                 for p in ("foreign_keys", "journal_mode", "synchronous", "busy_timeout"))))

    pragmas()
    thread = threading.Thread(target=pragmas)
    thread.start()
    thread.join()
    assert seen[0][0] != seen[1][0], "each thread must get its own connection"
    for _, foreign_keys, journal_mode, synchronous, busy_timeout in seen:
        assert (foreign_keys, journal_mode, synchronous, busy_timeout) == (1, "wal", 2, 30_000)


def test_add_image_stores_file_once(store: AnnotationStore, db_path: Path):
    sha = store.add_image(IMAGE, 64, 48)
    assert store.add_image(bytearray(IMAGE), 64, 48) == sha
    row = store.get_image(sha)
    assert row["path"] == f"images/{sha}.png"
    assert (row["width"], row["height"], row["num_bytes"]) == (64, 48, len(IMAGE))
    assert Path(row["abs_path"]).read_bytes() == IMAGE
    assert sorted(p.name for p in (db_path.parent / "images").iterdir()) == [f"{sha}.png"]  # no temp files
    assert count_rows(db_path, "images") == 1
    with pytest.raises(ValueError, match="already stored as 64x48"):
        store.add_image(IMAGE, 65, 48)
    for bad in [dict(data=b""), dict(width=0), dict(height=-1), dict(ext="../x"), dict(width=True)]:
        with pytest.raises(ValueError):
            store.add_image(**{"data": IMAGE, "width": 64, "height": 48, **bad})
    assert store.get_image("0" * 64) is None


@pytest.mark.skipif(not Path("/proc/self/ns/pid").exists(), reason="needs Linux's /proc to tell a dead writer")
def test_storing_an_image_does_not_list_the_images_and_the_start_up_check_sweeps_them(store, db_path, monkeypatch):
    """Each new image was written with a sweep of its folder for dead writers' temporary files: a listing of every
    stored image at every new one (quadratic over a bulk import). Image writes skip it; `check_writable`, which the
    app runs at start, sweeps the folder once: a dead writer's temporary file goes, a live writer's stays."""
    from pixelllm.files import writer_tag

    dead = subprocess.Popen(["true"])
    dead.wait()
    images = db_path.parent / "images"
    store.add_image(IMAGE, 64, 48)
    left = {name: images / name for name in (f".{'a' * 64}.png.{writer_tag(dead.pid)}.{'0' * 12}.tmp",
                                             f".{'b' * 64}.png.{writer_tag(os.getpid())}.{'1' * 12}.tmp")}
    for path in left.values():
        path.write_bytes(b"half an image")
    listed = []
    real_listdir = os.listdir
    monkeypatch.setattr(os, "listdir", lambda folder=".": listed.append(Path(folder)) or real_listdir(folder))
    for n in range(3):
        store.add_image(IMAGE + bytes([n]), 64, 48)
    assert images not in listed
    assert all(path.exists() for path in left.values())
    store.check_writable()
    assert images in listed
    assert [path.exists() for path in left.values()] == [False, True]  # the dead writer's went, the live one's stayed


def test_generation_round_trip_and_filters(store: AnnotationStore, image: str):
    gid = store.log_generation(image, "caption", WORDS, BOXES, model_id="pixelllm-tiny", model_version="3",
                               prompts={"box": [0, 0, 64, 48]}, extra={"caption": "a red circle left"},
                               adapter=None, session="s1", user="u1")
    rid = store.log_generation(image, "refer", [], [[1, 2, 3, 4]], model_id="pixelllm-tiny", model_version="3",
                               prompts={"text": "the circle"})
    row = store.get_generation(gid)
    assert row["words"] == WORDS and row["boxes"] == [[float(c) for c in b] for b in BOXES]
    assert row["prompts"] == {"box": [0, 0, 64, 48]} and row["extra"]["caption"] == "a red circle left"
    assert (row["task"], row["session"], row["user"], row["adapter"]) == ("caption", "s1", "u1", None)
    assert [g["id"] for g in store.list_generations()] == [rid, gid]
    assert [g["id"] for g in store.list_generations(task="refer")] == [rid]
    assert [g["id"] for g in store.list_generations(session="s1", image_sha=image)] == [gid]
    assert store.get_generation(999) is None
    with pytest.raises(ValueError, match="task must be one of"):
        store.log_generation(image, "segment", [], [], model_id="m", model_version="1")
    with pytest.raises(ValueError, match="one box per word"):
        store.log_generation(image, "caption", WORDS, BOXES[:2], model_id="m", model_version="1")
    with pytest.raises(ValueError, match="unknown image"):
        store.log_generation("a" * 64, "caption", [], [], model_id="m", model_version="1")
    with pytest.raises(ValueError, match="JSON-serialisable"):
        store.log_generation(image, "caption", [], [], model_id="m", model_version="1", extra={"x": float("nan")})


def test_correction_round_trip_against_generation(store: AnnotationStore, image: str, db_path: Path):
    gid = store.log_generation(image, "caption", WORDS, BOXES, model_id="m", model_version="1")
    timed = [{"utterance": w, "start_time": i * 0.4, "end_time": i * 0.4 + 0.3} for i, w in enumerate(WORDS)]
    traces = [[{"x": 0.1, "y": 0.2, "t": 0.0}, {"x": 0.3, "y": 0.4, "t": 0.5}], [{"x": 0.5, "y": 0.5, "t": 1.0}]]
    cid = store.save_correction(**edit(generation_id=gid, timed_caption=timed, traces=traces, non_visual=[0],
                                       comment="fixed", status="submitted"))
    row = store.get_correction(cid)
    assert row["image_sha"] == image and row["generation_id"] == gid and row["parent_id"] is None
    assert (row["annotator"], row["status"], row["comment"], row["reviewer"]) == ("alice", "submitted", "fixed", None)
    assert row["words"] == WORDS and row["timed_caption"] == timed and row["traces"] == traces
    assert row["non_visual"] == [0] and row["chain_id"] == cid and row["is_head"] is True
    summary = row["change_summary"]
    assert summary["against"] == "generation" and summary["against_id"] == gid
    assert summary["words"] == {"edited": 0, "inserted": 0, "deleted": 0, "ops": []}
    assert summary["boxes_moved"] == [] and summary["trace_rerecorded"] is True
    assert summary["status"] == [None, "submitted"]
    assert store.get_correction(cid + 1) is None
    with contextlib.closing(sqlite3.connect(db_path)) as conn:  # JSON really is JSON in the file
        assert json.loads(conn.execute("SELECT traces FROM corrections").fetchone()[0]) == traces


def test_change_summary_against_parent(store: AnnotationStore, image: str):
    first = store.save_correction(**edit(image_sha=image, status="draft"))
    new_words = ["a", "big", "blue", "circle"]
    new_boxes = [[0, 0, 10, 10], [5, 5, 20, 20], [5, 5, 20, 20], [9, 5, 30, 20]]  # "circle" moved by 4 px
    second = store.save_correction(**edit(parent_id=first, words=new_words, boxes=new_boxes, status="submitted",
                                          traces=[[{"x": 0.5, "y": 0.5, "t": 0.0}]]))
    summary = store.get_correction(second)["change_summary"]
    assert summary["against"] == "parent" and summary["against_id"] == first
    assert summary["words"]["edited"] == 1 and summary["words"]["inserted"] == 1
    assert summary["words"]["deleted"] == 1  # "red" -> "big blue", "left" deleted
    assert summary["boxes_moved"] == [3]  # "circle" kept its word but its box moved
    assert summary["trace_rerecorded"] is True and summary["caption_changed"] is False
    assert summary["status"] == ["draft", "submitted"]
    # Sub-tolerance jitter is not a move; the pure function agrees with what was stored.
    jitter = [[b[0] + 0.25, b[1], b[2], b[3]] for b in new_boxes]
    old = {"words": new_words, "boxes": new_boxes, "caption": "", "status": "x"}
    assert change_summary(old, {**old, "boxes": jitter, "timed_caption": [], "traces": [],
                                "non_visual": []})["boxes_moved"] == []


@pytest.mark.parametrize("overrides, message", [
    (dict(annotator="   "), "annotator must not be empty"),
    (dict(annotator=None), "annotator must be a string"),
    (dict(status="accepted"), "use review"),
    (dict(status="final"), "status must be"),
    (dict(boxes=BOXES[:3]), "one box per word"),
    (dict(boxes=[[10, 0, 0, 10]] * 4), "x0 <= x1"),
    (dict(boxes=[[0, 0, float("nan"), 1]] * 4), "finite number"),
    (dict(boxes=[[0, 0, 1]] * 4), r"\[x0, y0, x1, y1\]"),
    (dict(words=["a", "", "c", "d"]), r"words\[1\] must be a non-empty string"),
    (dict(words="a red circle left"), "words must be a list"),
    (dict(timed_caption=[{"utterance": "a", "start_time": 0, "end_time": 1}]), "one entry per word"),
    (dict(timed_caption=[{"utterance": "a", "start_time": 2, "end_time": 1}] * 4), "ends before it starts"),
    (dict(timed_caption=[{"utterance": "a", "start": 0, "end": 1}] * 4), "utterance, start_time, end_time"),
    (dict(traces=[[{"x": 0.1, "y": 0.2}]]), r"traces\[0\]\[0\] must be \{x, y, t\}"),
    (dict(non_visual=[4]), "not a word index"),
    (dict(non_visual=[1, 1]), "repeated"),
    (dict(image_sha="a" * 64), "unknown image"),
    (dict(image_sha="not-a-sha"), "sha256"),
    (dict(image_sha=None), "image_sha is required"),
    (dict(parent_id=12345), "no correction with id 12345"),
    (dict(generation_id=777), "no generation with id 777"),
    (dict(parent_id=True), "positive integer"),
])
def test_bad_corrections_raise_value_error_and_write_nothing(store, image, db_path, overrides, message):
    kwargs = edit(image_sha=image)
    kwargs.update(overrides)
    with pytest.raises(ValueError, match=message):
        store.save_correction(**kwargs)
    assert count_rows(db_path) == 0


# ---- append-only history ----------------------------------------------------------------------------


def test_corrections_cannot_be_updated_deleted_or_replaced(store: AnnotationStore, image: str, db_path: Path):
    first = store.save_correction(**edit(image_sha=image, client_token="tok"))
    store.save_correction(**edit(parent_id=first))
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        before = conn.execute("SELECT * FROM corrections ORDER BY id").fetchall()
        attempts = [
            ("UPDATE corrections SET caption = 'tampered' WHERE id = ?", [first]),
            ("DELETE FROM corrections WHERE id = ?", [first]),
            ("DELETE FROM corrections", []),
            ("INSERT OR REPLACE INTO corrections (id, image_sha, annotator, status, caption, timed_caption, "
             "traces, words, boxes, non_visual, change_summary, created_at) "
             "VALUES (?, ?, 'x', 'draft', '', '[]', '[]', '[]', '[]', '[]', '{}', 'now')", [first, image]),
            ("INSERT OR REPLACE INTO corrections (image_sha, annotator, status, caption, timed_caption, traces, "
             "words, boxes, non_visual, change_summary, created_at, client_token) "
             "VALUES (?, 'x', 'draft', '', '[]', '[]', '[]', '[]', '[]', '{}', 'now', 'tok')", [image]),
            # a second successor of the same row would fork the chain
            ("INSERT INTO corrections (image_sha, parent_id, root_id, annotator, status, caption, timed_caption, "
             "traces, words, boxes, non_visual, change_summary, created_at) "
             "VALUES (?, ?, ?, 'x', 'draft', '', '[]', '[]', '[]', '[]', '[]', '{}', 'now')", [image, first, first]),
        ]
        for sql, params in attempts:
            with pytest.raises(sqlite3.IntegrityError, match="append-only"):
                conn.execute(sql, params)
            conn.rollback()
        assert conn.execute("SELECT * FROM corrections ORDER BY id").fetchall() == before
    # Through sqlite-utils too, on the store's own connection.
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        store._db()["corrections"].update(first, {"status": "accepted"})
    assert store.get_correction(first)["status"] == "draft"


def test_history_head_and_review(store: AnnotationStore, image: str):
    first = store.save_correction(**edit(image_sha=image, status="draft"))
    with pytest.raises(ValueError, match="draft"):
        store.review(first, "rev", accept=True)
    second = store.save_correction(**edit(parent_id=first, annotator="bob", status="submitted"))
    third = store.review(second, " carol ", accept=False, comment="left is wrong")
    fourth = store.save_correction(**edit(parent_id=third, status="submitted", caption="fixed"))
    fifth = store.review(fourth, "carol", accept=True)
    other = store.save_correction(**edit(image_sha=image))  # an unrelated chain

    chain = [first, second, third, fourth, fifth]
    for cid in chain:
        assert [r["id"] for r in store.history(cid)] == chain
        assert store.head(cid)["id"] == fifth
    assert store.head(other)["id"] == other and [r["id"] for r in store.history(other)] == [other]
    rows = store.history(fifth)
    assert [r["status"] for r in rows] == ["draft", "submitted", "rejected", "submitted", "accepted"]
    assert [r["is_head"] for r in rows] == [False] * 4 + [True]
    assert {r["chain_id"] for r in rows} == {first}
    rejected = rows[2]
    assert (rejected["annotator"], rejected["reviewer"], rejected["comment"]) == ("bob", "carol", "left is wrong")
    assert rejected["words"] == rows[1]["words"] and rejected["change_summary"]["status"] == ["submitted", "rejected"]
    assert rejected["change_summary"]["review"] == {"reviewer": "carol", "accepted": False}
    with pytest.raises(ValueError, match="no correction with id 999"):
        store.history(999)
    with pytest.raises(ValueError, match="accept must be True or False"):
        store.review(fifth, "carol", accept="yes")


def test_stale_parent_is_refused(store: AnnotationStore, image: str, db_path: Path):
    first = store.save_correction(**edit(image_sha=image, status="submitted"))
    second = store.save_correction(**edit(parent_id=first, annotator="bob"))
    with pytest.raises(ValueError, match=f"superseded.*head of its chain is {second}"):
        store.save_correction(**edit(parent_id=first, annotator="carol"))
    with pytest.raises(ValueError, match="superseded"):
        store.review(first, "rev", accept=True)
    with pytest.raises(ValueError, match="an edit stays on its parent's image"):
        store.save_correction(**edit(parent_id=second, image_sha=store.add_image(b"other", 2, 2)))
    assert count_rows(db_path) == 2


def test_client_token_makes_retries_idempotent(store: AnnotationStore, image: str, db_path: Path):
    first = store.save_correction(**edit(image_sha=image, client_token="req-1"))
    assert store.save_correction(**edit(image_sha=image, client_token="req-1")) == first
    child = store.save_correction(**edit(parent_id=first, client_token="req-2"))
    # A retry of req-2 after the chain moved on still answers the id it got, not "superseded".
    store.save_correction(**edit(parent_id=child, status="submitted"))
    assert store.save_correction(**edit(parent_id=first, client_token="req-2")) == child
    reviewed = store.head(first)["id"]
    review = store.review(reviewed, "rev", accept=True, client_token="rev-1")
    assert store.review(reviewed, "rev", accept=True, client_token="rev-1") == review  # not "superseded"
    assert count_rows(db_path) == 4
    with pytest.raises(ValueError, match="already used by correction"):
        store.save_correction(**edit(image_sha=image, annotator="mallory", client_token="req-1"))
    # The same token carrying another decision is another request: refused, never answered with the first id.
    with pytest.raises(ValueError, match="different status"):
        store.review(reviewed, "rev", accept=False, client_token="rev-1")
    with pytest.raises(ValueError, match="different status"):
        store.save_correction(**edit(image_sha=image, status="submitted", client_token="req-1"))
    assert count_rows(db_path) == 4 and store.head(first)["status"] == "accepted"


def test_integers_sqlite_cannot_hold_are_bad_input(store: AnnotationStore, image: str, db_path: Path):
    # 2**63 does not fit SQLite's 64-bit INTEGER: sqlite3 would raise OverflowError, which is neither of the two
    # errors callers are promised (ValueError for bad input, StoreError for the file).
    huge = 2**63
    for call in (lambda: store.get_correction(huge), lambda: store.list_corrections(offset=huge),
                 lambda: store.save_correction(**edit(generation_id=huge)),
                 lambda: store.add_image(b"another image", huge, 10)):
        with pytest.raises(ValueError, match="integer"):
            call()
    assert count_rows(db_path) == 0 and count_rows(db_path, "images") == 1
    assert store.get_correction(huge - 1) is None  # the largest id SQLite holds is still a valid question


def test_list_corrections_filters(store: AnnotationStore, image: str):
    other_image = store.add_image(b"second image", 10, 10)
    a = store.save_correction(**edit(image_sha=image, caption="100% red_circle", status="submitted"))
    a2 = store.save_correction(**edit(parent_id=a, caption="100% red_circle, fixed", status="submitted"))
    b = store.save_correction(**edit(image_sha=other_image, annotator="bob", caption="a blue star"))
    ids = lambda rows: [r["id"] for r in rows]  # noqa: E731
    assert ids(store.list_corrections()) == [b, a2]
    assert ids(store.list_corrections(heads_only=False)) == [b, a2, a]
    assert ids(store.list_corrections(status="draft")) == [b]
    assert ids(store.list_corrections(status=["draft", "submitted"], limit=1, offset=1)) == [a2]
    assert ids(store.list_corrections(annotator="bob")) == [b]
    assert ids(store.list_corrections(image_sha=image, heads_only=False)) == [a2, a]
    assert ids(store.list_corrections(search="RED_CIRCLE")) == [a2]
    assert ids(store.list_corrections(search="0% r")) == [a2]
    assert ids(store.list_corrections(search="d_c")) == [a2]  # "_" is literal, not a wildcard
    assert ids(store.list_corrections(search="dxc")) == []
    # a region correction's text is in its words only; case folds beyond ASCII (SQLite's LIKE folds A-Z only)
    c = store.save_correction(**edit(image_sha=other_image, annotator="cy", caption="",
                                     words=["Äpfel rot", "blue  square"], boxes=[[0, 0, 5, 5], [5, 5, 9, 9]]))
    assert ids(store.list_corrections(search="äPFEL")) == [c]
    assert ids(store.list_corrections(search="rot blue square")) == [c]  # spaces collapsed, words joined
    assert ids(store.list_corrections(search="RED_circle, FIXED")) == [a2]
    assert ids(store.list_corrections(search="fixed a")) == []  # caption then words: not one text
    with pytest.raises(ValueError, match="status must be one of"):
        store.list_corrections(status="done")
    with pytest.raises(ValueError, match="limit"):
        store.list_corrections(limit=0)


def test_training_examples_are_submitted_or_accepted_heads(store: AnnotationStore, image: str):
    accepted = store.review(store.save_correction(**edit(image_sha=image, status="submitted")), "r", True)
    store.review(store.save_correction(**edit(image_sha=image, status="submitted")), "r", False)  # rejected
    store.save_correction(**edit(image_sha=image, status="draft"))  # never submitted
    reopened = store.save_correction(**edit(image_sha=image, status="submitted"))
    store.save_correction(**edit(parent_id=reopened, status="draft"))  # being edited again: not ready
    submitted = store.save_correction(**edit(image_sha=image, status="submitted", caption="pending"))

    examples = store.training_examples()
    assert [e["id"] for e in examples] == [accepted, submitted]
    assert [e["id"] for e in store.training_examples(statuses=("accepted",))] == [accepted]
    assert [e["id"] for e in store.training_examples(statuses="rejected")] == [accepted + 2]
    for example in examples:
        assert Path(example["image_path"]).read_bytes() == IMAGE
        assert (example["image_width"], example["image_height"]) == (64, 48)
        assert example["words"] == WORDS and len(example["boxes"]) == len(WORDS)
    with pytest.raises(ValueError, match="statuses must be one of"):
        store.training_examples(statuses=("good",))


def test_finetune_runs(store: AnnotationStore):
    run = store.start_finetune_run("lora-1", "ckpt/base", num_corrections=12, params={"lr": 1e-4, "r": 8})
    store.update_finetune_run(run, metrics={"step": 10, "loss": 2.5})
    store.update_finetune_run(run, metrics={"step": 20, "loss": 1.5}, adapter_path="runs/lora-1/step20")
    row = store.get_finetune_run(run)
    assert (row["status"], row["metrics"], row["finished_at"]) == ("running", {"step": 20, "loss": 1.5}, None)
    store.finish_finetune_run(run, metrics={"lbm": 0.2}, adapter_path="runs/lora-1/final")
    row = store.get_finetune_run(run)
    assert row["status"] == "finished" and row["finished_at"] is not None
    assert row["metrics"] == {"step": 20, "loss": 1.5, "lbm": 0.2} and row["adapter_path"] == "runs/lora-1/final"
    assert row["params"] == {"lr": 1e-4, "r": 8} and row["num_corrections"] == 12
    with pytest.raises(ValueError, match="already ended"):
        store.finish_finetune_run(run, status="failed")
    with pytest.raises(ValueError, match="no finetune run"):
        store.update_finetune_run(run + 1)
    with pytest.raises(ValueError, match="status must be one of"):
        store.finish_finetune_run(store.start_finetune_run("x", "y", num_corrections=0), status="done")
    assert [r["id"] for r in store.list_finetune_runs()] == [run + 1, run]


def test_closed_store_raises_store_error(db_path: Path):
    s = AnnotationStore(db_path)
    s.close()
    with pytest.raises(StoreError, match="closed"):
        s.list_corrections()
    s.close()  # idempotent


# ---- imports ---------------------------------------------------------------------------------------


def test_store_module_does_not_import_torch():
    proc = run_child(LOAD_STORE + 'assert "torch" not in sys.modules, "store imported torch"\nprint("ok")')
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
