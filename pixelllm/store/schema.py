"""The annotation store's schema: one ordered list of migrations (see ``pixelllm.store``).

Append new steps to ``MIGRATIONS``; never edit one that has shipped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import sqlite_utils

_SCHEMA_V1 = """
CREATE TABLE images (
    sha256 TEXT PRIMARY KEY NOT NULL CHECK (length(sha256) = 64 AND sha256 NOT GLOB '*[^0-9a-f]*'),
    width INTEGER NOT NULL CHECK (width > 0),
    height INTEGER NOT NULL CHECK (height > 0),
    num_bytes INTEGER NOT NULL CHECK (num_bytes > 0),
    path TEXT NOT NULL,                          -- relative to the folder holding the database file
    created_at TEXT NOT NULL
);

CREATE TABLE generations (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    image_sha TEXT NOT NULL REFERENCES images(sha256),
    task TEXT NOT NULL CHECK (task IN ('caption', 'refer', 'dense')),
    prompts TEXT NOT NULL CHECK (json_valid(prompts)),
    words TEXT NOT NULL CHECK (json_valid(words) AND json_type(words) = 'array'),
    boxes TEXT NOT NULL CHECK (json_valid(boxes) AND json_type(boxes) = 'array'),   -- XYXY, image pixels
    extra TEXT NOT NULL CHECK (json_valid(extra)),
    model_id TEXT NOT NULL,
    model_version TEXT NOT NULL,
    adapter TEXT,
    session TEXT,
    user TEXT,
    created_at TEXT NOT NULL
);
CREATE INDEX generations_image ON generations(image_sha);

CREATE TABLE corrections (
    id INTEGER PRIMARY KEY AUTOINCREMENT,        -- AUTOINCREMENT: an id is never reused
    generation_id INTEGER REFERENCES generations(id),
    image_sha TEXT NOT NULL REFERENCES images(sha256),
    parent_id INTEGER REFERENCES corrections(id),    -- the row this one supersedes
    root_id INTEGER REFERENCES corrections(id),      -- first row of the chain; NULL on that first row
    annotator TEXT NOT NULL CHECK (length(trim(annotator)) > 0),
    status TEXT NOT NULL CHECK (status IN ('draft', 'submitted', 'accepted', 'rejected')),
    caption TEXT NOT NULL,
    timed_caption TEXT NOT NULL CHECK (json_valid(timed_caption)),   -- [{utterance, start_time, end_time}]
    traces TEXT NOT NULL CHECK (json_valid(traces)),                 -- [[{x, y, t}]], LN-normalised
    words TEXT NOT NULL CHECK (json_valid(words)),
    boxes TEXT NOT NULL CHECK (json_valid(boxes)),                   -- XYXY, image pixels
    non_visual TEXT NOT NULL CHECK (json_valid(non_visual)),         -- word indices
    comment TEXT,
    reviewer TEXT,
    change_summary TEXT NOT NULL CHECK (json_valid(change_summary)),
    created_at TEXT NOT NULL,
    client_token TEXT UNIQUE,
    CHECK ((parent_id IS NULL) = (root_id IS NULL))
);
-- A row is superseded at most once, so a chain never forks (NULLs are distinct: many roots are fine).
CREATE UNIQUE INDEX corrections_one_successor ON corrections(parent_id);
CREATE INDEX corrections_chain ON corrections(coalesce(root_id, id));
CREATE INDEX corrections_image ON corrections(image_sha);
CREATE INDEX corrections_status ON corrections(status);
CREATE INDEX corrections_annotator ON corrections(annotator);
CREATE INDEX corrections_generation ON corrections(generation_id);

CREATE TRIGGER corrections_no_update BEFORE UPDATE ON corrections
BEGIN
    SELECT RAISE(ABORT, 'corrections is append-only: rows are never updated, append a new row');
END;
CREATE TRIGGER corrections_no_delete BEFORE DELETE ON corrections
BEGIN
    SELECT RAISE(ABORT, 'corrections is append-only: rows are never deleted');
END;
-- INSERT OR REPLACE deletes the conflicting row without firing DELETE triggers (unless recursive_triggers).
CREATE TRIGGER corrections_no_replace BEFORE INSERT ON corrections
WHEN EXISTS (SELECT 1 FROM corrections
             WHERE id = NEW.id OR client_token = NEW.client_token OR parent_id = NEW.parent_id)
BEGIN
    SELECT RAISE(ABORT, 'corrections is append-only: this row conflicts with an existing row');
END;
CREATE TRIGGER corrections_chain_consistent BEFORE INSERT ON corrections
WHEN NEW.parent_id IS NOT NULL AND NOT EXISTS (
    SELECT 1 FROM corrections AS p
    WHERE p.id = NEW.parent_id AND coalesce(p.root_id, p.id) = NEW.root_id AND p.image_sha = NEW.image_sha)
BEGIN
    SELECT RAISE(ABORT, 'corrections: root_id and image_sha must match the parent row');
END;

CREATE TABLE finetune_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    base_checkpoint TEXT NOT NULL,
    adapter_path TEXT,
    params TEXT NOT NULL CHECK (json_valid(params)),
    num_corrections INTEGER NOT NULL CHECK (num_corrections >= 0),
    status TEXT NOT NULL CHECK (status IN ('running', 'finished', 'failed')),
    metrics TEXT NOT NULL CHECK (json_valid(metrics)),
    started_at TEXT NOT NULL,
    finished_at TEXT
);
"""


@dataclasses.dataclass(frozen=True)
class Migration:
    """One schema step. ``apply`` is SQL (several statements are fine) or a function of the
    ``sqlite_utils.Database``; it runs in the same ``BEGIN IMMEDIATE`` transaction as the version bump.

    Append new steps to ``MIGRATIONS``; never edit one that has shipped. A step that rebuilds
    ``corrections`` (e.g. ``table.transform()``) must recreate its append-only triggers.
    """

    version: int
    description: str
    apply: str | Callable[[sqlite_utils.Database], None]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "images, generations, append-only corrections, finetune_runs", _SCHEMA_V1),
)
