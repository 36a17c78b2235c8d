"""`python -m training.finetune`: every flag reaches the settings, the CLI runs and refuses a missing store,
SIGTERM and Ctrl+C end a run in one line (recorded, the previous output kept), and flags it cannot use are refused
naming the flag: `--extra-targets` matching nothing or a module LoRA cannot train, `--replay-tasks` weights."""

from __future__ import annotations

import json

import pytest

from training import corrections
from training import finetune as ft


def test_every_cli_flag_reaches_the_settings():
    args = ft.build_parser().parse_args([
        "--db", "a.db", "--base", "b", "--out", "runs/c", "--name", "n", "--steps", "7", "--batch-size", "3",
        "--lr", "0.01", "--warmup", "2", "--rank", "4", "--alpha", "6", "--extra-targets", "x,y",
        "--statuses", "accepted", "--replay-data", "d", "--replay-split", "s", "--replay-ratio", "0.5",
        "--replay-mode", "alternate", "--replay-limit", "9", "--replay-tasks", "refer=2,sentence",
        "--max-tokens", "20", "--seed", "5", "--threads", "1", "--log-every", "3", "--max-minutes", "1.5"])
    assert ft.settings_from_args(args) == ft.FinetuneSettings(
        db="a.db", base="b", out="runs/c", name="n", steps=7, batch_size=3, lr=0.01, warmup=2, rank=4, alpha=6.0,
        extra_targets=("x", "y"), statuses=("accepted",), replay_data="d", replay_split="s", replay_ratio=0.5,
        replay_mode="alternate", replay_limit=9, replay_tasks={"refer": 2.0, "sentence": 1.0}, max_tokens=20,
        seed=5, threads=1, log_every=3, max_minutes=1.5)


def test_settings_take_paths(base_dir, store, tmp_path):
    made = ft.FinetuneSettings(db=store.path, base=base_dir, out=tmp_path / "o", replay_data=tmp_path)
    assert all(isinstance(v, str) for v in (made.db, made.base, made.out, made.replay_data))


def test_cli_runs_and_refuses_a_missing_store(base_dir, store, tmp_path, capsys):
    out = tmp_path / "runs" / "cli"
    code = ft.main(["--db", str(store.path), "--base", str(base_dir), "--out", str(out), "--steps", "2",
                    "--batch-size", "2", "--log-every", "1"])
    assert code == 0 and f"python app.py --checkpoint {out}" in capsys.readouterr().out
    assert (out / "adapters" / "cli" / "adapter_model.safetensors").is_file()
    assert ft.main(["--db", str(tmp_path / "nope.db"), "--out", str(out)]) == 2


def test_sigterm_ends_a_cli_run_as_a_failure_it_records(base_dir, store, tmp_path, monkeypatch):
    """A killed CLI run (SIGTERM, e.g. a job scheduler's) is recorded failed, not left 'running' forever."""
    import os
    import signal

    previous = signal.getsignal(signal.SIGTERM)

    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs before the next line
        raise AssertionError("SIGTERM did not end the run")

    monkeypatch.setattr(corrections.FinetuneCollator, "corrections", killed)
    with pytest.raises(SystemExit, match="terminated by signal 15"):
        ft.main(["--db", str(store.path), "--base", str(base_dir), "--out", str(tmp_path / "runs" / "killed"),
                 "--steps", "2", "--batch-size", "2", "--replay-ratio", "0"])
    assert signal.getsignal(signal.SIGTERM) is previous
    [run] = store.list_finetune_runs()
    assert run["status"] == "failed" and "terminated by signal 15" in run["metrics"]["error"]


