"""training.simulate_annotators: a plumbing smoke run with tiny sizes (a random model cannot learn anything
in 2 steps, so it checks that every stage runs and reports, not the acceptance numbers, which come from the real
checkpoint run), its report, and the `--work`, `--json` and other flags it refuses before any work."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pixelllm.store import AnnotationStore


def test_simulate_annotators_refuses_a_work_folder_it_did_not_make(base_dir, tmp_path, capsys):
    """A run recreates <work>/data, images/ and annotations.db: `--work .` would have removed the project's data/
    with its annotation store. A folder an earlier run made (or an empty one) is still taken."""
    from training import simulate_annotators as sim

    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "annotations.db").write_bytes(b"SQLite format 3\x00 the team's corrections")
    (project / "notes.txt").write_text("keep")
    assert sim.main(["--base", str(base_dir), "--work", str(project), "--no-progress"]) == 2
    assert "is not a simulate_annotators work folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="not a simulate_annotators work folder"):
        sim.run(sim.SimulateSettings(base=str(base_dir), work=str(project)))
    assert (project / "data" / "annotations.db").read_bytes().endswith(b"the team's corrections")
    assert sim.main(["--base", str(base_dir), "--work", str(project / "notes.txt"), "--no-progress"]) == 2
    assert "is a file" in capsys.readouterr().err

    earlier = tmp_path / "earlier"  # a run from before the marker: its simulate.json says it is ours
    (earlier / "data").mkdir(parents=True)
    (earlier / "simulate.json").write_text("{}")
    sim.check_work(earlier)
    sim.check_work(tmp_path / "new")


def test_simulate_annotators_smoke(base_dir, tmp_path, capsys):
    """Plumbing only (random model, 2 steps): shift data -> logged generations -> corrections -> finetune ->
    before/after table and JSON. The acceptance numbers come from the real checkpoint, not from this test."""
    from training import simulate_annotators as sim

    work = tmp_path / "simulate"
    code = sim.main(["--base", str(base_dir), "--work", str(work), "--corrections", "3", "--steps", "2",
                     "--batch-size", "2", "--replay-images", "2", "--shift-eval-images", "2",
                     "--base-eval-images", "2", "--image-size", "64", "--max-new-tokens", "4", "--max-words", "3",
                     "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "cross loc-caption accuracy" in printed and "referring P@0.5" in printed and "acceptance:" in printed
    result = json.loads((work / "simulate.json").read_text())
    assert result["collected"]["corrections"] == 3
    assert result["finetune_run"]["status"] == "finished" and result["finetune_run"]["num_corrections"] == 3
    assert result["adapter_active_after_load"] == "simulated-cross"
    assert result["after"]["shift"]["objects"] >= 2 and result["before"]["base"]["images"] == 2
    with AnnotationStore(work / "annotations.db") as store:
        gens = store.list_generations()
        assert len(gens) == 3 and all(g["task"] == "caption" and g["prompts"]["box"] for g in gens)
        assert all(g["session"] == "simulate_annotators" for g in gens)  # logged by the app's /caption function
        rows = store.training_examples()
        assert len(rows) == 3 and all(r["words"][-1] == "cross" and r["annotator"] == sim.ANNOTATOR for r in rows)
    assert (work / sim.WORK_MARKER).is_file()  # a second run into the same folder is taken
    sim.check_work(work)


def test_simulation_report_prints_a_change_that_rounds_to_zero_as_zero():
    from training.simulate_annotators import _points

    assert str(_points(0.8421, 0.8420)) == "0.0"  # was "-0.0" in the report
    assert _points(0.5, 0.4) == -10.0 and _points(None, 0.4) is None


def test_simulate_annotators_refuses_bad_flags_and_an_unwritable_json_before_any_work(base_dir, tmp_path, capsys,
                                                                                      monkeypatch):
    """A typo in a finetuning flag (`--replay-tasks region_bx=1`, `--steps 0`) failed with a traceback after the
    data had been generated and the corrections collected; an unwritable `--json` after the whole run (minutes),
    losing its results. Each is one line, exit 2, before anything is made."""
    from training import simulate_annotators as sim

    def no_work(*args, **kwargs):
        raise AssertionError("the run started")

    monkeypatch.setattr(sim, "make_splits", no_work)
    (tmp_path / "a-file").write_text("x")
    work = tmp_path / "simulate"
    for flags, match in ((["--replay-tasks", "region_bx=1"], "unknown replay tasks"),
                         (["--steps", "0"], "steps and batch size must be at least 1"),
                         (["--corrections", "0"], "--corrections 0: must be at least 1"),
                         (["--json", str(tmp_path)], "is a folder"),
                         (["--json", str(tmp_path / "a-file" / "simulate.json")], "cannot write in")):
        code = sim.main(["--base", str(base_dir), "--work", str(work), "--no-progress", *flags])
        err = capsys.readouterr().err
        assert code == 2 and match in err and "Traceback" not in err, (flags, err)
        assert not work.exists()


def test_simulate_annotators_takes_a_json_in_a_subfolder_of_a_new_work_folder(base_dir, tmp_path, monkeypatch):
    """The --json check made the folder of `--json runs/simulate/results/sim.json` before the run began, so the run
    refused its own new `--work runs/simulate` as "holds files and is not a simulate_annotators work folder" (a
    ValueError traceback). The check leaves no folder behind; the run starts."""
    from training import simulate_annotators as sim

    class Started(Exception):
        pass

    def started(*args, **kwargs):
        raise Started

    monkeypatch.setattr(sim, "make_splits", started)
    work = tmp_path / "simulate"
    with pytest.raises(Started):
        sim.main(["--base", str(base_dir), "--work", str(work), "--no-progress", "--json",
                  str(work / "results" / "sim.json")])


def test_the_simulation_reports_change_is_the_change_of_the_values_it_shows():
    """The change column came from the unrounded values: 0.8514 -> 0.8526 was shown as 0.851 -> 0.853 with a change
    of +0.1 points (0.12 rounded) beside a visible +0.2. Every row's change is now the difference of its two shown
    values, and the acceptance verdict reads the same figure."""
    from training.simulate_annotators import SimulateSettings, report

    def result(shift: float, base: float) -> dict:
        return {"shift": {"accuracy": shift, "objects": 10},
                "base": {"loc_caption_accuracy": base, "refer_p@0.5": base, "mask_mean_iou": base, "objects": 20,
                         "expressions": 30}}

    rng = np.random.default_rng(0)
    pairs = [(0.8514, 0.8526), *rng.uniform(0, 1, (20, 2))]
    for before, after in pairs:
        table, verdict = report(result(before, 1 - before), result(after, 1 - after), SimulateSettings("b", "w"))
        for row in table.splitlines()[2:]:
            shown_before, shown_after, change = (float(cell) for cell in row.split()[-3:])
            assert change == round(100 * (shown_after - shown_before), 1), row
        assert verdict["shift_gain_points"] == float(table.splitlines()[2].split()[-1])
    table, _ = report(result(0.8514, 0.5), result(0.8526, 0.5), SimulateSettings("b", "w"))
    assert table.splitlines()[2].split()[-3:] == ["0.851", "0.853", "0.200"]
