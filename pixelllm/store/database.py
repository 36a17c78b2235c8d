"""``StoreDatabase``: one SQLite file opened as DESIGN §5 asks — a connection per thread, ``BEGIN IMMEDIATE``
write transactions, migrations, atomic image files, and every raw ``sqlite3``/OS error translated into
``StoreError`` (or ``ValueError`` for a violated constraint). ``AnnotationStore`` adds the tables' meaning on top;
why it is built this way is in ``pixelllm/store/__init__.py``."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import sqlite3
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self

import sqlite_utils

from pixelllm.files import remove_dead_writers_temps, write_atomically
from pixelllm.store.fields import _choice, _now, _number
from pixelllm.store.schema import Migration


class StoreError(Exception):
    """The store cannot do its job: the file is not a database or is corrupt, the location is read-only,
    the disk is full, the database stayed locked too long, or the store was closed. ``path`` is the file."""

    def __init__(self, message: str, path: Path | None = None):
        super().__init__(message)
        self.path = path


# ----------------------------------------------------------------------------------------------------------
# Error translation


_SQLITE_HINTS = {  # primary result codes
    3: "permission denied",
    5: "the database stayed locked by another writer for longer than the timeout",
    6: "a table is locked",
    8: "the database file or its folder is read-only",
    10: "disk I/O error",
    11: "the database file is corrupt",
    13: "the disk is full (or the database reached its size limit)",
    14: "the database file cannot be opened (missing folder, a directory, or no permission)",
    26: "the file is not a SQLite database (or is corrupt)",
}
_OS_HINTS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EROFS: "the location is on a read-only file system",
    errno.EACCES: "the location is read-only for this user (permission denied)",
    errno.EPERM: "the location is read-only for this user (operation not permitted)",
}


def _api(action: str) -> Callable:
    """Decorate a public method: raw sqlite3/OS errors become StoreError (ValueError for constraints)."""

    def decorate(method: Callable) -> Callable:
        @functools.wraps(method)
        def wrapper(self: StoreDatabase, *args: Any, **kwargs: Any) -> Any:
            with self._translate_errors(action):
                return method(self, *args, **kwargs)

        return wrapper

    return decorate


def search_text(caption: str | None, comment: str | None, words_json: str | None) -> str:
    """What a correction search looks in (SQL `pl_search_text`): caption, words and comment, casefolded (SQLite's
    LIKE folds ASCII letters only, and a region or referring correction has its text in its words only)."""
    try:
        words = json.loads(words_json) if words_json else []
    except ValueError:
        words = []
    words = [w for w in words if isinstance(w, str)] if isinstance(words, list) else []
    fields = (caption or "", " ".join(words), comment or "")  # apart: a search does not match across two of them
    return "\x1f".join(" ".join(text.split()) for text in fields).casefold()


class StoreDatabase:
    """The SQLite file under an ``AnnotationStore``: connections, transactions, errors, migrations, files."""

    def __init__(self, path: str | os.PathLike, timeout: float, *, synchronous: str,
                 migrations: Sequence[Migration], create: bool = True):
        if str(path) in ("", ":memory:") or str(path).startswith("file:"):
            raise ValueError(f"path must be a file path, got {str(path)!r}")
        self.path = Path(path).absolute()
        self.root = self.path.parent
        self.timeout = _number(timeout, "timeout")
        if self.timeout < 0:
            raise ValueError(f"timeout must be >= 0 seconds, got {timeout!r}")
        self.synchronous = _choice(str(synchronous).upper(), "synchronous", ("NORMAL", "FULL"))
        versions = [m.version for m in migrations]
        if versions != list(range(1, len(versions) + 1)):
            raise ValueError(f"migrations must be numbered 1..N in order, got {versions}")
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open_dbs: weakref.WeakSet[sqlite_utils.Database] = weakref.WeakSet()
        self._closed = False
        self._verified = False  # the first connection checks the file before anything changes it
        self._create = create
        try:
            with self._translate_errors("open"):
                if not create and not self.path.is_file():  # sqlite3 would create it
                    raise StoreError(f"no annotation store at {self.path}", self.path)
                if not create and self.path.stat().st_size == 0:  # sqlite3 would delete a -wal beside it
                    raise StoreError(f"{self.path} is not an annotation store (an empty file); it was left as it was",
                                     self.path)
                self.root.mkdir(parents=True, exist_ok=True)
                self._db()
                self._migrate(list(migrations))
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r})"

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    # ---- connections, transactions, errors ---------------------------------------------------------------

    def _verify(self, conn: sqlite3.Connection) -> None:
        """Refuse a corrupt file, or another program's database (for a reader, ``create=False``, also one with no
        tables), before switching it to WAL."""
        problems = [row[0] for row in conn.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise StoreError(f"{self.path} is corrupt (PRAGMA quick_check: {'; '.join(problems[:5])})",
                             self.path)
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables and not self._create:  # a new store would be made in it (an empty file: 73 KB of tables)
            what = "an empty file" if self.path.stat().st_size == 0 else "a SQLite database without tables"
            raise StoreError(f"{self.path} is not an annotation store ({what}); it was left as it was", self.path)
        if tables and "schema_version" not in tables:
            raise StoreError(f"{self.path} is a SQLite database but not an annotation store "
                             f"(it has tables {sorted(tables)} and no schema_version)", self.path)

    def _connect(self) -> sqlite_utils.Database:
        conn = sqlite3.connect(self.path, timeout=self.timeout, check_same_thread=False, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            conn.execute("PRAGMA foreign_keys = ON")
            if not self._verified:
                self._verify(conn)
                self._verified = True
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.path}: cannot use WAL journal mode (got {mode!r}); "
                                 "is the file on a read-only or network file system?", self.path)
            conn.execute(f"PRAGMA synchronous = {self.synchronous}")
            conn.create_function("pl_search_text", 3, search_text, deterministic=True)
            # execute_plugins=False: no sqlite-utils plugin may alter our connections.
            return sqlite_utils.Database(conn, execute_plugins=False)
        except BaseException:
            conn.close()
            raise

    def _db(self) -> sqlite_utils.Database:
        """This thread's connection, opened on first use."""
        if self._closed:
            raise StoreError(f"{self.path}: the store is closed", self.path)
        db = getattr(self._local, "db", None)
        if db is None:
            db = self._connect()
            with self._lock:
                if self._closed:
                    db.close()
                    raise StoreError(f"{self.path}: the store is closed", self.path)
                self._open_dbs.add(db)  # weak: a finished thread's connection is closed when collected
            self._local.db = db
        return db

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite_utils.Database]:
        """One write transaction: BEGIN IMMEDIATE … COMMIT, ROLLBACK on any error."""
        db = self._db()
        conn = db.conn
        assert not conn.in_transaction, "nested write transaction"
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield db
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _translate_errors(self, action: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.IntegrityError as exc:
            raise ValueError(f"{action}: {exc}") from exc
        except (sqlite3.Error, OSError) as exc:
            raise self._error(action, exc) from exc

    def _error(self, action: str, exc: sqlite3.Error | OSError) -> StoreError:
        if isinstance(exc, sqlite3.Error):
            code = getattr(exc, "sqlite_errorcode", None)
            hint = _SQLITE_HINTS.get(code & 0xFF) if code is not None else None
            if code is not None and code & 0xFF in (8, 14) and self.root.is_dir() \
                    and not os.access(self.root, os.W_OK):
                hint = (f"the folder {self.root} is read-only, and the store writes its WAL journal beside the file "
                        "even to read (copy the folder somewhere writable)")
            detail = f"{getattr(exc, 'sqlite_errorname', type(exc).__name__)}: {exc}"
        else:
            hint = _OS_HINTS.get(exc.errno)
            detail = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
        return StoreError(f"{self.path}: {action} failed" + (f": {hint}" if hint else "") + f" ({detail})",
                          self.path)

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        return list(self._db().query(sql, list(params)))

    def _one(self, sql: str, params: Sequence[Any] = ()) -> dict[str, Any] | None:
        rows = self._rows(sql, params)
        return rows[0] if rows else None

    # ---- migrations --------------------------------------------------------------------------------------

    def _schema_version(self) -> int:
        if "schema_version" not in self._db().table_names():
            return 0
        return self._one("SELECT coalesce(max(version), 0) AS v FROM schema_version")["v"]

    def _migrate(self, migrations: list[Migration]) -> None:
        newest = len(migrations)
        if self._schema_version() == newest:
            return  # the common case takes no write lock
        with self._write() as db:
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, "
                       "description TEXT NOT NULL, applied_at TEXT NOT NULL)")
            current = self._schema_version()  # again, under the write lock: another process may have migrated
            if current > newest:
                raise StoreError(f"{self.path} has schema version {current} but this code knows only up to "
                                 f"{newest}: upgrade pixelllm to open it", self.path)
            for migration in migrations[current:]:
                try:
                    if isinstance(migration.apply, str):
                        db.executescript(migration.apply)  # split into statements inside our transaction
                    else:
                        migration.apply(db)
                except Exception as exc:  # sqlite3, sqlite-utils (e.g. TransformError) or the step's own code
                    raise StoreError(f"{self.path}: schema migration {migration.version} "
                                     f"({migration.description}) failed, the file stays at version "
                                     f"{current}: {exc}", self.path) from exc
                db["schema_version"].insert({"version": migration.version,
                                             "description": migration.description, "applied_at": _now()})

    @_api("read schema version")
    def schema_version(self) -> int:
        return self._schema_version()

    @_api("check write access")
    def check_writable(self) -> None:
        """Raise ``StoreError`` unless this process can write the database and its images folder; nothing is
        changed. A read-only database file (in a writable folder), or a read-only folder that still holds the
        file's ``-wal``/``-shm`` (left by a killed process or copied from a live store), opens and reads fine and
        fails only at the first write: a program that will write (the app) checks this at start."""
        conn = self._db().conn
        assert not conn.in_transaction, "check_writable inside a transaction"
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            conn.execute(f"PRAGMA user_version = {int(version)}")  # writes the header page; rolled back below
        finally:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
        images = self.root / "images"
        folder = images if images.is_dir() else self.root
        if not os.access(folder, os.W_OK):
            raise StoreError(f"{self.path}: the folder {folder} is read-only: images cannot be stored", self.path)
        if images.is_dir():  # what image writes killed mid-write left (they do not sweep: see below)
            remove_dead_writers_temps(images)

    # ---- files ---------------------------------------------------------------------------------------------

    def _write_file_atomically(self, target: Path, data: bytes) -> None:
        """Readers see the whole file or none (``pixelllm.files.write_atomically``). Without its sweep: each image
        is written once under its own name, so a sweep per write would list every stored image at every new one
        for nothing; ``check_writable`` (the app, at start) sweeps the folder once instead."""
        write_atomically(target, data, sweep=False)

    # ---- maintenance -------------------------------------------------------------------------------------

    @_api("integrity check")
    def integrity_check(self) -> str:
        """``"ok"``, or the problems found by ``PRAGMA integrity_check`` and ``PRAGMA foreign_key_check``."""
        conn = self._db().conn
        problems = [row[0] for row in conn.execute("PRAGMA integrity_check").fetchall()]
        problems = [] if problems == ["ok"] else problems
        problems += [f"foreign key violation: {table} rowid {rowid} -> {parent}"
                     for table, rowid, parent, _ in conn.execute("PRAGMA foreign_key_check").fetchall()]
        return "ok" if not problems else "\n".join(problems)

    def close(self) -> None:
        """Close every thread's connection. Call once no other call is in flight (at shutdown)."""
        with self._lock:
            self._closed = True
            dbs = list(self._open_dbs)
            self._open_dbs = weakref.WeakSet()
        for db in dbs:
            with contextlib.suppress(sqlite3.Error):
                db.conn.close()