def test_an_extra_target_that_matches_no_module_is_refused_before_a_run_is_recorded(base_dir, store, tmp_path,
                                                                                     capsys):
    """peft skips a target pattern that matches nothing: `--extra-targets 'loc_head\\.layerz'` (a typo) trained the
    LM's q/v only, exit 0, and the corrected boxes were never learnt; a pattern that is no regex was a `re.error`
    traceback. Both are one line now, before any run is recorded or anything is written."""
    out = tmp_path / "runs" / "typo"
    for targets, match in ((r"loc_head\.layerz", "matches no module"), (r"loc_head\.layers\.(\d+",
                                                                          "is not a regular expression")):
        code = ft.main(["--db", str(store.path), "--base", str(base_dir), "--out", str(out), "--steps", "1",
                        "--batch-size", "2", "--extra-targets", targets])
        err = capsys.readouterr().err
        assert code == 2 and match in err and "Traceback" not in err, err
    assert store.list_finetune_runs() == [] and not out.exists()


def test_ctrl_c_ends_a_cli_run_in_one_line_and_keeps_the_previous_output(base_dir, store, tmp_path, capsys,
                                                                         monkeypatch):
    """Ctrl+C (KeyboardInterrupt) in the middle of a run: one line and exit 130, like SIGTERM's one line (it was a
    60-line traceback from wherever the loop was); the run is recorded failed, the previous output stays whole
    and nothing is left beside it, so the rerun starts clean."""
    out = tmp_path / "runs" / "ctrl-c"
    args = ["--db", str(store.path), "--base", str(base_dir), "--out", str(out), "--steps", "2", "--batch-size", "2"]
    assert ft.main(args) == 0
    first = json.loads((out / "finetune.json").read_text())["run_id"]

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(corrections.FinetuneCollator, "corrections", interrupted)
    capsys.readouterr()
    try:
        code = ft.main(args)
    except KeyboardInterrupt:
        code = "KeyboardInterrupt escaped main (a traceback)"
    err = capsys.readouterr().err
    assert code == 130 and "finetune: interrupted" in err and "run the command again" in err, err
    assert [r["status"] for r in store.list_finetune_runs()] == ["failed", "finished"]  # newest first
    assert json.loads((out / "finetune.json").read_text())["run_id"] == first
    assert sorted(p.name for p in out.parent.iterdir()) == [".ctrl-c.lock", "ctrl-c"]  # no staging folder left
    monkeypatch.undo()
    assert ft.main(args) == 0 and json.loads((out / "finetune.json").read_text())["run_id"] != first


def test_a_replay_task_weight_that_is_not_a_number_names_the_flag_and_the_item(base_dir, store, tmp_path, capsys):
    """`--replay-tasks region_box=x` said only "could not convert string to float: 'x'" (finetune) or was a
    ValueError traceback (simulate_annotators); both name the flag and the item now, exit 2, before any work."""
    from training import simulate_annotators as sim

    bad = ["--replay-tasks", "refer=2,region_box=x"]
    said = "--replay-tasks 'region_box=x': the weight is not a number (give task=weight, e.g. region_box=2)"
    assert ft.main(["--db", str(store.path), "--base", str(base_dir), "--out", str(tmp_path / "ft"), *bad]) == 2
    assert f"finetune: {said}" in capsys.readouterr().err
    assert sim.main(["--base", str(base_dir), "--work", str(tmp_path / "simulate"), *bad]) == 2
    assert capsys.readouterr().err == f"error: {said}\n"
    assert store.list_finetune_runs() == [] and not (tmp_path / "ft").exists() and not (tmp_path / "simulate").exists()


