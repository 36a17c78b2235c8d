"""The run folder and what is written there: the export's place, a folder holding another run or a corrupt
checkpoint, decoding defaults changed on resume, a missing split or broken data line, folders that cannot be
written, a full disk at the final save or a checkpoint, and Ctrl+C (alone and under torchrun)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import run_with_file_size_limit
from tests.training.conftest import ROOT, _config, _env, _finish, _train


def test_the_export_goes_under_the_run_and_never_replaces_someone_elses_folder(tmp_path):
    """`export:` writes `<train.out>/export` unless `export.dir` says otherwise; the folder is replaced at the end,
    so one that is not a checkpoint is refused before any work."""
    from pixelllm import PixelLLM
    from training.train import main

    config = _config(tmp_path, (1, 1))
    cfg = yaml.safe_load(config.read_text())
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    cfg["export"] = {"dir": str(mine), "dtype": "float16"}
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit, match="not a checkpoint folder"):
        main(["--config", str(config)])
    assert not (tmp_path / "data").exists() and (mine / "notes.txt").read_text() == "keep me"
    for holds_the_run in (tmp_path / "run", tmp_path):
        cfg["export"]["dir"] = str(holds_the_run)
        config.write_text(yaml.safe_dump(cfg))
        with pytest.raises(SystemExit, match="it is train.out or holds it"):
            main(["--config", str(config)])
    del cfg["export"]["dir"]
    config.write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(config)]) == 0
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "run" / "export" / "model.safetensors")
    assert {v.dtype for v in weights.values() if v.is_floating_point()} == {torch.float16}
    assert PixelLLM.from_pretrained(tmp_path / "run" / "export").config.preset == "tiny"
    assert main(["--config", str(config)]) == 0  # run again: its own earlier export is replaced


def test_a_run_folder_holding_another_run_or_a_corrupt_checkpoint_is_refused_and_kept(tmp_path):
    """train.out holding a run of another model used to be resumed silently: that run's weights trained on under
    the new config, whose config.resolved.json then described a model the folder does not hold, and `final/` was
    replaced. A truncated checkpoint ended in a safetensors traceback."""
    from training.train import main

    config = _config(tmp_path, (1, 1))
    assert main(["--config", str(config)]) == 0
    run = tmp_path / "run"
    before = {p: p.read_bytes() for p in (run / "final" / "model.safetensors", run / "config.resolved.json")}
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["overrides"]["t5"]["d_model"] = 96
    cfg["stages"][1]["steps"] = 2
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit, match=r"holds another run .* model: section: model.overrides.t5.d_model\)"):
        main(["--config", str(other)])
    assert {p: p.read_bytes() for p in before} == before
    weights = run / "checkpoint" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    longer = yaml.safe_load(config.read_text())
    longer["stages"][1]["steps"] = 2
    config.write_text(yaml.safe_dump(longer))
    with pytest.raises(SystemExit, match=r"cannot resume from .*checkpoint.*model.safetensors"):
        main(["--config", str(config)])
    assert {p: p.read_bytes() for p in before} == before


def test_a_resumed_run_may_change_its_decoding_defaults(tmp_path, capsys):
    """A decoding default under model: (repetition_penalty, max_new_tokens) changes no weight: a run extended with a
    new one used to be refused as "another run"; it resumes, and its final/ and export carry the new default."""
    from training.train import main

    config = _config(tmp_path, (1, 1))
    assert main(["--config", str(config)]) == 0
    cfg = yaml.safe_load(config.read_text())
    cfg["stages"][1]["steps"] = 2
    cfg["model"]["overrides"]["repetition_penalty"] = 1.3
    cfg["model"]["overrides"]["max_new_tokens"] = 40
    config.write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(config)]) == 0
    final = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert (final["repetition_penalty"], final["max_new_tokens"]) == (1.3, 40)
    assert "resume from step 2" in capsys.readouterr().out
    cfg["model"]["overrides"]["repetition_penalty"] = 1.0
    cfg["model"]["overrides"]["roi_grid"] = 2  # a change of the weights' meaning is still refused
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit, match=r"holds another run .*model.overrides.roi_grid\)"):
        main(["--config", str(config)])


def test_a_failed_final_save_keeps_the_previous_final_and_export(tmp_path, monkeypatch):
    """The end of a run replaced final/ in place and deleted the export before writing the new one: a full disk
    there lost the last good model. Now each is written beside and swapped in."""
    import errno

    from pixelllm import PixelLLM
    from training.train import main

    config = _config(tmp_path, (1, 1))
    cfg = yaml.safe_load(config.read_text())
    cfg["export"] = {"dir": str(tmp_path / "export")}
    config.write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(config)]) == 0
    kept = [tmp_path / "run" / "final" / "model.safetensors", tmp_path / "export" / "model.safetensors"]
    before = {p: p.read_bytes() for p in kept}
    cfg["stages"][1]["steps"] = 2  # one more step, resumed: the weights change
    config.write_text(yaml.safe_dump(cfg))
    real = PixelLLM.save_pretrained

    def full_disk_at(name: str):
        def save(self, folder, *args, **kwargs):
            real(self, folder, *args, **kwargs)
            if Path(folder).name == name:  # written (in part, as a full disk would leave it), then the error
                raise OSError(errno.ENOSPC, "No space left on device")
        return save

    neighbour = tmp_path / "export.old"  # someone's backup beside the export folder: never touched
    (neighbour / "keep.txt").parent.mkdir()
    (neighbour / "keep.txt").write_text("mine")
    for name, unchanged in (("final.tmp", kept), (".export.swap-tmp", kept[1:])):  # final/ is saved first
        monkeypatch.setattr(PixelLLM, "save_pretrained", full_disk_at(name))
        with pytest.raises(SystemExit, match=r"cannot save .*No space left on device.* is kept as it was"):
            main(["--config", str(config)])
        assert all(p.read_bytes() == before[p] for p in unchanged), name
        assert not list(tmp_path.glob("**/*.tmp")) and not list(tmp_path.glob("**/*.swap-*")), name
    monkeypatch.setattr(PixelLLM, "save_pretrained", real)
    assert main(["--config", str(config)]) == 0  # with room again, the run ends and both are replaced
    assert all(p.read_bytes() != before[p] for p in kept)
    assert (neighbour / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("damage, match", [
    ("no split", r"data.root .*: no split 'elsewhere' there"),
    ("a broken line", r"data: .*train.refer.jsonl, line 2: not JSON"),
])
def test_a_missing_split_or_a_broken_data_line_is_one_line(tmp_path, damage, match):
    """A typo'd split (or data.root) ended in a FileNotFoundError traceback; a broken JSONL line in json's own
    words, without the file."""
    from training.data.shapes import generate_split
    from training.train import main

    config = _config(tmp_path, (1, 1))
    cfg = yaml.safe_load(config.read_text())
    cfg["data"].pop("generate")
    generate_split(tmp_path / "data", "train", 4, seed=5)
    if damage == "no split":
        cfg["data"]["train_split"] = "elsewhere"
    else:
        refer = tmp_path / "data" / "train.refer.jsonl"
        lines = refer.read_text().splitlines()
        refer.write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit, match=match):
        main(["--config", str(config)])
    assert not (tmp_path / "run" / "final").exists()


UNPRIVILEGED_TRAIN = """
import os, sys
import training.train  # imported while privileged: after setuid the interpreter's own modules may be unreadable
os.setgid(65534)
os.setuid(65534)  # root ignores file modes: act as nobody so read-only really is read-only
try:
    training.train.main(["--config", sys.argv[1]])
