"""Whole runs of `python -m training.train` (marker `slow`): kill-and-resume ends bit-identical to a run never
interrupted (weights, metrics rows, random numbers), a stage's config holds for that stage only, a stage appended
to a finished run trains as in one run, and DDP with two gloo processes."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import free_port
from tests.training.conftest import SMALL_OVERRIDES, _config, _finish, _train


def _uninterrupted_run(tmp: Path, steps: tuple[int, int]) -> Path:
    """The reference: the config run once from start to end in `tmp/straight`; returns that folder."""
    straight = tmp / "straight"
    straight.mkdir()
    _finish(_train(_config(straight, steps)))
    return straight


def _assert_same_final_weights(a_dir: Path, b_dir: Path) -> None:
    a = load_file(str(a_dir / "run" / "final" / "model.safetensors"))
    b = load_file(str(b_dir / "run" / "final" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


@pytest.mark.slow
def test_kill_and_resume_reproduces_an_uninterrupted_run(tmp_path):
    """SIGKILL mid-run, restart the same command: it resumes from the last checkpoint and ends with weights
    bit-identical to a run that was never interrupted (sampler, optimizer and schedule state restored)."""
    steps = (4, 8)
    straight = _uninterrupted_run(tmp_path, steps)

    killed = tmp_path / "killed"
    killed.mkdir()
    config = _config(killed, steps)
    proc = _train(config)
    state = killed / "run" / "checkpoint" / "trainer_state.pt"
    deadline = time.time() + 300
    while time.time() < deadline:
        if state.is_file() and torch.load(state, weights_only=True)["step"] >= 6:
            break
        time.sleep(0.2)
    else:
        proc.kill()
        pytest.fail("no checkpoint at step >= 6 within 300 s")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_at = torch.load(state, weights_only=True)["step"]
    assert resumed_at < sum(steps), "killed too late to test resuming"
    # a row the killed run logged after its last checkpoint (whether the kill landed there is up to timing)
    with open(killed / "run" / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"step": resumed_at + 1, "stage": "multitask", "task": "lost", "loss": 0.0}) + "\n")
        handle.write('{"step": 1')  # and a line the kill cut short
    out = _finish(_train(config))
    assert "resume from step" in out and "resume from step 0" not in out
    _assert_same_final_weights(straight, killed)

    def curve(folder: Path) -> list[tuple]:
        lines = (folder / "run" / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["task"], r["loss"]) for r in map(json.loads, lines)]

    assert curve(killed) == curve(straight)  # one row per step and task, none from the lost steps
    # the runs include both grouped tasks (image_index with a shared prompt and with per-row box prompts)
    assert {"refer_image", "region_image"} <= {task for _, task, _ in curve(killed)}
    assert (killed / "run" / "loss_curves.png").stat().st_size > 1000


# The same command, but the process dies right after writing its step-4 checkpoint (a SIGKILL at that point)
_KILLED_AFTER_STEP_4 = """import os, sys
import training.train as train
save = train.save_checkpoint
def save_then_die(out, model, state):
    save(out, model, state)
    if state["step"] == 4:
        os._exit(9)
train.save_checkpoint = save_then_die
sys.exit(train.main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_a_resume_draws_the_same_random_numbers_and_logs_the_same_rows(tmp_path):
    """Scheduled sampling draws from torch's global RNG (so do dropout and LoRA dropout), which no checkpoint
    holds; and a log row can span a checkpoint (log_every 3, checkpoint_every 2). A run killed right after its
    step-4 checkpoint and resumed ends with the weights and the metrics rows of the run never interrupted."""
    def config(folder: Path) -> Path:
        folder.mkdir()
        path = _config(folder, (2, 4))
        cfg = yaml.safe_load(path.read_text())
        cfg["train"]["log_every"] = 3
        cfg["stages"][1]["config"]["scheduled_sampling"] = 0.5
        cfg["stages"][1]["tasks"] = {"narrative": 1, "sentence": 1}
        path.write_text(yaml.safe_dump(cfg))
        return path

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _finish(_train(config(straight)))
    killed_config = config(killed)
    proc = _train(killed_config, launcher=[sys.executable, "-c", _KILLED_AFTER_STEP_4])
    proc.communicate(timeout=600)
    assert proc.returncode == 9
    assert "resume from step 4" in _finish(_train(killed_config))
    _assert_same_final_weights(straight, killed)

    def rows(folder: Path) -> list[tuple]:
        lines = (folder / "run" / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r["task"], r["loss"]) for r in map(json.loads, lines)]

    assert rows(killed) == rows(straight)
    assert {step for step, *_ in rows(straight)} == {2, 3, 6}  # each stage's last steps are logged at its end


