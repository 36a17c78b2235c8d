"""Tests for pixelllm.store schema migrations: an older file is migrated on open, a failing step leaves the
previous version, a file from newer code is refused.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest

from pixelllm import store as store_module
from pixelllm.store import AnnotationStore, Migration, StoreError
from tests.store.conftest import IMAGE, WORDS, count_rows, edit

# ---- migrations -------------------------------------------------------------------------------------

V1 = store_module.MIGRATIONS[:1]
V2 = Migration(2, "test-only: corrections.priority", lambda db: db["corrections"].add_column("priority", int))


def test_v1_file_is_migrated_when_opened_with_a_longer_list(db_path: Path):
    with AnnotationStore(db_path, migrations=V1) as s:
        assert s.schema_version() == 1
        sha = s.add_image(IMAGE, 64, 48)
        first = s.save_correction(**edit(image_sha=sha, status="submitted"))
    with AnnotationStore(db_path, migrations=[*V1, V2]) as s:
        assert s.schema_version() == 2
        row = s.get_correction(first)
        assert row["priority"] is None and row["words"] == WORDS  # old rows survive the migration
        second = s.save_correction(**edit(parent_id=first))
        assert [r["id"] for r in s.history(second)] == [first, second]
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        assert [v for (v,) in conn.execute("SELECT version FROM schema_version ORDER BY version")] == [1, 2]
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            conn.execute("UPDATE corrections SET priority = 1")
    with AnnotationStore(db_path, migrations=[*V1, V2]) as s:  # reopening applies nothing twice
        assert s.schema_version() == 2


def test_failed_migration_leaves_the_previous_version(db_path: Path):
    with AnnotationStore(db_path, migrations=V1) as s:
        s.add_image(IMAGE, 64, 48)
    broken = Migration(2, "broken", "CREATE TABLE tags (name TEXT); INSERT INTO no_such_table VALUES (1);")
    with pytest.raises(StoreError, match="schema migration 2 .*stays at version 1"):
        AnnotationStore(db_path, migrations=[*V1, broken])
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        assert conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'tags'").fetchone()[0] == 0
    assert count_rows(db_path, "images") == 1


def test_migration_raising_a_python_error_is_a_store_error_and_leaves_the_previous_version(db_path: Path):
    """A step's own code (or sqlite-utils, e.g. transform()'s TransformError) can fail with a non-sqlite3 error: it
    is reported like a SQL failure, not as a raw traceback (app.open_store only turns StoreError into a message)."""
    with AnnotationStore(db_path, migrations=V1) as s:
        s.add_image(IMAGE, 64, 48)

    def step(db):
        db["corrections"].add_column("priority", int)
        raise RuntimeError("the step's own bug")

    with pytest.raises(StoreError, match="schema migration 2 .*stays at version 1.*the step's own bug"):
        AnnotationStore(db_path, migrations=[*V1, Migration(2, "broken in Python", step)])
    with AnnotationStore(db_path, migrations=V1) as s:
        assert s.schema_version() == 1 and "priority" not in s._db()["corrections"].columns_dict


def test_file_from_newer_code_is_refused(db_path: Path):
    AnnotationStore(db_path, migrations=[*V1, V2]).close()
    with pytest.raises(StoreError, match="schema version 2 but this code knows only up to 1"):
        AnnotationStore(db_path, migrations=V1)
    with pytest.raises(ValueError, match="numbered 1..N"):
        AnnotationStore(db_path, migrations=[V2])
