"""Nothing is ever written outside the export folder (names that leave it, a symlinked images folder, a tampered
image path), and what the CLI refuses or skips: a `--db` that is no store, an `--out` in the store's images, a
selection that is empty or wholly skipped (an earlier export stays; no folder left behind)."""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from pixelllm.store import AnnotationStore, StoreError
from tests.export.conftest import H, W, add_caption, png_bytes
from training import export


@pytest.mark.parametrize("name", ["../x.png", "..", "/etc/passwd", "a/../../b", "images/../../x", "", "a\x00b",
                                  "C:\\evil", "..\\evil"])
def test_safe_join_refuses_names_that_leave_the_folder(tmp_path, name):
    with pytest.raises(ValueError):
        export.safe_join(tmp_path, name)


@pytest.mark.parametrize("name", ["", ".", "..", "../a", "a/b", "/abs", ".hidden", "a" * 200, "x\x00"])
def test_safe_id_refuses_path_like_ids(name):
    with pytest.raises(ValueError):
        export.safe_id(name)


def test_safe_join_accepts_plain_names(tmp_path):
    assert export.safe_join(tmp_path, "images", "abc.png") == (tmp_path / "images" / "abc.png").resolve()
    assert export.safe_id("shapes_000001.v2") == "shapes_000001.v2"


def test_a_symlinked_images_folder_pointing_outside_is_refused(store, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "images").symlink_to(outside, target_is_directory=True)
    add_caption(store, 13, ["a"], [[0, 0, 1, 1]])
    with pytest.raises(ValueError, match="outside the export folder"):
        export.export_corrections(store, out)
    assert list(outside.iterdir()) == []


def test_a_tampered_image_path_in_the_store_is_skipped(store, tmp_path, capsys):
    (tmp_path / "secret.png").write_bytes(png_bytes(99))
    cid = add_caption(store, 14, ["a"], [[0, 0, 1, 1]])
    sha = store.get_correction(cid)["image_sha"]
    with contextlib.closing(sqlite3.connect(store.path)) as conn, conn:
        conn.execute("UPDATE images SET path = '../../secret.png' WHERE sha256 = ?", [sha])
    summary = export.export_corrections(store, tmp_path / "out")
    assert summary["skipped"]["unsafe_image_path"] == 1 and summary["ln_records"] == 0
    assert not (tmp_path / "out" / "images").exists()
    assert export.main(["--db", str(store.path), "--out", str(tmp_path / "out")]) == 1  # says why nothing came
    assert "every selected correction was skipped (1 unsafe image path)" in capsys.readouterr().err


def test_an_export_where_every_correction_is_skipped_leaves_no_folder_it_made(store, tmp_path, capsys):
    """Every selected correction skipped (a tampered image path, an image file gone): nothing was written and the
    CLI said "... was not touched", but the new export folder (and its parents) it had made stayed behind, empty.
    A folder that was there before stays."""
    unsafe, missing = (add_caption(store, seed, ["a"], [[0, 0, 1, 1]]) for seed in (19, 20))
    with contextlib.closing(sqlite3.connect(store.path)) as conn, conn:
        conn.execute("UPDATE images SET path = '../../secret.png' WHERE sha256 = ?",
                     [store.get_correction(unsafe)["image_sha"]])
    [gone] = [row["image_path"] for row in store.training_examples(["submitted"]) if row["id"] == missing]
    Path(gone).unlink()
    new = tmp_path / "exports" / "new"
    summary = export.export_corrections(store, new)
    assert summary["ln_file"] is None
    assert summary["skipped"] == {"no_words": 0, "missing_image": 1, "unsafe_image_path": 1}
    assert not (tmp_path / "exports").exists()
    assert export.main(["--db", str(store.path), "--out", str(new)]) == 1
    assert "every selected correction was skipped (1 missing image, 1 unsafe image path)" in capsys.readouterr().err
    assert not (tmp_path / "exports").exists()
    existing = tmp_path / "existing"
    existing.mkdir()
    assert export.export_corrections(store, existing)["ln_file"] is None
    assert existing.is_dir() and not any(existing.iterdir())


def test_an_image_stored_after_the_skip_check_does_not_get_an_unlocked_export(store, tmp_path, monkeypatch):
    """The decision that every row is skipped (so no new folder is made, and no lock taken) must be the one the
    export acts on: asked again per row, an image stored in between made the unlocked export write its files."""
    add_caption(store, 21, ["a"], [[0, 0, 1, 1]])
    asked = []

    def missing_only_the_first_time(row, store_root):  # the image file appears right after the first look
        asked.append(row["id"])
        return "missing_image" if len(asked) == 1 else None

    monkeypatch.setattr(export, "skip_reason", missing_only_the_first_time)
    new = tmp_path / "exports" / "new"
    summary = export.export_corrections(store, new)
    assert summary["ln_file"] is None and summary["skipped"]["missing_image"] == 1
    assert not (tmp_path / "exports").exists()


