"""Writing a file so that a reader, or the next run after a kill, sees the old file or the whole new one."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def write_atomically(target: str | os.PathLike, data: bytes | str) -> None:
    """Write ``data`` (str as UTF-8) to ``target``: a temporary file in the same folder, fsync, ``os.replace``,
    then an fsync of the folder so the rename itself survives a power cut (where the file system allows it).
    Creates the folder; on any error the temporary file is removed and ``target`` is untouched."""
    target = Path(target)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
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
