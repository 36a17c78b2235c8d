"""`python -m training.export` killed while it copies images (the rerun finishes it, later exports clean up),
stopped by Ctrl+C, or run twice into one folder at once (the second waits for the first's lock; a folder that
cannot be locked still exports; a selection of nothing never removes a folder another export waits on)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.export.conftest import add_caption, read_back
from training import export

ROOT = Path(__file__).resolve().parents[2]


# `python -m training.export ARGS` in a child process, stopped at a known point: STOP=copy dies (os._exit: no
# `finally`, as a SIGKILL) right after its second image copy; STOP=ln says "paused" when it is about to write the
# LN file and waits for a line on stdin (or a Ctrl+C: SIGINT), then goes on. Without STOP it says "started" and runs.
_EXPORT_STOPPED = """import os, shutil, signal, sys
import training.export as export
signal.signal(signal.SIGINT, signal.default_int_handler)  # as at a terminal: a background job of a script ignores it
stop = os.environ.get("STOP")
copied = []
real_copy, real_write = shutil.copyfile, export.write_atomically
def copy_then_die(source, target):
    real_copy(source, target)
    copied.append(target)
    if stop == "copy" and len(copied) == 2:
        os._exit(9)
def pause_before_ln(target, data):
    if stop == "ln" and str(target).endswith(export.LN_FILE):
        print("paused", flush=True)
        sys.stdin.readline()
    real_write(target, data)
shutil.copyfile, export.write_atomically = copy_then_die, pause_before_ln
print("started", flush=True)
sys.exit(export.main(sys.argv[1:]))
"""


def _export_child(stop: str | None, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), STOP=stop or "")
    proc = subprocess.Popen([sys.executable, "-c", _EXPORT_STOPPED, *args], cwd=ROOT, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout.readline().strip() == "started"
    return proc


def _accepted_and_submitted(store, n: int = 4) -> tuple[set[str], set[str]]:
    """n captions on n images, every other one accepted; the images' export names (accepted, submitted)."""
    for seed in range(n):
        correction = add_caption(store, 30 + seed, ["a", "b"], [[0, 0, 9, 9], [20, 20, 30, 30]])
        if seed % 2 == 0:
            store.review(correction, "bob", accept=True)
    accepted, submitted = ({row["image_sha"] + ".png" for row in store.training_examples([status])}
                           for status in ("accepted", "submitted"))
    assert len(accepted) == len(submitted) == n // 2
    return accepted, submitted


def _check_whole(out: Path, images: set[str]) -> None:
    """`out` is a whole export of exactly `images`: its LN file names them and they are there, its manifest claims
    them, and images/ holds nothing else."""
    named = {s.image_id + ".png" for s in read_back(out)[0]}
    assert named == images
    assert {p.name for p in (out / export.IMAGES_DIR).iterdir()} == images
    assert set((out / export.IMAGE_MANIFEST).read_text().split()) == images


def test_an_export_killed_while_it_copies_images_is_finished_by_the_rerun_and_cleaned_by_later_ones(store,
                                                                                                     tmp_path):
    """Killed after copying two of four images, the rerun found them already there and never claimed them in its
    manifest, as if they were the folder's own: a later export that no longer selects their corrections left them
    in images/ for good (the folder had to be cleaned by hand)."""
    accepted, submitted = _accepted_and_submitted(store)
    out = tmp_path / "out"
    db = ["--db", str(store.path), "--out", str(out)]
    killed = _export_child("copy", *db)
    killed.communicate(timeout=120)
    assert killed.returncode == 9
    assert len(list((out / export.IMAGES_DIR).iterdir())) == 2
    assert export.main(db) == 0  # the rerun
    _check_whole(out, accepted | submitted)
    assert export.main([*db, "--statuses", "accepted"]) == 0
    _check_whole(out, accepted)


def test_a_second_export_into_the_same_folder_waits_for_the_first(store, tmp_path):
    """An export of every correction paused before its LN file while an export of the submitted ones into the same
    folder ran: the second removed the accepted corrections' images (an earlier export's, no longer selected), then
    the first wrote its LN file naming them, exit 0 for both: an export whose LN file names missing images."""
    accepted, submitted = _accepted_and_submitted(store)
    out = tmp_path / "out"
    db = ["--db", str(store.path), "--out", str(out)]
    assert export.main([*db, "--statuses", "accepted"]) == 0
    first = _export_child("ln", *db)
    assert first.stdout.readline().strip() == "paused"
    second = _export_child(None, *db, "--statuses", "submitted")
    with contextlib.suppress(subprocess.TimeoutExpired):
        second.wait(timeout=2)  # it ran to the end here before the fix; now it waits for the first
    outputs = [proc.communicate("go\n" if proc is first else None, timeout=120)[0] for proc in (first, second)]
    assert (first.returncode, second.returncode) == (0, 0), outputs
    _check_whole(out, submitted)  # the last export, whole


