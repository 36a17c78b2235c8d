"""Writing files: atomically, so that a reader, or the next run after a kill, sees the old file or the whole new one;
safetensors files, whose failed writes are OSErrors like any other; and a lock for writers of one folder."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
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


def write_atomically(target: str | os.PathLike, data: bytes | str, *, sweep: bool = True) -> None:
    """Write ``data`` (str as UTF-8) to ``target``: a temporary file in the same folder, fsync, ``os.replace``,
    then an fsync of the folder so the rename itself survives a power cut (where the file system allows it).
    Creates the folder; on any error the temporary file is removed and ``target`` is untouched. A process killed
    mid-write (SIGKILL, a power cut) cannot remove its temporary file: a later successful write of ``target``
    removes those of writers that are no longer alive (:func:`remove_dead_writers_temps`), which lists the folder.
    ``sweep=False`` skips that, for a writer of many files into one big folder that sweeps it once itself (the
    annotation store's images, each written once under its own name, at every write a listing of them all)."""
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
    if sweep:
        remove_dead_writers_temps(target.parent, target.name)
    with contextlib.suppress(OSError):  # not every file system can fsync a directory
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _create_temp(target: Path) -> tuple[int, str]:
    """A new empty file beside ``target``, created with mode 0o666 less the umask, as ``open(target, "wb")`` would
    make it (``tempfile.mkstemp`` makes it 0o600: the store's images and an export's files were unreadable to the
    team's other accounts while the database beside them was not). Named ``.<name>.<pid>-<namespace>.<random>.tmp``
    where the writer's pid can be checked later (:func:`writer_tag`), else ``.<name>.<random>.tmp``."""
    tag = writer_tag()  # (a name so long the tag would pass 255 bytes goes without it)
    writer = f"{tag}." if tag and len(os.fsencode(target.name)) <= 200 else ""
    for _ in range(100):
        tmp = target.parent / f".{target.name}.{writer}{secrets.token_hex(6)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), str(tmp)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary file name beside {target}")


def writer_tag(pid: int | None = None) -> str | None:
    """``<pid>-<namespace>``, for the names of what a writer leaves behind if it is killed (a temporary file, a
    staging folder), so that a later writer can tell whether it is still running (:func:`left_by_dead_writer`):
    ``pid`` (default: this process) and 12 hex digits naming this boot of this machine and this pid namespace.
    None where that cannot be known (not Linux): what such a writer leaves is then never taken for a dead one's."""
    namespace = _pid_namespace(os.getpid())
    return None if namespace is None else f"{os.getpid() if pid is None else pid}-{namespace}"


def left_by_dead_writer(tag: str) -> bool:
    """Whether ``tag`` (:func:`writer_tag`) names a writer that has died: its namespace is this process's and its
    pid has no process. Never true for a live writer, so removing what it left is race-free (a new process that
    reuses the pid keeps the dead one's leftovers: a leak, never a loss; an unreaped zombie counts as alive). A pid
    alone is not enough: the folder may be shared with another machine (NFS) or another container, where a live
    writer's pid is unused here; a tag without a namespace (an older name, or not Linux) is never dead."""
    pid, _, namespace = tag.partition("-")
    ours = _pid_namespace(os.getpid())
    return (ours is not None and namespace == ours and pid.isdigit() and not pid.startswith("0") and len(pid) <= 10
            and not _pid_alive(int(pid)))


@functools.cache
def _pid_namespace(pid: int) -> str | None:
    """This boot of this machine and this pid namespace, as 12 hex digits; None off Linux. Keyed on the pid so
    that a forked child looks again."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        space = os.stat("/proc/self/ns/pid")
    except OSError:
        return None
    return hashlib.sha256(f"{boot} {space.st_dev} {space.st_ino}".encode()).hexdigest()[:12]


def remove_dead_writers_temps(folder: str | os.PathLike, name: str | None = None) -> None:
    """Remove the temporary files in ``folder`` that writers of ``name`` (None: of any file) left when they died
    mid-write (:func:`left_by_dead_writer`). One listing of the folder: ~6 ms for 10 000 files, ~30 ms for 50 000."""
    if writer_tag() is None:
        return
    target = re.escape(f".{name}.") if name is not None else r"\..+\."
    ours = re.compile(target + r"([0-9]+-[0-9a-f]{12})\.[0-9a-f]{12}\.tmp")
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for entry in names:
        match = entry.startswith(".") and entry.endswith(".tmp") and ours.fullmatch(entry)
        if match and left_by_dead_writer(match[1]):
            with contextlib.suppress(OSError):  # another writer of the target removed it first
                os.unlink(Path(folder) / entry)


def _pid_alive(pid: int) -> bool:
    """Whether a process (any user's) has ``pid`` in this pid namespace; True when that cannot be told. POSIX only:
    on Windows, ``os.kill`` ends the process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: someone else's process; a pid beyond C's int: no answer
        return True
    return True


def probe_writable(folder: str | os.PathLike) -> None:
    """Create ``folder`` and write a file there (removed at once): the OSError a later write would fail with, now,
    before any work (a read-only folder, a file in the way, another user's folder)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryFile(dir=folder):
        pass


def json_target_problem(target: Path, example: str) -> str | None:
    """Why a report could not be written to the file `target` (None: it can), found by creating a scratch file in
    its folder; `example` is a file name to suggest when `target` is a folder. The folders made for that are removed
    again (writing the report makes them): one left inside a new simulate_annotators --work made the run refuse that
    folder as someone else's."""
    if target.is_dir():
        return f"is a folder; give a file name, e.g. --json {example}"
    made = [folder for folder in (target.parent, *target.parent.parents) if not folder.exists()]  # deepest first
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=target.parent):
            pass
    except OSError as err:
        return f"cannot write in {target.parent}: {err.strerror or err}"
    finally:
        for folder in made:
            with contextlib.suppress(OSError):  # not empty: another writer's meanwhile
                folder.rmdir()
    return None


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
    # save_file writes a temporary file (0o600) and renames it: the weights were the one file of a checkpoint
    # another account could not read (the app serving a teammate's finetune run: "Permission denied"). They get
    # the mode of any file this process makes, 0o666 less the umask, like the config.json beside them.
    with contextlib.suppress(OSError):  # a filesystem without modes (vfat, some CIFS mounts) refuses chmod: saved
        os.chmod(path, 0o666 & ~_umask())


def _umask() -> int:
    """This process's umask, read from /proc where it can be (setting it to read it races with other threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, *, wait: bool) -> Iterator[None]:
    """Hold an exclusive advisory lock (``flock``) on ``path`` for the block: a folder, or a file (created if
    missing). wait=False raises BlockingIOError at once when another process holds it. The lock goes with the
    process, so one killed inside the block holds nothing afterwards."""
    path = Path(path)
    if fcntl is None:
        yield
        return
    try:
        fd = os.open(path, os.O_RDONLY) if path.is_dir() else os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # a lock file another account left (0o644 under umask 022): flock needs no write access
        if not path.is_file():
            raise
        fd = os.open(path, os.O_RDONLY)
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