@pytest.mark.slow
def test_a_stage_config_holds_for_its_stage_only_and_a_zero_weight_drops_its_term(tmp_path):
    """The paper recipes' captioning stage sets loc_loss_weight and proposal_weight to 0 (frozen heads must not
    train the rest towards them): no location or proposal term in that stage's rows, and the next stage, which
    sets neither, is back at the recipe's values (a stage's config used to carry into every later stage)."""
    path = _config(tmp_path, (2, 2))
    cfg = yaml.safe_load(path.read_text())
    cfg["train"]["checkpoint_every"] = 100
    cfg["stages"][0]["config"] = {"loc_loss_weight": 0.0, "proposal_weight": 0.0}
    cfg["stages"][0]["tasks"] = cfg["stages"][1]["tasks"] = {"narrative": 1}
    path.write_text(yaml.safe_dump(cfg))
    _finish(_train(path))
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first, second = ([r for r in rows if r["stage"] == name] for name in ("caption_pretraining", "multitask"))
    assert first and not any("location" in r or "proposal_heatmap" in r for r in first)
    assert second and all(r["location"] > 0 and r["proposal_heatmap"] > 0 for r in second)
    saved = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    from pixelllm.config import get_config

    recipe = get_config("tiny", **SMALL_OVERRIDES)
    assert (saved["loc_loss_weight"], saved["proposal_weight"]) == (recipe.loc_loss_weight, recipe.proposal_weight)


@pytest.mark.slow
def test_a_stage_appended_to_a_finished_run_trains_as_in_one_run(tmp_path):
    """Rerunning a finished run's folder with one more stage in its config resumes at the stage boundary and ends
    bit-identical to running the longer config in one go: the new stage starts with a fresh optimizer and sampler,
    as in an uninterrupted run (it used to inherit the finished stage's Adam moments and stream positions)."""
    steps = (3, 3)
    straight = _uninterrupted_run(tmp_path, steps)

    appended = tmp_path / "appended"
    appended.mkdir()
    config = _config(appended, steps)
    cfg = yaml.safe_load(config.read_text())
    first = appended / "first_stage.yaml"
    first.write_text(yaml.safe_dump(dict(cfg, stages=cfg["stages"][:1])))
    _finish(_train(first))
    out = _finish(_train(config))
    assert "resume from step 3" in out
    _assert_same_final_weights(straight, appended)


@pytest.mark.slow
def test_ddp_two_gloo_processes_train(tmp_path):
    """torchrun with 2 CPU processes (gloo): trains to the end, rank 0 logs and saves, and the saved weights moved
    away from the initialisation the script starts from (same seed, same builder)."""
    config = _config(tmp_path, (3, 3), checkpoint_every=3)
    cfg = yaml.safe_load(config.read_text())
    # the second stage's steps draw refer_image, refer, refer_image: both referring batchings go through DDP
    cfg["stages"][1]["tasks"] = {"refer_image": 1, "refer": 1, "region_points": 1}
    config.write_text(yaml.safe_dump(cfg))
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port",
                str(free_port()), "-m"]  # a port nothing listens on now, not one derived from the pid
    out = _finish(_train(config, launcher=launcher))
    assert "world=2" in out
    final = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert all(np.isfinite(v.float().numpy()).all() for v in final.values())
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and max(r["step"] for r in rows) == 6
    assert {r["task"] for r in rows if r["step"] > 3} == {"refer", "refer_image"}
    assert "region_image" in {r["task"] for r in rows if r["step"] <= 3}  # per-row prompts on shared images too
    card = (tmp_path / "run" / "final" / "README.md").read_text()  # the model card says how it was trained
    assert f"--config {config}`: 6 steps" in card and "`multitask` (scratch): 3 steps, peak LR 0.002" in card
    # weights moved away from the initialisation of step 0: training happened
    from transformers import AutoTokenizer

    from pixelllm.build import build_pixelllm
    from pixelllm.config import get_config

    torch.manual_seed(0)
    cfg = get_config("tiny", **SMALL_OVERRIDES)
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "run" / "tokenizer"))
    cfg.t5.vocab_size = max(cfg.t5.vocab_size, len(tok))
    init = build_pixelllm(cfg, tokenizer=tok).state_dict()
    moved = [k for k in final if not torch.equal(init[k], final[k].to(init[k].dtype))]
    assert len(moved) > len(final) // 2, f"only {len(moved)} of {len(final)} tensors changed"
