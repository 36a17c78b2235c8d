"""A finetune run's record in `finetune_runs` (finished, or failed with the error) and its `--out` folder:
a failed save keeps the previous output, what a killed run left beside it is cleared or put back, `--max-minutes`,
no usable corrections, a symlinked `--out`, a full disk, readable weights, two runs into one `--out`, a `--db`
that is an empty file."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from pixelllm import PixelLLM
from pixelllm.store import AnnotationStore, StoreError
from tests.finetune.conftest import settings
from tests.helpers import run_with_file_size_limit
from training import corrections
from training import finetune as ft


def test_a_failing_run_is_recorded_as_failed(base_dir, store, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(corrections.FinetuneCollator, "corrections", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        ft.finetune(settings(base_dir, store, tmp_path / "runs" / "bad"), store=store, progress=False)
    [run] = store.list_finetune_runs()
    assert run["status"] == "failed" and "disk on fire" in run["metrics"]["error"]


def test_a_run_failing_to_save_keeps_the_previous_output_and_a_bad_out_is_refused_first(base_dir, store, tmp_path,
                                                                                      monkeypatch):
    """A new run into a previous run's --out replaces it only once complete: a save that fails (disk full)
    leaves the previous adapter, finetune.json and run row as they were. An --out that is a file, or someone's
    folder, is refused before the model loads or a run is recorded."""
    import pixelllm.checkpoint as checkpoint

    out = tmp_path / "runs" / "keep"
    first = ft.finetune(settings(base_dir, store, out), store=store, progress=False)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.lora, "save_adapter", full)
    with pytest.raises(OSError, match="No space left"):
        ft.finetune(settings(base_dir, store, out, seed=1), store=store, progress=False)
    assert json.loads((out / "finetune.json").read_text())["run_id"] == first["run_id"]
    assert PixelLLM.from_pretrained(out).adapters == ["keep"]
    assert [r["status"] for r in store.list_finetune_runs()] == ["failed", "finished"]  # newest first
    assert sorted(p.name for p in out.parent.iterdir()) == [".keep.lock", "keep"]  # no staging folder left behind
    monkeypatch.undo()
    # the output is in place but the run cannot be recorded as finished (the store is locked): the previous output
    # comes back, so the finished run's row still points at its own adapter
    finish = store.finish_finetune_run

    def locked(run_id, *, status, **kwargs):
        if status == "finished":
            raise RuntimeError("database is locked")
        return finish(run_id, status=status, **kwargs)

    monkeypatch.setattr(store, "finish_finetune_run", locked)
    with pytest.raises(RuntimeError, match="locked"):
        ft.finetune(settings(base_dir, store, out, seed=2), store=store, progress=False)
    assert json.loads((out / "finetune.json").read_text())["run_id"] == first["run_id"]
    assert sorted(p.name for p in out.parent.iterdir()) == [".keep.lock", "keep"]
    monkeypatch.undo()
    second = ft.finetune(settings(base_dir, store, out, seed=1), store=store, progress=False)
    assert json.loads((out / "finetune.json").read_text())["run_id"] == second["run_id"] != first["run_id"]

    (tmp_path / "a-file").write_text("x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    for bad, match in ((tmp_path / "a-file", "is a file"), (tmp_path / "mine", "no finetune.json"),
                       (Path("."), "the working directory"), (tmp_path, "the working directory")):
        with pytest.raises(ValueError, match=match):
            ft.finetune(settings(base_dir, store, bad), store=store, progress=False)
    assert len(store.list_finetune_runs()) == 4 and (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_max_minutes_stops_the_loop_early_and_says_so(base_dir, store, tmp_path, monkeypatch):
    clock = iter(range(0, 10**6, 25))  # every reading of the clock is 25 s after the last
    monkeypatch.setattr(ft.time, "perf_counter", lambda: float(next(clock)))
    summary = ft.finetune(settings(base_dir, store, tmp_path / "runs" / "short", steps=50, max_minutes=1),
                          store=store, progress=False)
    assert summary["stopped_early"] and 1 <= summary["steps"] < 50
    [run] = store.list_finetune_runs()
    assert run["status"] == "finished" and run["metrics"]["stopped_early"] and run["metrics"]["steps"] == \
        summary["steps"]


def test_what_a_killed_run_left_beside_out_is_cleared_or_put_back(base_dir, store, tmp_path):
    """A run killed (SIGKILL) mid-way leaves `.out.partial-TAG` (its staging) or, killed between the two renames of
    the swap, `.out.old-TAG` (the previous output) with no `out`: the next run removes the first and puts the
    second back, so the previous output is not lost. A live process's folders are left alone, and so are those
    whose tag is not of this machine's pid namespace (a folder shared with another machine, where that pid may be
    a live run) or that carry a bare pid."""
    import subprocess

    from pixelllm.files import writer_tag

    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that no longer runs
    runs = tmp_path / "runs"
    (runs / f".ft.old-{writer_tag(dead.pid)}").mkdir(parents=True)
    (runs / f".ft.old-{writer_tag(dead.pid)}" / "finetune.json").write_text("{}")
    (runs / f".ft.partial-{writer_tag(dead.pid)}").mkdir()
    kept = [f".ft.partial-{os.getpid()}-x",  # not a name a run writes
            f".ft.partial-{writer_tag(os.getppid())}",  # a live process
            f".ft.partial-{dead.pid}-{'0' * 12}",  # the dead pid, but another machine's or container's
            f".ft.partial-{dead.pid}"]  # a bare pid: an older version's name, or a machine without pid namespaces
    for name in kept:
        (runs / name).mkdir()
    ft.claim_out((runs / "ft").resolve())
    assert (runs / "ft" / "finetune.json").is_file()  # the previous output, back in place
    assert sorted(p.name for p in runs.iterdir()) == sorted(["ft", *kept])


def test_no_corrections_is_a_clear_error_and_records_nothing(base_dir, tmp_path):
    with AnnotationStore(tmp_path / "empty.db") as empty:
        with pytest.raises(ValueError, match="no usable corrections"):
            ft.finetune(settings(base_dir, empty, tmp_path / "runs" / "none"), store=empty, progress=False)
        assert empty.list_finetune_runs() == []


def test_corrections_whose_images_are_gone_are_named_in_the_error(base_dir, store, tmp_path):
    for image in (store.root / "images").iterdir():
        image.unlink()
    with pytest.raises(ValueError, match=r"no usable corrections .* \(4 without their image file skipped\)"):
        ft.finetune(settings(base_dir, store, tmp_path / "runs" / "gone"), store=store, progress=False)


def test_a_symlinked_out_names_the_adapter_after_the_link(base_dir, store, tmp_path):
    """`--out runs/latest` pointing at `runs/2026-12-07`: the adapter is `latest` (the name typed, which the docs
    promise), and the run is written through the link, which still loads."""
    target = tmp_path / "runs" / "2026-12-07"
    target.mkdir(parents=True)
    link = tmp_path / "runs" / "latest"
    link.symlink_to(target, target_is_directory=True)
    ft.finetune(settings(base_dir, store, link), store=store, progress=False)
    assert PixelLLM.from_pretrained(link).adapters == ["latest"]
    assert store.list_finetune_runs()[0]["name"] == "latest"


def test_an_adapter_that_does_not_fit_on_the_disk_is_one_line_and_recorded_failed(base_dir, store, tmp_path):
    """safetensors reports a failed write (a full disk) as its own SafetensorError, which `main` did not catch:
    a traceback. Here the write really fails (a file-size limit on the process); the store stays writable."""
    limit = (base_dir / "model.safetensors").stat().st_size // 2
    assert store.path.stat().st_size < limit  # the store itself can still be written
    out = tmp_path / "runs" / "full"
    proc = run_with_file_size_limit("training.finetune", limit, "--db", str(store.path), "--base", str(base_dir),
                                    "--out", str(out), "--steps", "2", "--batch-size", "2")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert re.search(r"finetune: cannot write .*model.safetensors.*File too large", proc.stderr), proc.stderr
    [run] = store.list_finetune_runs()
    assert run["status"] == "failed" and "File too large" in run["metrics"]["error"]
    assert not out.exists() and [p.name for p in out.parent.iterdir()] == [".full.lock"]  # no staging folder left


def test_a_finetune_runs_weights_are_readable_by_whoever_can_read_its_folder(base_dir, store, tmp_path):
    """safetensors writes its file as a 0o600 temporary renamed into place: `model.safetensors` and the adapter's
    weights were the only files of `--out` another account could not read (the app serving the run as another user:
    "Permission denied"), while config.json beside them was 0o644. They get the mode of any file the process makes."""
    import stat

    out = tmp_path / "runs" / "shared"
    ft.finetune(settings(base_dir, store, out), store=store, progress=False)
    plain = tmp_path / "plain"
    plain.write_bytes(b"x")
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(out / "config.json") == mode(plain)
    assert mode(out / "model.safetensors") == mode(plain)
    assert mode(out / "adapters" / "shared" / "adapter_model.safetensors") == mode(plain)


def test_a_second_run_into_the_same_out_is_refused_while_the_first_runs(base_dir, store, tmp_path, monkeypatch):
    """Two runs into one --out at once both ended "finished" in the store with the same adapter_path, and the folder
    held the weights of whichever swapped in last. A run started while another writes its --out is refused in one
    line, exit 2, before it records a run; the lock file left beside --out stops no later run."""
    import subprocess
    import sys

    from tests.helpers import ROOT

    out = tmp_path / "runs" / "twice"
    args = ["--db", str(store.path), "--base", str(base_dir), "--out", str(out), "--steps", "2", "--batch-size", "2",
            "--threads", "1", "--replay-ratio", "0"]
    second = []
    real = corrections.FinetuneCollator.corrections

    def start_another_run(*a, **kw):  # the first run is training: a second one into its --out starts meanwhile
        if not second:
            second.append(subprocess.run([sys.executable, "-m", "training.finetune", *args], capture_output=True,
                                         text=True, timeout=300, cwd=ROOT,
                                         env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")))
        return real(*a, **kw)

    monkeypatch.setattr(corrections.FinetuneCollator, "corrections", start_another_run)
    assert ft.main(args) == 0
    [proc] = second
    refusal = [line for line in proc.stderr.splitlines() if "no --replay-data" not in line]
    assert proc.returncode == 2 and refusal == [f"finetune: --out {out.resolve()}: another finetune run is writing "
                                                "it right now; let it finish, then run the command again (or give "
                                                "another --out)"], proc.stderr
    [run] = store.list_finetune_runs()  # the refused run recorded nothing
    assert run["status"] == "finished" and json.loads((out / "finetune.json").read_text())["run_id"] == run["id"]
    monkeypatch.undo()
    assert ft.main(args) == 0  # the lock file the first run left is no obstacle
    assert sorted(p.name for p in out.parent.iterdir()) == [".twice.lock", "twice"]


def test_a_db_that_is_an_empty_file_is_refused_and_left_as_it_was(base_dir, tmp_path, capsys):
    """`--db` a 0-byte file (a `touch`ed name, a failed copy) was made a new empty store (73 KB of tables), where
    finetune records its runs, before it said "no usable corrections". It is refused in one line, as
    `training.export` refuses it (the store opened with create=False), and left empty; a missing file is not made."""
    empty, missing = tmp_path / "zero.db", tmp_path / "missing.db"
    empty.write_bytes(b"")
    out = tmp_path / "runs" / "zero"
    assert ft.main(["--db", str(empty), "--base", str(base_dir), "--out", str(out), "--steps", "1"]) == 2
    refusal = [line for line in capsys.readouterr().err.splitlines() if "no --replay-data" not in line]
    assert refusal == [f"finetune: {empty} is not an annotation store (an empty file); it was left as it was"]
    assert empty.read_bytes() == b"" and not out.exists()
    for db, said in ((empty, "an empty file"), (missing, "no annotation store at")):
        with pytest.raises(StoreError, match=said):
            ft.finetune(ft.FinetuneSettings(db=db, base=base_dir, out=out, steps=1), progress=False)
    assert empty.read_bytes() == b"" and not missing.exists()


def test_two_runs_starting_at_once_never_move_the_same_folder(base_dir, store, tmp_path, monkeypatch):
    """A run killed between the two renames of its swap leaves the previous output as `.NAME.old-TAG` and no --out;
    the next run puts it back. That was done before the run took its lock, so two runs starting at once both put it
    back: the second one's rename found it gone, `[Errno 2] No such file or directory` (a traceback). Here the second
    run starts at the worst moment, just before the first one's rename: it is refused as "another finetune run",
    and the first puts the output back."""
    import subprocess

    from pixelllm.files import writer_tag

    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "runs" / "ft"
    old = out.with_name(f".ft.old-{writer_tag(dead.pid)}")
    old.mkdir(parents=True)
    (old / "finetune.json").write_text("{}")
    second = []
    real_replace = os.replace

    def second_run_meanwhile(source, target):
        if Path(source) == old and not second:
            second.append("started")
            try:
                ft.finetune(settings(base_dir, store, out), store=store, progress=False)
            except ValueError as err:
                second.append(str(err))
        return real_replace(source, target)

    monkeypatch.setattr(ft.os, "replace", second_run_meanwhile)
    monkeypatch.setattr(ft, "_run", lambda *args: {"trained": True})  # what the lock guards is before training
    assert ft.finetune(settings(base_dir, store, out), store=store, progress=False) == {"trained": True}
    assert second == ["started", f"--out {out.resolve()}: another finetune run is writing it right now; let it "
                                 "finish, then run the command again (or give another --out)"]
    assert (out / "finetune.json").read_text() == "{}" and not old.exists()