def test_ctrl_c_ends_an_export_in_one_line_and_the_rerun_finishes_it(store, tmp_path):
    """Ctrl+C (a real SIGINT) while an export wrote its folder was a KeyboardInterrupt traceback. One line now, exit
    130, saying the folder may be part-way (here: this export's images copied, the LN file still the earlier
    export's); the rerun makes it whole."""
    import signal

    accepted, submitted = _accepted_and_submitted(store)
    out = tmp_path / "out"
    db = ["--db", str(store.path), "--out", str(out)]
    assert export.main([*db, "--statuses", "accepted"]) == 0
    child = _export_child("ln", *db)
    assert child.stdout.readline().strip() == "paused"
    child.send_signal(signal.SIGINT)
    said = child.communicate(timeout=120)[0]
    assert child.returncode == 130 and said.splitlines() == [
        f"export: interrupted; {out} may be part-way through this export (some images copied, one perhaps cut "
        "short; the LN and COCO files not both of this export yet): run the command again to finish it"], said
    assert {s.image_id + ".png" for s in read_back(out)[0]} == accepted  # the earlier export's LN file
    assert {p.name for p in (out / export.IMAGES_DIR).iterdir()} == accepted | submitted
    assert export.main(db) == 0
    _check_whole(out, accepted | submitted)


def test_ctrl_c_while_an_export_waits_for_another_says_it_wrote_nothing(store, tmp_path):
    """Ctrl+C (a real SIGINT) while an export waited for another export's lock on its folder said the folder "may be
    part-way through this export (some images copied …)": it had written nothing. It says so now, exit 130, and
    the folder is as the other export left it."""
    import signal
    import threading

    from pixelllm.files import exclusive_lock

    if not Path("/proc/locks").exists():
        pytest.skip("needs /proc/locks to see the export waiting on the folder's lock")
    _accepted_and_submitted(store)
    out = tmp_path / "out"
    db = ["--db", str(store.path), "--out", str(out)]
    assert export.main([*db, "--statuses", "accepted"]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with exclusive_lock(out, wait=False):  # another export writing the folder
        child = _export_child(None, *db)
        for _ in range(6000):  # until it waits on the lock (/proc/locks marks a blocked request "->")
            if any("->" in line and f" {child.pid} " in line for line in Path("/proc/locks").read_text().splitlines()):
                break
            assert child.poll() is None
            threading.Event().wait(0.01)
        child.send_signal(signal.SIGINT)
        said = child.communicate(timeout=120)[0]
    assert child.returncode == 130 and said.splitlines() == [
        f"export: interrupted while waiting for another export into {out} to finish; this export wrote nothing: run "
        "the command again to export"], said
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_an_export_where_the_folder_cannot_be_locked_still_exports(store, tmp_path, monkeypatch):
    """NFS emulates flock with POSIX locks, which refuse a folder opened read-only (EBADF): the export lock made
    every export on such a folder (a lab's network home) fail. It goes on unlocked; a lock held elsewhere still
    stops a non-waiting caller."""
    import errno
    import fcntl

    from pixelllm.files import exclusive_lock

    add_caption(store, 17, ["nfs"], [[0, 0, 1, 1]])

    def no_locks(fd, operation):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert export.export_corrections(store, tmp_path / "out")["ln_records"] == 1
    assert read_back(tmp_path / "out")[0][0].words == ["nfs"]

    def held(fd, operation):
        raise BlockingIOError(errno.EWOULDBLOCK, "Resource temporarily unavailable")

    monkeypatch.setattr(fcntl, "flock", held)
    with pytest.raises(BlockingIOError), exclusive_lock(tmp_path / "lockfile", wait=False):
        pass


def test_an_export_selecting_nothing_never_removes_a_folder_another_export_waits_on(store, tmp_path, monkeypatch):
    """An export selecting nothing into a new folder made it, locked it and removed it at the end: a second export
    into that folder, waiting on the lock, then held a lock on a removed folder (and wrote into a new one no other
    export could see locked), or, opening it just after the removal, created a file where the folder had been."""
    import threading

    from pixelllm.files import exclusive_lock

    add_caption(store, 18, ["wanted"], [[0, 0, 1, 1]])  # submitted, none accepted
    out = tmp_path / "new"
    a_inside, release_a, b_inside, release_b = (threading.Event() for _ in range(4))
    real_export = export._export

    def paused(store_, out_, statuses, rows, reasons=None):
        inside, release = (a_inside, release_a) if statuses == ["accepted"] else (b_inside, release_b)
        inside.set()
        assert release.wait(60)
        return real_export(store_, out_, statuses, rows, reasons)

    def waiting_on_a_lock() -> bool:  # a flock request blocked in this process (/proc/locks marks it "->")
        return any("->" in line and "FLOCK" in line and f" {os.getpid()} " in line
                   for line in Path("/proc/locks").read_text().splitlines())

    if not Path("/proc/locks").exists():
        pytest.skip("needs /proc/locks to see an export waiting on the folder's lock")
    monkeypatch.setattr(export, "_export", paused)
    results = {}
    a = threading.Thread(target=lambda: results.setdefault("a", export.export_corrections(store, out, ["accepted"])))
    b = threading.Thread(target=lambda: results.setdefault("b", export.export_corrections(store, out, ["submitted"])))
    a.start()
    assert a_inside.wait(60)
    b.start()
    for _ in range(6000):  # b either runs at once, or waits on a's lock
        if b_inside.is_set() or waiting_on_a_lock():
            break
        threading.Event().wait(0.01)
    release_a.set()
    a.join(60)
    assert b_inside.wait(60) and results["a"]["ln_file"] is None
    try:
        assert out.is_dir()  # the folder b holds is the folder, and a third export waits for b
        with pytest.raises(BlockingIOError), exclusive_lock(out, wait=False):
            pass
    finally:
        release_b.set()
        b.join(60)
    assert results["b"]["ln_records"] == 1 and read_back(out)[0][0].words == ["wanted"]
