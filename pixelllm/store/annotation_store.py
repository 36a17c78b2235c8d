"""``AnnotationStore``: images, generations, corrections and fine-tuning runs over one SQLite file (the file itself —
connections, transactions, errors, migrations — is ``pixelllm.store.database``; the design is in
``pixelllm/store/__init__.py``)."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlite_utils

from pixelllm.store.database import StoreDatabase, _api
from pixelllm.store.fields import (
    _boxes,
    _choice,
    _choices,
    _content,
    _count,
    _decode,
    _dumps,
    _name,
    _now,
    _opt_row_id,
    _opt_text,
    _row_id,
    _sha,
    _text,
    _words,
    change_summary,
)
from pixelllm.store.schema import MIGRATIONS, Migration

DEFAULT_PATH = Path("data/annotations.db")
TASKS = ("caption", "refer", "dense")
STATUSES = ("draft", "submitted", "accepted", "rejected")
EDIT_STATUSES = ("draft", "submitted")  # accepted/rejected rows are only written by review()
RUN_STATUSES = ("running", "finished", "failed")
MAX_LIST_LIMIT = 10_000

_CONTENT_FIELDS = ("caption", "words", "boxes", "timed_caption", "traces", "non_visual")
_CORRECTION_JSON = ("timed_caption", "traces", "words", "boxes", "non_visual", "change_summary")
_GENERATION_JSON = ("prompts", "words", "boxes", "extra")
_RUN_JSON = ("params", "metrics")


class AnnotationStore(StoreDatabase):
    """Thread-safe access to one annotation database. Create one per process and share it.

    Args:
        path: the SQLite file (parent folders are created); images go to ``<its folder>/images/``.
        timeout: seconds a writer waits for another writer before ``StoreError``.
        synchronous: ``"FULL"`` (default: fsync per commit, survives power loss) or ``"NORMAL"`` (survives
            a killed process, may lose the last commits on power loss; for bulk imports).
        migrations: the ordered schema steps; only tests pass anything but ``MIGRATIONS``.
        create: False for a reader (``training.export``): a missing file, an empty one or a SQLite database
            without tables is refused (``StoreError``) and left as it was, not made into a new store.
    """

    def __init__(self, path: str | os.PathLike = DEFAULT_PATH, timeout: float = 30.0, *,
                 synchronous: str = "FULL", migrations: Sequence[Migration] = MIGRATIONS, create: bool = True):
        super().__init__(path, timeout, synchronous=synchronous, migrations=migrations, create=create)

    # ---- images ------------------------------------------------------------------------------------------

    @_api("add image")
    def add_image(self, data: bytes, width: int, height: int, ext: str = "png") -> str:
        """Store the encoded image bytes (deduplicated by sha256) and return the sha256 hex digest.

        The file goes to ``<db folder>/images/<sha>.<ext>``; ``width``/``height`` are the decoded size in
        pixels.
        """
        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
            raise ValueError("data must be the non-empty encoded image bytes")
        data = bytes(data)
        width, height = _count(width, "width", low=1), _count(height, "height", low=1)
        if not isinstance(ext, str) or not re.fullmatch(r"[A-Za-z0-9]{1,8}", ext):
            raise ValueError(f"ext must be a short alphanumeric file extension such as 'png', got {ext!r}")
        sha = hashlib.sha256(data).hexdigest()
        relpath = f"images/{sha}.{ext.lower()}"

        def known() -> dict | None:
            row = self._one("SELECT * FROM images WHERE sha256 = ?", [sha])
            if row is not None and (row["width"], row["height"]) != (width, height):
                raise ValueError(f"image {sha} is already stored as {row['width']}x{row['height']}, "
                                 f"not {width}x{height}")
            return row

        row = known()
        target = self.root / (row["path"] if row else relpath)
        if not (target.is_file() and target.stat().st_size == len(data)):
            self._write_file_atomically(target, data)  # the file first: a row never points at a missing file
        if row is None:
            with self._write() as db:
                if known() is None:  # another thread may have added it meanwhile
                    db["images"].insert({"sha256": sha, "width": width, "height": height,
                                         "num_bytes": len(data), "path": relpath, "created_at": _now()})
        return sha

    @_api("read image")
    def get_image(self, sha: str) -> dict[str, Any] | None:
        """The image row plus ``abs_path`` (absolute path of the stored file), or None."""
        row = self._one("SELECT * FROM images WHERE sha256 = ?", [_sha(sha)])
        if row is not None:
            row["abs_path"] = str(self.root / row["path"])
        return row

    # ---- generations -------------------------------------------------------------------------------------

    @_api("log generation")
    def log_generation(self, image_sha: str, task: str, words: Sequence[str],
                       boxes: Sequence[Sequence[float]], *, model_id: str, model_version: str,
                       prompts: Any = None, extra: dict | None = None, adapter: str | None = None,
                       session: str | None = None, user: str | None = None) -> int:
        """Record a model output shown to a user; returns its id.

        ``caption``: one box per word. ``dense``: ``words[i]`` is region i's caption, ``boxes[i]`` its box.
        ``refer``: ``words`` may be empty, ``boxes`` holds the predicted box(es). Boxes are XYXY image pixels.
        ``prompts`` (points, box, text…) and ``extra`` (scores, the caption string…) are any JSON.
        """
        image_sha, task = _sha(image_sha), _choice(task, "task", TASKS)
        words, boxes = _words(words), _boxes(boxes)
        if task != "refer" and len(words) != len(boxes):
            raise ValueError(f"a {task} generation needs one box per word/region: "
                             f"{len(boxes)} boxes for {len(words)} words")
        extra = {} if extra is None else extra
        if not isinstance(extra, dict):
            raise ValueError(f"extra must be a dict, got {type(extra).__name__}")
        row = {
            "image_sha": image_sha, "task": task,
            "prompts": _dumps({} if prompts is None else prompts, "prompts"),
            "words": _dumps(words, "words"), "boxes": _dumps(boxes, "boxes"), "extra": _dumps(extra, "extra"),
            "model_id": _text(model_id, "model_id"), "model_version": _text(model_version, "model_version"),
            "adapter": _opt_text(adapter, "adapter"), "session": _opt_text(session, "session"),
            "user": _opt_text(user, "user"), "created_at": _now(),
        }
        with self._write() as db:
            if self._one("SELECT 1 FROM images WHERE sha256 = ?", [image_sha]) is None:
                raise ValueError(f"unknown image {image_sha}: add_image() it first")
            return db["generations"].insert(row).last_pk

    @_api("read generation")
    def get_generation(self, generation_id: int) -> dict[str, Any] | None:
        row = self._one("SELECT * FROM generations WHERE id = ?", [_row_id(generation_id, "generation_id")])
        return _decode(row, _GENERATION_JSON)

    @_api("list generations")
    def list_generations(self, *, image_sha: str | None = None, task: str | None = None,
                         model_id: str | None = None, session: str | None = None, limit: int = 100,
                         offset: int = 0) -> list[dict[str, Any]]:
        """Generations, newest first, optionally filtered."""
        where, params = [], []
        if image_sha is not None:
            where.append("image_sha = ?")
            params.append(_sha(image_sha))
        if task is not None:
            where.append("task = ?")
            params.append(_choice(task, "task", TASKS))
        for column, value in (("model_id", model_id), ("session", session)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(_text(value, column))
        sql = "SELECT * FROM generations" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY id DESC LIMIT ? OFFSET ?"
        params += [_count(limit, "limit", low=1, high=MAX_LIST_LIMIT), _count(offset, "offset")]
        return [_decode(row, _GENERATION_JSON) for row in self._rows(sql, params)]

    # ---- corrections -------------------------------------------------------------------------------------

    _SELECT_CORRECTION = (
        "SELECT c.*, coalesce(c.root_id, c.id) AS chain_id, "
        "NOT EXISTS (SELECT 1 FROM corrections AS k WHERE k.parent_id = c.id) AS is_head "
        "FROM corrections AS c"
    )

    def _correction(self, correction_id: int) -> dict[str, Any] | None:
        row = self._one(f"{self._SELECT_CORRECTION} WHERE c.id = ?", [correction_id])
        return _decode(row, _CORRECTION_JSON)

    def _head_to_supersede(self, correction_id: int, name: str) -> dict[str, Any]:
        row = self._correction(correction_id)
        if row is None:
            raise ValueError(f"{name}: no correction with id {correction_id}")
        if not row["is_head"]:
            head = self._one("SELECT max(id) AS id FROM corrections WHERE coalesce(root_id, id) = ?",
                             [row["chain_id"]])["id"]
            raise ValueError(f"correction {correction_id} was already superseded (the current head of its "
                             f"chain is {head}): reload the latest version and apply your change to it")
        return row

    def _retry(self, client_token: str | None, **expected: Any) -> int | None:
        """The id saved earlier under this client_token (an idempotent retry), or None."""
        if client_token is None:
            return None
        row = self._one("SELECT * FROM corrections WHERE client_token = ?", [client_token])
        if row is None:
            return None
        for key, value in expected.items():
            if row[key] != value:
                raise ValueError(f"client_token {client_token!r} was already used by correction {row['id']} "
                                 f"with a different {key} ({row[key]!r} != {value!r})")
        return row["id"]

    def _append(self, db: sqlite_utils.Database, row: dict[str, Any]) -> int:
        for column in _CORRECTION_JSON:
            row[column] = _dumps(row[column], column)
        row["created_at"] = _now()
        return db["corrections"].insert(row).last_pk

    @_api("save correction")
    def save_correction(self, *, annotator: str, image_sha: str | None = None,
                        generation_id: int | None = None, parent_id: int | None = None,
                        status: str = "draft", caption: str = "", words: Sequence[str] = (),
                        boxes: Sequence[Sequence[float]] = (), timed_caption: Sequence[dict] = (),
                        traces: Sequence[Sequence[dict]] = (),
                        non_visual: Sequence[int] = (), comment: str | None = None,
                        client_token: str | None = None) -> int:
        """Append a correction and return its id.

        A first version names ``image_sha`` and/or ``generation_id`` (the model output being corrected);
        an edit names ``parent_id``, which must be the current head of its chain (else ``ValueError``
        "superseded") and passes on its image and generation. ``status`` is draft or submitted (accept and
        reject go through ``review``). ``boxes`` has one XYXY pixel box per word; ``timed_caption`` one entry
        per word (or none); ``traces`` is LN-normalised ``[[{x, y, t}]]``; ``non_visual`` lists word indices.
        Saving again with the same ``client_token`` returns the first id instead of adding a row.
        """
        annotator = _name(annotator, "annotator")
        if status not in EDIT_STATUSES:
            raise ValueError(f"status must be 'draft' or 'submitted', got {status!r} "
                             "(use review() to accept or reject)")
        content = _content(caption, words, boxes, timed_caption, traces, non_visual)
        comment = _opt_text(comment, "comment", allow_empty=True)
        client_token = _opt_text(client_token, "client_token")
        image_sha = None if image_sha is None else _sha(image_sha)
        generation_id = _opt_row_id(generation_id, "generation_id")
        parent_id = _opt_row_id(parent_id, "parent_id")

        with self._write() as db:
            previous = self._retry(client_token, annotator=annotator, parent_id=parent_id, status=status)
            if previous is not None:
                return previous
            parent = None
            if parent_id is not None:
                parent = self._head_to_supersede(parent_id, "parent_id")
                for key, value in (("image_sha", image_sha), ("generation_id", generation_id)):
                    if value is not None and value != parent[key]:
                        raise ValueError(f"{key} {value!r} differs from parent correction {parent_id}'s "
                                         f"{parent[key]!r}: an edit stays on its parent's image and "
                                         "generation")
                image_sha, generation_id = parent["image_sha"], parent["generation_id"]
            generation = None
            if generation_id is not None:
                generation = self.get_generation(generation_id)
                if generation is None:
                    raise ValueError(f"no generation with id {generation_id}")
                if image_sha is not None and image_sha != generation["image_sha"]:
                    raise ValueError(f"image_sha {image_sha} differs from generation {generation_id}'s image "
                                     f"{generation['image_sha']}")
                image_sha = generation["image_sha"]
            if image_sha is None:
                raise ValueError("image_sha is required (or pass parent_id or generation_id)")
            if self._one("SELECT 1 FROM images WHERE sha256 = ?", [image_sha]) is None:
                raise ValueError(f"unknown image {image_sha}: add_image() it first")

            new = {**content, "status": status}
            if parent is not None:
                summary = change_summary(parent, new, against="parent", against_id=parent["id"])
            elif generation is not None:
                baseline = {"words": generation["words"], "boxes": generation["boxes"],
                            "caption": generation["extra"].get("caption", " ".join(generation["words"]))}
                summary = change_summary(baseline, new, against="generation", against_id=generation_id)
            else:
                summary = change_summary(None, new)
            return self._append(db, {
                **new, "generation_id": generation_id, "image_sha": image_sha,
                "parent_id": parent_id, "root_id": parent["chain_id"] if parent else None,
                "annotator": annotator, "comment": comment, "reviewer": None,
                "change_summary": summary, "client_token": client_token,
            })

    @_api("review correction")
    def review(self, correction_id: int, reviewer: str, accept: bool, comment: str | None = None, *,
               client_token: str | None = None) -> int:
        """Append a copy of the head ``correction_id`` with status accepted/rejected; returns the new id.

        The correction must be the head of its chain and not a draft. ``annotator`` stays the content's
        author; ``reviewer`` and ``comment`` record the decision.
        """
        correction_id = _row_id(correction_id, "correction_id")
        reviewer = _name(reviewer, "reviewer")
        if not isinstance(accept, bool):
            raise ValueError(f"accept must be True or False, got {accept!r}")
        comment = _opt_text(comment, "comment", allow_empty=True)
        client_token = _opt_text(client_token, "client_token")
        with self._write() as db:
            previous = self._retry(client_token, parent_id=correction_id, reviewer=reviewer,
                                   status="accepted" if accept else "rejected")
            if previous is not None:
                return previous
            head = self._head_to_supersede(correction_id, "correction_id")
            if head["status"] == "draft":
                raise ValueError(f"correction {correction_id} is a draft: it must be submitted before review")
            new = {key: head[key] for key in _CONTENT_FIELDS}
            new["status"] = "accepted" if accept else "rejected"
            summary = change_summary(head, new, against="parent", against_id=head["id"])
            summary["review"] = {"reviewer": reviewer, "accepted": accept}
            return self._append(db, {
                **new, "generation_id": head["generation_id"], "image_sha": head["image_sha"],
                "parent_id": head["id"], "root_id": head["chain_id"], "annotator": head["annotator"],
                "comment": comment, "reviewer": reviewer, "change_summary": summary,
                "client_token": client_token,
            })

    @_api("read correction")
    def get_correction(self, correction_id: int) -> dict[str, Any] | None:
        """One correction row (plus ``chain_id`` and ``is_head``), or None."""
        return self._correction(_row_id(correction_id, "correction_id"))

    @_api("read head")
    def head(self, correction_id: int) -> dict[str, Any]:
        """The latest row of the chain that contains ``correction_id``."""
        chain = self.history(correction_id)
        return chain[-1]

    @_api("read history")
    def history(self, correction_id: int) -> list[dict[str, Any]]:
        """Every row of the chain that contains ``correction_id``, oldest first."""
        correction_id = _row_id(correction_id, "correction_id")
        rows = self._rows(
            f"{self._SELECT_CORRECTION} WHERE coalesce(c.root_id, c.id) = "
            "(SELECT coalesce(root_id, id) FROM corrections WHERE id = ?) ORDER BY c.id", [correction_id])
        if not rows:
            raise ValueError(f"no correction with id {correction_id}")
        return [_decode(row, _CORRECTION_JSON) for row in rows]

    @_api("list corrections")
    def list_corrections(self, *, status: str | Sequence[str] | None = None, annotator: str | None = None,
                         image_sha: str | None = None, search: str | None = None, heads_only: bool = True,
                         limit: int = 100, offset: int = 0) -> list[dict[str, Any]]:
        """Corrections, newest first. ``status`` is one status or several; ``search`` is a case-insensitive
        substring of the caption, the words or the comment (spaces collapsed); ``heads_only`` keeps only the
        latest row of each chain."""
        where, params = [], []
        if status is not None:
            statuses = _choices(status, "status", STATUSES)
            where.append(f"c.status IN ({', '.join('?' * len(statuses))})")
            params += statuses
        if annotator is not None:
            where.append("c.annotator = ?")
            params.append(_name(annotator, "annotator"))
        if image_sha is not None:
            where.append("c.image_sha = ?")
            params.append(_sha(image_sha))
        if search is not None:  # caption, words and comment, any case (database.search_text)
            where.append("instr(pl_search_text(c.caption, c.comment, c.words), ?) > 0")
            params.append(" ".join(_text(search, "search").split()).casefold())
        if heads_only:
            where.append("NOT EXISTS (SELECT 1 FROM corrections AS k WHERE k.parent_id = c.id)")
        sql = self._SELECT_CORRECTION + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY c.id DESC LIMIT ? OFFSET ?"
        params += [_count(limit, "limit", low=1, high=MAX_LIST_LIMIT), _count(offset, "offset")]
        return [_decode(row, _CORRECTION_JSON) for row in self._rows(sql, params)]

    @_api("read training examples")
    def training_examples(self, statuses: Sequence[str] = ("submitted", "accepted")) -> list[dict[str, Any]]:
        """Heads of chains whose status is in ``statuses``, oldest first, each with ``image_path`` (absolute),
        ``image_width`` and ``image_height``. A chain whose head is a newer draft or was rejected is left
        out."""
        statuses = _choices(statuses, "statuses", STATUSES)
        rows = self._rows(
            "SELECT c.*, coalesce(c.root_id, c.id) AS chain_id, 1 AS is_head, i.path AS image_relpath, "
            "i.width AS image_width, i.height AS image_height "
            "FROM corrections AS c JOIN images AS i ON i.sha256 = c.image_sha "
            f"WHERE c.status IN ({', '.join('?' * len(statuses))}) "
            "AND NOT EXISTS (SELECT 1 FROM corrections AS k WHERE k.parent_id = c.id) ORDER BY c.id",
            statuses)
        for row in rows:
            row["image_path"] = str(self.root / row.pop("image_relpath"))
        return [_decode(row, _CORRECTION_JSON) for row in rows]

    # ---- fine-tuning runs --------------------------------------------------------------------------------

    @_api("start finetune run")
    def start_finetune_run(self, name: str, base_checkpoint: str, *, num_corrections: int,
                           params: dict | None = None, adapter_path: str | None = None) -> int:
        """Record a fine-tuning run that starts now (status running); returns its id."""
        params = {} if params is None else params
        if not isinstance(params, dict):
            raise ValueError(f"params must be a dict, got {type(params).__name__}")
        row = {"name": _text(name, "name"), "base_checkpoint": _text(base_checkpoint, "base_checkpoint"),
               "adapter_path": _opt_text(adapter_path, "adapter_path"), "params": _dumps(params, "params"),
               "num_corrections": _count(num_corrections, "num_corrections"), "status": "running",
               "metrics": "{}", "started_at": _now(), "finished_at": None}
        with self._write() as db:
            return db["finetune_runs"].insert(row).last_pk

    def _update_run(self, run_id: int, status: str, metrics: dict | None, adapter_path: str | None) -> None:
        run_id = _row_id(run_id, "run_id")
        if metrics is not None and not isinstance(metrics, dict):
            raise ValueError(f"metrics must be a dict, got {type(metrics).__name__}")
        adapter_path = _opt_text(adapter_path, "adapter_path")
        with self._write() as db:
            run = self._one("SELECT * FROM finetune_runs WHERE id = ?", [run_id])
            if run is None:
                raise ValueError(f"no finetune run with id {run_id}")
            if run["status"] != "running":
                raise ValueError(f"finetune run {run_id} already ended ({run['status']})")
            merged = {**json.loads(run["metrics"]), **(metrics or {})}
            updates: dict[str, Any] = {"status": status, "metrics": _dumps(merged, "metrics")}
            if adapter_path is not None:
                updates["adapter_path"] = adapter_path
            if status != "running":
                updates["finished_at"] = _now()
            db["finetune_runs"].update(run_id, updates)

    @_api("update finetune run")
    def update_finetune_run(self, run_id: int, *, metrics: dict | None = None,
                            adapter_path: str | None = None) -> None:
        """Progress of a running run: ``metrics`` keys are merged into the stored ones."""
        self._update_run(run_id, "running", metrics, adapter_path)

    @_api("finish finetune run")
    def finish_finetune_run(self, run_id: int, *, status: str = "finished", metrics: dict | None = None,
                            adapter_path: str | None = None) -> None:
        """End a running run as ``finished`` or ``failed``, merging final ``metrics``."""
        self._update_run(run_id, _choice(status, "status", RUN_STATUSES[1:]), metrics, adapter_path)

    @_api("read finetune run")
    def get_finetune_run(self, run_id: int) -> dict[str, Any] | None:
        row = self._one("SELECT * FROM finetune_runs WHERE id = ?", [_row_id(run_id, "run_id")])
        return _decode(row, _RUN_JSON)

    @_api("list finetune runs")
    def list_finetune_runs(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = self._rows("SELECT * FROM finetune_runs ORDER BY id DESC LIMIT ?",
                          [_count(limit, "limit", low=1, high=MAX_LIST_LIMIT)])
        return [_decode(row, _RUN_JSON) for row in rows]