except SystemExit as exc:
    print("REFUSED", exc)
"""


@pytest.mark.parametrize("where", ["train.out", "export.dir"])
def test_a_train_out_or_export_folder_that_cannot_be_written_is_refused_before_any_work(where):
    """A read-only train.out was an OSError traceback at the tokenizer; a read-only export folder (or a file in
    the way) failed only after the whole run, at the export."""
    import shutil
    import tempfile

    from training.train import main

    top = Path(tempfile.mkdtemp(prefix="pixelllm-train-"))
    try:
        top.chmod(0o777)
        config = _config(top, (1, 1))
        cfg = yaml.safe_load(config.read_text())
        blocker = top / "a-file"
        blocker.write_text("not a folder")
        target = blocker / "run" if where == "train.out" else blocker / "export"
        if where == "train.out":
            cfg["train"]["out"] = str(target)
        else:
            cfg["export"] = {"dir": str(target), "dtype": "float16"}
        config.write_text(yaml.safe_dump(cfg))
        with pytest.raises(SystemExit, match=rf"{where} {re.escape(str(target))}.*cannot write there"):
            main(["--config", str(config)])
        assert not (top / "data").exists() and blocker.read_text() == "not a folder"

        locked = top / "locked"
        locked.mkdir(mode=0o555)
        locked.chmod(0o555)
        target = locked / "run" if where == "train.out" else locked / "export"
        if where == "train.out":
            cfg["train"]["out"] = str(locked)
        else:
            cfg["export"]["dir"] = str(target)
        config.write_text(yaml.safe_dump(cfg))
        config.chmod(0o644)
        shutil.rmtree(top / "run", ignore_errors=True)  # made by root above; nobody could not write it
        if os.geteuid() == 0:
            proc = subprocess.run([sys.executable, "-c", UNPRIVILEGED_TRAIN, str(config)], capture_output=True,
                                  text=True, timeout=120, cwd=ROOT, env=_env())
            said = proc.stdout + proc.stderr
        else:
            with pytest.raises(SystemExit) as refused:
                main(["--config", str(config)])
            said = f"REFUSED {refused.value}"
        shown = str(locked) if where == "train.out" else str(target)
        assert re.search(rf"REFUSED {where} {re.escape(shown)}.*cannot write there \(Permission denied\)", said), said
        assert "Traceback" not in said and not (top / "data").exists() and list(locked.iterdir()) == []
    finally:
        for p in [top, *top.rglob("*")]:
            p.chmod(0o777)
        shutil.rmtree(top, ignore_errors=True)


def test_a_checkpoint_that_does_not_fit_on_the_disk_is_one_line_and_resumable(tmp_path):
    """A failed checkpoint write was a traceback: safetensors' SafetensorError, or torch.save's "unexpected pos"
    RuntimeError, neither an OSError. Here the write really fails (a file-size limit on the process)."""
    from training.data.shapes import generate_split

    config = _config(tmp_path, (1, 2), checkpoint_every=1)
    cfg = yaml.safe_load(config.read_text())
    spec = cfg["data"]["generate"]["train"]
    generate_split(tmp_path / "data", "train", spec["num"], spec["seed"])  # before the limit: the data files are big
    limit = 300_000
    proc = run_with_file_size_limit("training.train", limit, "--config", str(config))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert re.search(r"cannot save .*checkpoint: cannot write .*model.safetensors.*File too large.* is kept as it "
                     r"was", proc.stderr), proc.stderr
    run = tmp_path / "run"
    assert not (run / "checkpoint").exists() and not list(run.glob("*.tmp")), list(run.iterdir())
    _finish(_train(config))  # with room, the same command trains the run
    weights = (run / "final" / "model.safetensors").stat().st_size
    assert weights > limit
    # room for the weights but not for the optimizer's state beside them (torch.save)
    proc = run_with_file_size_limit("training.train", weights + 20_000, "--config", str(config),
                                    f"--train.out={tmp_path / 'second'}")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert re.search(r"cannot save .*second/checkpoint: .*File too large; checkpoint is kept as it was",
                     proc.stderr), proc.stderr


def test_ctrl_c_is_one_line_naming_the_step_the_rerun_resumes_from(tmp_path, monkeypatch, capsys):
    """Ctrl+C, the usual way to stop a run, was a KeyboardInterrupt traceback from wherever the loop was (often
    matplotlib's plot of the loss curves), exit 1. One line now, exit 130, saying where the rerun starts."""
    import training.train as train
    from training.data.sampling import MultiTaskSampler

    config = _config(tmp_path, (2, 2), checkpoint_every=2)
    draw = MultiTaskSampler.draw

    def ctrl_c_at(at: int):
        def drawn(self, step):
            if step == at:
                raise KeyboardInterrupt
            return draw(self, step)
        return drawn

    checkpoint = tmp_path / "run" / "checkpoint"
    for at, said in ((1, "no checkpoint was saved yet: the same command starts the run over"),
                     (3, f"{checkpoint} holds step 2: run the same command again to resume from there")):
        monkeypatch.setattr(MultiTaskSampler, "draw", ctrl_c_at(at))
        try:
            code = train.main(["--config", str(config)])
        except KeyboardInterrupt:  # not let through: pytest would take it for the user's own Ctrl+C and stop
            pytest.fail("Ctrl+C escaped training.train as a KeyboardInterrupt traceback")
        assert code == 130
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.strip().splitlines()[-1] == f"train: interrupted; {said}", err
    monkeypatch.setattr(MultiTaskSampler, "draw", draw)
    assert train.main(["--config", str(config)]) == 0
    assert "resume from step 2" in capsys.readouterr().out


def test_ctrl_c_under_torchrun_is_said_by_rank_0_only(tmp_path, monkeypatch, capsys):
    """torchrun gives every rank the Ctrl+C: only rank 0 says where the rerun resumes (and reads the checkpoint's
    trainer state for it); the other ranks exit 130 without a line of their own."""
    import training.train as train

    config = _config(tmp_path, (2, 2), checkpoint_every=2)
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    torch.save({"step": 2, "optimizer": {}}, tmp_path / "run" / "checkpoint" / "trainer_state.pt")
    (tmp_path / "run" / "checkpoint" / "model.safetensors").write_bytes(b"")

    def ctrl_c(cfg, path):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "train", ctrl_c)
    loads = []
    monkeypatch.setattr(train.torch, "load", lambda *a, **k: loads.append(a) or {"step": 2})
    monkeypatch.setenv("RANK", "1")
    assert train.main(["--config", str(config)]) == 130
    assert capsys.readouterr().err == "" and loads == []
    monkeypatch.setenv("RANK", "0")
    assert train.main(["--config", str(config)]) == 130
    assert "holds step 2" in capsys.readouterr().err and len(loads) == 1