def test_a_db_that_is_no_store_is_refused_and_left_as_it_was(tmp_path, capsys):
    """`--db` an empty file (a `touch`ed name, a failed copy) or a SQLite database without tables: export only
    reads, yet it made the file a new empty store (73 KB of tables) and said "nothing exported". One line now,
    exit 2, the file byte for byte as it was and nothing beside it; a missing file is still "no annotation store
    at …" and is not made."""
    empty, blank = tmp_path / "zero.db", tmp_path / "blank.db"
    empty.write_bytes(b"")
    with contextlib.closing(sqlite3.connect(blank)) as conn:
        conn.execute("PRAGMA user_version = 7")  # written into the file's header: a SQLite file with no table
    for db, what in ((empty, "an empty file"), (blank, "a SQLite database without tables")):
        before = db.read_bytes()
        assert export.main(["--db", str(db), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err == f"export failed: {db} is not an annotation store ({what}); it was left as it was\n"
        assert db.read_bytes() == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.db", "zero.db"]  # no -wal, no out folder
    with pytest.raises(StoreError, match="no annotation store at"):
        AnnotationStore(tmp_path / "missing.db", create=False)
    assert export.main(["--db", str(tmp_path / "missing.db"), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"no annotation store at {tmp_path / 'missing.db'}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blank.db", "zero.db"]


def test_an_empty_db_beside_a_wal_file_is_refused_and_the_wal_left_as_it_was(tmp_path, capsys):
    """A failed copy of a live store: `annotations.db` empty, its `-wal` (the commits not yet in the main file) and
    `-shm` copied whole. SQLite deletes the `-wal` of an empty database when it opens it, so the refusal that said
    "it was left as it was" had deleted the file beside it. An empty file is refused before SQLite opens it."""
    live = AnnotationStore(tmp_path / "live" / "annotations.db")
    try:
        live.add_image(png_bytes(1), W, H)  # committed to the WAL, not yet checkpointed into the main file
        copy = tmp_path / "copy"
        copy.mkdir()
        for suffix in ("-wal", "-shm"):
            shutil.copyfile(f"{live.path}{suffix}", copy / f"annotations.db{suffix}")
    finally:
        live.close()
    (copy / "annotations.db").write_bytes(b"")
    before = {p.name: p.read_bytes() for p in copy.iterdir()}
    assert before["annotations.db-wal"]
    assert export.main(["--db", str(copy / "annotations.db"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == f"export failed: {copy / 'annotations.db'} is not an annotation store (an empty file); it was left " \
                  "as it was\n"
    assert {p.name: p.read_bytes() for p in copy.iterdir()} == before


def test_an_out_in_the_stores_images_folder_is_refused_before_anything_is_written(store, tmp_path, capsys):
    """`--out <store folder>/images` wrote the LN file, the manifest, the COCO file and an images/ folder among the
    store's images (only the store's folder itself was refused). That folder, or one inside it, is refused in one
    line and nothing is made there."""
    add_caption(store, 23, ["a"], [[0, 0, 1, 1]])
    images = store.root / "images"
    before = sorted(p.name for p in images.iterdir())
    for out, said in ((images, "is inside the annotation store's images folder"),
                      (images / "export", "is inside the annotation store's images folder"),
                      (store.root, "is the annotation store's own folder")):
        assert export.main(["--db", str(store.path), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"export failed: --out {out} {said}") and len(err.splitlines()) == 1, err
        assert sorted(p.name for p in images.iterdir()) == before
    assert export.main(["--db", str(store.path), "--out", str(tmp_path / "elsewhere")]) == 0


def test_cli_writes_the_export_and_prints_the_summary(store, tmp_path, capsys):
    add_caption(store, 15, ["a", "b"], [[0, 0, 1, 1], [2, 2, 3, 3]])
    out = tmp_path / "cli"
    assert export.main(["--db", str(store.path), "--out", str(out), "--statuses", "submitted"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["ln_records"] == 1 and (out / export.LN_FILE).is_file()
    assert export.main(["--db", str(tmp_path / "missing.db"), "--out", str(out)]) == 2
    capsys.readouterr()
    stranger = tmp_path / "other.db"  # a SQLite file, but not an annotation store: a message, no traceback
    with contextlib.closing(sqlite3.connect(stranger)) as conn, conn:
        conn.execute("CREATE TABLE t (x)")
    assert export.main(["--db", str(stranger), "--out", str(out)]) == 2
    assert "not an annotation store" in capsys.readouterr().err


def test_an_empty_selection_writes_nothing_and_an_earlier_export_stays(store, tmp_path, capsys):
    """An export selecting nothing (another --statuses, a new or emptied store) used to rewrite the folder as an
    empty export: its LN file emptied and its images removed, the only copy if the store it came from is gone."""
    add_caption(store, 16, ["kept"], [[0, 0, 1, 1]])
    out = tmp_path / "out"
    assert export.export_corrections(store, out)["ln_records"] == 1
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert len(before) == 3  # the LN file, its image and the manifest
    summary = export.export_corrections(store, out, ["accepted"])  # nothing accepted
    assert summary["ln_records"] == 0 and summary["ln_file"] is None
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert export.main(["--db", str(store.path), "--out", str(out), "--statuses", "rejected"]) == 1
    assert "nothing exported: no rejected corrections" in capsys.readouterr().err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert not export.export_corrections(store, tmp_path / "new", ["accepted"])["ln_records"]
    assert not (tmp_path / "new").exists()  # not even created
