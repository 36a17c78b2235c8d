"""Writing files: atomically, so that a reader, or the next run after a kill, sees the old file or the whole new one;
safetensors files, whose failed writes are OSErrors like any other; and a lock for writers of one folder."""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; one writer at a time is then the user's to keep
    fcntl = None

if TYPE_CHECKING:
    import torch


def write_atomically(target: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (str as UTF-8) to ``target``: a temporary file in the same folder, fsync, ``os.replace``,
    then an fsync of the folder so the rename itself survives a power cut (where the file system allows it).
    Creates the folder; on any error the temporary file is removed and ``target`` is untouched."""
    target = Path(target)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(target)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # not every file system can fsync a directory
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _create_temp(target: Path) -> tuple[int, str]:
    """A new empty file beside ``target``, created with mode 0o666 less the umask, as ``open(target, "wb")`` would
    make it (``tempfile.mkstemp`` makes it 0o600: the store's images and an export's files were unreadable to the
    team's other accounts while the database beside them was not)."""
    for _ in range(100):
        tmp = target.parent / f".{target.name}.{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name beside {target}")


def probe_writable(folder: str | os.PathLike) -> None:
    """Create ``folder`` and write a file there (removed at once): the OSError a later write would fail with, now,
    before any work (a read-only folder, a file in the way, another user's folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
        pass


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                     metadata: dict[str, str] | None = None) -> None:
    """safetensors' `save_file`, a failed write (a full disk, a file-size limit) raised as the OSError it is:
    safetensors raises its own SafetensorError, which the callers' `except OSError` let through as a traceback."""
    from safetensors import SafetensorError  # here: the store uses this module and stays free of torch
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as err:
        if "I/O error" not in str(err):
            raise
        raise OSError(f"cannot write {path}: {err}") from err


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, *, wait: bool) -> Iterator[None]:
    """Hold an exclusive advisory lock (``flock``) on ``path`` for the block: a folder, or a file (created if
    missing). wait=False raises BlockingIOError at once when another process holds it. The lock goes with the
    process, so one killed inside the block holds nothing afterwards."""
    path = Path(path)
    if fcntl is None:
        yield
        return
    fd = os.open(path, os.O_RDONLY) if path.is_dir() else os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise
        except OSError:  # a file system that cannot lock it (NFS emulates flock with POSIX locks, which refuse a
            pass  # folder opened read-only: EBADF): the work goes on unlocked rather than not at all
        yield
    finally:
        os.close(fd)
