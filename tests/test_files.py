"""Tests for pixelllm.files: what a writer killed mid-write leaves behind."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pixelllm.files import write_atomically

ROOT = Path(__file__).resolve().parents[1]

# `write_atomically(argv[1], argv[2])` in a child process that says "paused" once its temporary file is written
# (at the file's fsync, before the rename) and goes on when it reads a line on stdin
_WRITER_PAUSED = """import os, sys
from pixelllm.files import write_atomically
real_fsync = os.fsync
def paused(fd):
    os.fsync = real_fsync
    print("paused", flush=True)
    sys.stdin.readline()
    real_fsync(fd)
os.fsync = paused
write_atomically(sys.argv[1], sys.argv[2])
"""


def _paused_writer(target: Path, text: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _WRITER_PAUSED, str(target), text], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)), text=True, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout.readline().strip() == "paused"
    return proc


@pytest.mark.skipif(not Path("/proc/self/ns/pid").exists(), reason="needs Linux's /proc to tell a dead writer")
def test_a_write_removes_the_temporary_file_a_killed_writer_left_never_a_live_writers(tmp_path):
    """A writer SIGKILLed mid-write left its hidden `.NAME.….tmp` beside the target for good. The next successful
    write of the target removes it. The temporary file of a writer still running (paused mid-write here) stays,
    and that writer then finishes; one of a dead pid from another machine or container (its pid means nothing
    here) stays too."""
    target = tmp_path / "summary.json"
    write_atomically(target, "old")

    def temps() -> set[str]:
        return {p.name for p in tmp_path.iterdir() if p.name.startswith(f".{target.name}.")}

    dead = _paused_writer(target, "dead")
    dead_temp = temps()
    dead.send_signal(signal.SIGKILL)
    dead.communicate(timeout=60)  # reaped: a zombie would still count as alive
    assert dead.returncode == -signal.SIGKILL and len(dead_temp) == 1
    live = _paused_writer(target, "live")
    try:
        live_temp = temps() - dead_temp
        assert len(live_temp) == 1
        write_atomically(target, "new")
        assert target.read_text() == "new"
        assert temps() == live_temp  # the dead writer's file went, the live one's stayed
        # a file with the same dead pid from another pid namespace (another machine or container) stays
        [name] = dead_temp
        tagged = re.fullmatch(rf"\.{re.escape(target.name)}\.{dead.pid}-([0-9a-f]{{12}})\.[0-9a-f]{{12}}\.tmp", name)
        assert tagged, f"{name} does not name its writer"
        elsewhere = name.replace(f"-{tagged[1]}.", f"-{int(tagged[1], 16) ^ 1:012x}.")
        (tmp_path / elsewhere).write_text("a writer on another machine")
        write_atomically(target, "newer")
        assert temps() == live_temp | {elsewhere}
    finally:
        out, _ = live.communicate("go\n", timeout=60)
    assert live.returncode == 0, out
    assert target.read_text() == "live"
    assert temps() == {elsewhere}


# `exclusive_lock(argv[1], wait=False)` as user argv[2] (umask 022), printing "locked" or the error's name
_LOCK_AS = """import os, sys
from pixelllm.files import exclusive_lock
os.umask(0o022)
os.setgid(int(sys.argv[2]))
os.setuid(int(sys.argv[2]))
try:
    with exclusive_lock(sys.argv[1], wait=False):
        print("locked")
except OSError as err:
    print(type(err).__name__)
"""


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to act as two accounts")
def test_a_lock_file_another_account_left_stops_no_later_run():
    """The lock file stays beside what it locks (`training.finetune`'s `.NAME.lock`, a split's lock): made by one
    account under umask 022 it is 0o644, and another account's run was refused "Permission denied" opening it for
    writing, though `flock` needs no write access (a teammate's failed finetune into a shared runs/ folder stopped
    every later run into that --out). It is opened read-only then, and still excludes a holder."""
    import shutil
    import tempfile

    from pixelllm.files import exclusive_lock

    folder = Path(tempfile.mkdtemp(prefix="pixelllm-lock-"))  # pytest's tmp_path is private to root
    folder.chmod(0o777)
    lock = folder / ".ft1.lock"

    def lock_as(uid: int) -> str:
        proc = subprocess.run([sys.executable, "-c", _LOCK_AS, str(lock), str(uid)], cwd=ROOT, capture_output=True,
                              text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        return proc.stdout.strip() or proc.stderr

    try:
        assert lock_as(1234) == "locked" and lock.stat().st_uid == 1234 and lock.stat().st_mode & 0o777 == 0o644
        assert lock_as(1235) == "locked"  # another account, after the first one's run ended
        with exclusive_lock(lock, wait=False):
            assert lock_as(1235) == "BlockingIOError"  # opened read-only, the lock still excludes
    finally:
        shutil.rmtree(folder)
