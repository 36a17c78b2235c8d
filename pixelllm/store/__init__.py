"""Annotation store: images, model outputs shown to users, annotators' corrections, fine-tuning runs.

One SQLite file (default ``data/annotations.db``), used through sqlite-utils on connections we open ourselves
(DESIGN.md §5). The Gradio app calls one ``AnnotationStore`` from many threads; the training package reads
``training_examples()``. This package never imports torch.

Why it is built this way:

- **One connection per thread** (``threading.local``), each ``sqlite3.connect(..., check_same_thread=False,
  isolation_level=None)`` with ``busy_timeout``, ``foreign_keys=ON``, WAL and ``synchronous=FULL``. WAL lets
  readers run while one writer writes. WAL + NORMAL already survives a killed process (a committed
  transaction is in the WAL file, i.e. in the OS page cache); FULL also fsyncs the WAL at every commit so a
  power cut or VM crash cannot lose an annotator's minutes of work. Writes come at human speed, so the fsync
  per commit costs nothing anyone notices.
- **Every write is ``BEGIN IMMEDIATE … COMMIT``** (``_write``), rolled back on any error, so a caller never
  sees a partial row, and a read-then-write (is the parent still the head?) cannot interleave with another
  writer. A deferred ``BEGIN`` would fail with SQLITE_BUSY instead of waiting when it upgrades to a write.
- **corrections is append-only**: an edit or a review is a new row whose ``parent_id`` is the row it
  supersedes. Triggers abort UPDATE, DELETE and replacing INSERTs; a UNIQUE index on ``parent_id`` means a row
  is superseded at most once, so two annotators editing the same head cannot fork the chain (the second gets
  ``ValueError("... superseded ...")``). ``client_token`` makes retries of the same request idempotent.
- **Schema changes are migrations** (``MIGRATIONS``), applied in order inside one write transaction together
  with the ``schema_version`` bump, so a failed migration leaves the file at its old version.
- Callers only ever see ``ValueError`` (bad input) or ``StoreError`` (the file or the disk: not a database,
  corrupt, read-only, full, locked too long) — never a raw ``sqlite3`` error. Rows come back as plain dicts
  with JSON columns decoded (Gradio- and JSON-friendly).

Modules: ``annotation_store`` (the store's tables and their rules), ``database`` (the SQLite file under it:
connections, transactions, migrations, atomic files and error translation), ``schema`` (the migrations),
``fields`` (input checks and ``change_summary``).
"""

from pixelllm.store.annotation_store import (
    DEFAULT_PATH,
    EDIT_STATUSES,
    MAX_LIST_LIMIT,
    RUN_STATUSES,
    STATUSES,
    TASKS,
    AnnotationStore,
)
from pixelllm.store.database import StoreError
from pixelllm.store.fields import BOX_MOVE_TOLERANCE_PX, change_summary
from pixelllm.store.schema import MIGRATIONS, Migration

__all__ = ["AnnotationStore", "StoreError", "Migration", "MIGRATIONS", "change_summary", "DEFAULT_PATH", "TASKS",
           "STATUSES", "EDIT_STATUSES", "RUN_STATUSES", "MAX_LIST_LIMIT", "BOX_MOVE_TOLERANCE_PX"]