def test_ctrl_c_after_the_run_is_recorded_finished_does_not_undo_it(base_dir, store, tmp_path, capsys, monkeypatch):
    """The run's last step removes the previous output (a whole checkpoint, weights included), after the new one is
    in place and the run recorded finished. Ctrl+C (or SIGTERM) there marked it failed, which the store refused:
    "finetune: finetune run 2 already ended (finished)", exit 2, for a run that had finished. The run is reported
    finished now; the next run removes what was left of the previous output."""
    import shutil

    out = tmp_path / "runs" / "late"
    args = ["--db", str(store.path), "--base", str(base_dir), "--out", str(out), "--steps", "1", "--batch-size", "2",
            "--replay-ratio", "0"]
    assert ft.main(args) == 0
    real, removals = shutil.rmtree, []

    def interrupted(path, *a, **kw):
        if f".{out.name}.old-" in str(path):
            removals.append(path)
            if len(removals) == 2:  # the first removes a stale one before the swap, the second the previous output
                raise KeyboardInterrupt
        return real(path, *a, **kw)

    monkeypatch.setattr(shutil, "rmtree", interrupted)
    capsys.readouterr()
    assert ft.main(args) == 0, capsys.readouterr().err
    assert [r["status"] for r in store.list_finetune_runs()] == ["finished", "finished"]
    assert json.loads((out / "finetune.json").read_text())["run_id"] == store.list_finetune_runs()[0]["id"]
    monkeypatch.undo()
    assert ft.main(args) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == [".late.lock", "late"]


def test_a_replay_task_weight_that_is_not_finite_or_is_negative_is_refused_naming_the_flag(base_dir, store, tmp_path,
                                                                                          capsys):
    """`--replay-tasks region_box=inf` (or nan) passed as a number and failed after the model had loaded with "params
    must be JSON-serialisable without NaN or infinity: Out of range float values are not JSON compliant";
    `region_box=-1` trained without that task, exit 0. Each is one line naming the flag and the item, exit 2."""
    for weight in ("inf", "nan", "-1"):
        args = ["--db", str(store.path), "--base", str(base_dir), "--out", str(tmp_path / "ft"), "--steps", "1",
                "--replay-tasks", f"refer=2,region_box={weight}"]
        assert ft.main(args) == 2, weight
        assert f"finetune: --replay-tasks 'region_box={weight}': the weight must be finite and at least 0" \
            in capsys.readouterr().err
    assert store.list_finetune_runs() == [] and not (tmp_path / "ft").exists()


def test_an_extra_target_lora_cannot_train_is_refused_naming_the_modules(base_dir, store, tmp_path, capsys):
    """`--extra-targets` matching the image encoder ended in a RuntimeError traceback once the adapter was made; a
    block (`loc_head`) or a norm layer in peft's error printing the whole module; an embedding, or a layer of the
    mask or proposal head, trained nothing, exit 0 (an embedding's LoRA tensors were never set to train; no loss
    reaches those heads in finetuning). One line each, naming the modules, before a run is recorded."""
    out = tmp_path / "runs" / "where"
    for targets, said in (
        (r"image_encoder\.sam_encoder\.blocks\.\d+\.attn\.qkv", "image_encoder.sam_encoder.blocks.0.attn.qkv (Linear), "
         "image_encoder.sam_encoder.blocks.1.attn.qkv (Linear): the image encoder stays frozen"),
        ("loc_head", "loc_head (LocationHead): finetuning trains LoRA on Linear layers only"),
        (r"language_model\.encoder\.final_layer_norm", "final_layer_norm (T5LayerNorm): finetuning trains LoRA on"),
        (r"language_model\.shared", "language_model.shared (Embedding): finetuning trains LoRA on Linear layers"),
        (r"mask_head\..*\.q_proj", "q_proj (Linear) and 4 more: finetuning computes no loss through the proposal "
                                   "and mask heads"),
    ):
        code = ft.main(["--db", str(store.path), "--base", str(base_dir), "--out", str(out), "--steps", "1",
                        "--batch-size", "2", "--extra-targets", targets])
        err = capsys.readouterr().err
        refusal = [line for line in err.splitlines() if "no --replay-data" not in line]
        assert code == 2 and len(refusal) == 1 and said in refusal[0], err
        assert refusal[0].startswith(f"finetune: --extra-targets {targets} matches "), err
    assert store.list_finetune_runs() == [] and not out.exists()
