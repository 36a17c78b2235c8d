"""The training script: one process, DDP with 2 gloo processes, and kill-and-resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import free_port
from tests.helpers import run_with_file_size_limit
from training.data.sampling import TaskStream

ROOT = Path(__file__).resolve().parents[1]

SMALL_OVERRIDES = {
    "image_encoder": {"img_size": 64, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2, "window_size": 4,
                      "global_attn_indexes": [1]},
    "prompt_embed_dim": 32, "num_query_tokens": 8, "extractor_heads": 2, "extractor_mlp_dim": 64,
    "mask_decoder_heads": 2, "mask_decoder_mlp_dim": 64, "loc_head_hidden": 64, "proposal_channels": 16,
    "roi_position": "sine", "refer_prompt": "refer:",  # as the shipped recipe (shapes_tiny.yaml)
    "t5": {"vocab_size": 400, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2, "num_decoder_layers": 2,
           "num_heads": 4, "dropout_rate": 0.0, "tie_word_embeddings": True},
}


def _config(tmp: Path, steps: tuple[int, int], checkpoint_every: int = 2) -> Path:
    cfg = {
        "model": {"preset": "tiny", "init": "scratch", "overrides": SMALL_OVERRIDES},
        "data": {"root": str(tmp / "data"), "train_split": "train", "generate": {"train": {"num": 12, "seed": 5}}},
        "train": {"out": str(tmp / "run"), "batch_size": 4, "lr": 2e-3, "lm_lr_scale": 0.1, "warmup": 2, "seed": 0,
                  "threads": 1,
                  "log_every": 1, "checkpoint_every": checkpoint_every, "max_tokens": 48,
                  "task_batch_size": {"refer_image": 2, "region_image": 2}, "refer_per_image": 3,
                  "region_per_image": 2},
        "stages": [
            {"name": "caption_pretraining", "stage": "scratch", "steps": steps[0],
             "tasks": {"narrative": 1, "region_box": 1, "region_image": 1}},
            {"name": "multitask", "stage": "scratch", "steps": steps[1], "config": {"attn_supervision_weight": 1.0},
             "tasks": {"narrative": 1, "sentence": 1, "prefix": 1, "region_box": 1, "region_points": 1, "refer": 1,
                       "refer_image": 1}},
        ],
    }
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_language_model_trains_at_its_own_learning_rate():
    """Adam's first step moves every weight by about the LR: T5's weights by lm_lr_scale x the others'."""
    from tests.helpers import small_model
    from training.train import param_groups

    model = small_model().train()
    named = list(model.named_parameters())
    before = {n: p.detach().clone() for n, p in named}
    groups = param_groups(named, weight_decay=0.0, lm_lr_scale=0.1)
    optimizer = torch.optim.AdamW(groups, lr=1.0)
    for group in optimizer.param_groups:
        group["lr"] = group["lr_scale"] * 1e-2
    batch = {"images": torch.rand(2, 3, 64, 64) * 255, "labels": torch.tensor([[5, 6, 1], [7, 8, 1]]),
             "token_boxes": torch.rand(2, 3, 4), "token_box_mask": torch.ones(2, 3, dtype=torch.bool)}
    model(batch)["loss"].backward()
    optimizer.step()
    steps = {n: float((p.detach() - before[n]).abs().max()) for n, p in named if p.grad is not None}
    lm = [v for n, v in steps.items() if n.startswith("language_model.")]
    rest = [v for n, v in steps.items() if not n.startswith("language_model.")]
    assert lm and rest
    assert max(lm) == pytest.approx(1e-3, rel=0.05)
    assert max(rest) == pytest.approx(1e-2, rel=0.05)
    assert sum(len(g["params"]) for g in groups) == len(named)


def test_roi_tokens_read_the_prompt_region():
    """The RoI tokens' region: the box; the positive points' bounding box grown by 0.1 and clipped; the image."""
    from pixelllm.modeling.prompt_extractor import PromptFeatureExtractor as E

    box = torch.tensor([[0.2, 0.3, 0.6, 0.9]])
    assert torch.equal(E.region_of(box, None, None, 1, box.device), box)
    points = torch.tensor([[[0.5, 0.5], [0.95, 0.05], [0.3, 0.6]]])
    labels = torch.tensor([[1, 0, 1]])  # the negative point is ignored
    region = E.region_of(None, points, labels, 2, box.device)
    assert region.shape == (2, 4)
    assert torch.allclose(region[0], torch.tensor([0.2, 0.4, 0.6, 0.7]))
    edge = E.region_of(None, torch.tensor([[[0.02, 0.97]]]), None, 1, box.device)
    assert torch.allclose(edge[0], torch.tensor([0.0, 0.87, 0.12, 1.0]))
    assert torch.equal(E.region_of(None, None, None, 3, box.device), torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3))


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    return env


def _train(config: Path, *extra: str, launcher: list[str] | None = None, timeout: int = 600) -> subprocess.Popen:
    cmd = (launcher or [sys.executable, "-m"]) + ["training.train", "--config", str(config), *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: int = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


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


def test_task_stream_shards_are_disjoint_and_cover_the_data():
    streams = [TaskStream(size=10, batch_size=2, seed=3, rank=r, world=2) for r in range(2)]
    seen = [[i for _ in range(2) for i in s.next_batch()] for s in streams]  # 4 of each rank's 5 items
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 8
    # state round trip continues with the same next batch
    twin = TaskStream(size=10, batch_size=2, seed=3, rank=0, world=2)
    twin.load_state(streams[0].state())
    assert twin.next_batch() == streams[0].next_batch()


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


def test_a_checkpoint_left_over_from_a_kill_between_renames_does_not_stop_the_next_save(tmp_path):
    """A kill after `save_checkpoint` renamed the new checkpoint into place but before it removed the previous one
    leaves `checkpoint.old` beside `checkpoint` (the kill-and-resume test hit this once). The resumed run reads the
    newer `checkpoint`, and its next save must replace both rather than fail on the non-empty `checkpoint.old`."""
    from tests.helpers import small_model
    from training.run_folder import find_resume, save_checkpoint

    model = small_model()
    save_checkpoint(tmp_path, model, {"step": 4})
    save_checkpoint(tmp_path, model, {"step": 6})
    (tmp_path / "checkpoint.old").mkdir()  # what the killed save left: the step-4 checkpoint, partly removed
    torch.save({"step": 4}, tmp_path / "checkpoint.old" / "trainer_state.pt")
    assert torch.load(find_resume(tmp_path) / "trainer_state.pt", weights_only=True)["step"] == 6

    save_checkpoint(tmp_path, model, {"step": 8})
    assert torch.load(find_resume(tmp_path) / "trainer_state.pt", weights_only=True)["step"] == 8
    assert not (tmp_path / "checkpoint.old").exists() and not (tmp_path / "checkpoint.tmp").exists()


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


def test_bfloat16_autocast_matches_float32_and_keeps_float32_weights(tmp_path):
    """`train.autocast: bfloat16` runs the model's matmuls in bf16 (the LM's logits come out bf16) while the
    weights and their gradients stay float32, and the losses and gradient direction match a float32 step."""
    from tests.helpers import small_model
    from training.data.datasets import Collator, ShapesData
    from training.data.shapes import generate_split
    from training.train import autocast_context

    generate_split(tmp_path, "train", 4, seed=3)
    model = small_model(roi_grid=4, roi_position="sine", attn_supervision_weight=1.0).train()
    collate = Collator(ShapesData(tmp_path, "train", 64), model.tokenizer, 64, max_tokens=48)
    logits_dtype = []
    model.language_model.lm_head.register_forward_hook(lambda m, i, o: logits_dtype.append(o.dtype))
    device = torch.device("cpu")
    for task in ("narrative", "refer"):
        batch = collate(task, [0, 1, 2, 3], np.random.default_rng(0))
        runs = {}
        for name in ("", "bfloat16"):
            model.zero_grad()
            with autocast_context(device, name):
                losses = model(batch)
            losses["loss"].backward()
            grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            runs[name] = ({k: float(v.detach()) for k, v in losses.items()}, grads, logits_dtype[-1])
        (fp32, g32, d32), (bf16, g16, d16) = runs[""], runs["bfloat16"]
        assert d32 == torch.float32 and d16 == torch.bfloat16
        assert g16.dtype == torch.float32 and all(p.dtype == torch.float32 for p in model.parameters())
        for key, value in fp32.items():
            assert abs(bf16[key] - value) <= 0.03 * abs(value) + 1e-3, (task, key, value, bf16[key])
        assert float(torch.nn.functional.cosine_similarity(g32, g16, dim=0)) > 0.98
    with pytest.raises(SystemExit, match="bfloat16 or float16"):
        autocast_context(device, "int8")


def test_a_misspelt_task_batch_size_is_refused_before_any_work(tmp_path):
    from training.train import main

    config = _config(tmp_path, (1, 1))
    cfg = yaml.safe_load(config.read_text())
    cfg["train"]["task_batch_size"] = {"refer_images": 2}
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit, match="refer_images"):
        main(["--config", str(config)])
    assert not (tmp_path / "data").exists()  # refused before generating data


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


def test_a_missing_or_broken_config_is_refused_with_one_line(tmp_path, capsys):
    from training.train import main

    with pytest.raises(SystemExit) as missing:
        main(["--config", str(tmp_path / "nope.yaml")])
    assert missing.value.code == 2 and "nope.yaml: no such file" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: {steps: [1, 2\n")
    with pytest.raises(SystemExit, match=r"broken.yaml is not valid YAML"):
        main(["--config", str(broken)])
    scalar = tmp_path / "scalar.json"
    scalar.write_text("3")
    with pytest.raises(SystemExit, match=r"scalar.json must be a mapping .* got int"):
        main(["--config", str(scalar)])
    assert not (tmp_path / "data").exists()


@pytest.mark.parametrize("change, match", [
    (lambda c: c["stages"][0].update(steps=0), r"stage 1 \('caption_pretraining'\): steps must be a whole number"),
    (lambda c: c["stages"][1].update(steps=-3), r"stage 2 \('multitask'\): steps must be a whole number"),
    (lambda c: c.update(stages=[]), r"stages must be a non-empty list"),
    (lambda c: c["stages"][1].pop("steps"), r"stage 2 \('multitask'\): steps must be a whole number"),
    (lambda c: c["stages"][1].update(tasks={"narative": 1}), r"stage 2 \('multitask'\): unknown tasks \['narative'\]"),
    (lambda c: c["train"].pop("lr"), r"train.lr is missing"),
    (lambda c: c["train"].pop("batch_size"), r"train.batch_size is missing"),
    (lambda c: c.pop("stages"), r"no `stages:` section"),
    (lambda c: c["train"].update(checkpoint_evry=5), r"unknown train settings \['checkpoint_evry'\]"),
])
def test_a_config_whose_stages_cannot_train_is_refused_before_any_work(tmp_path, change, match):
    """A stage of 0 or negative steps used to finish with exit 0 and an untrained `final/` (and export); a typo'd
    task or key in a later stage failed with a traceback only after the earlier stages had trained."""
    from training.train import main

    config = _config(tmp_path, (1, 1))
    cfg = yaml.safe_load(config.read_text())
    change(cfg)
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit, match=match):
        main(["--config", str(config)])
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


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


def test_a_decoding_default_added_to_a_run_without_overrides_still_resumes(tmp_path):
    """A run started without a `model.overrides` section, resumed with only a decoding default added, was refused:
    the missing section differed from the new one as a whole ("model.overrides")."""
    from training.run_folder import check_same_run

    (tmp_path / "config.resolved.json").write_text(json.dumps({"model": {"preset": "tiny", "init": "scratch"}}))
    check_same_run(tmp_path, {"model": {"preset": "tiny", "init": "scratch",
                                        "overrides": {"repetition_penalty": 1.2, "max_new_tokens": 40}}})
    with pytest.raises(SystemExit, match=r"model: section: model.overrides.roi_grid\)"):
        check_same_run(tmp_path, {"model": {"preset": "tiny", "init": "scratch", "overrides": {"roi_grid": 2}}})


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


def test_the_tokenizer_learns_every_text_of_the_split_and_refuses_none(tmp_path):
    """A from-scratch tokenizer is trained on the narratives, expressions and region captions; a split of region
    captions only (a Visual Genome conversion) gave it none and it knew single bytes only."""
    from training.data.shapes import generate_split
    from training.train import tokenizer_corpus

    generate_split(tmp_path, "train", 3, seed=5)
    dense = tmp_path / "train.dense.jsonl"
    captions = [g["caption"] for line in dense.read_text().splitlines() for g in json.loads(line)["regions"]]
    for kind in ("ln", "refer"):
        (tmp_path / f"train.{kind}.jsonl").unlink()
    assert tokenizer_corpus(tmp_path, "train") == captions
    dense.write_text("")
    with pytest.raises(ValueError, match="holds no text to build the tokenizer from"):
        tokenizer_corpus(tmp_path, "train")



@pytest.mark.parametrize("override", ["--stages.5.steps=3", "--train.lr.x=1", "--stages.first.steps=2"])
def test_an_override_that_names_nothing_is_one_line(tmp_path, override):
    """An override past the last stage was an IndexError traceback (a key under a number: AttributeError)."""
    from training.train import main

    config = _config(tmp_path, (1, 1))
    with pytest.raises(SystemExit, match=rf"override '{re.escape(override)}' names nothing in"):
        main(["--config", str(config), override])
    assert not (tmp_path / "data").exists()


def test_train_keys_are_the_settings_the_trainer_reads():
    """check_config refuses a train.* setting outside TRAIN_KEYS: the list must name every setting main() reads
    (a new `tcfg.get("x")` missing from it would refuse every config that sets x), and nothing it does not."""
    import inspect

    import training.train as train

    read = set(re.findall(r'tcfg(?:\.get\(|\[)"([a-z_]+)"', inspect.getsource(train)))
    assert read == set(train.TRAIN_KEYS)


@pytest.mark.parametrize("override, match", [
    ("--trian.lr=1", r"unknown sections \['trian'\]"),
    ("--data.limt=3", r"unknown data settings \['limt'\]"),
    ("--model.overide.roi_grid=4", r"unknown model settings \['overide'\]"),
    ("--stages.1.lrr=1e-4", r"stage 2 \('multitask'\): unknown settings \['lrr'\]"),
    ("--export.dype=float16", r"unknown export settings \['dype'\]"),
])
def test_a_typo_in_a_setting_or_section_name_is_refused_before_any_work(tmp_path, override, match):
    """A misspelt section or setting (outside train.*, already checked) was ignored: `--trian.lr=1` or a stage's
    `lrr:` trained at the config's own learning rate, `--data.limt=3` on every image, exit 0 and no word."""
    from training.train import main

    config = _config(tmp_path, (1, 1))
    with pytest.raises(SystemExit, match=match):
        main(["--config", str(config), override])
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, match", [
    ("--train.lr=abc", r"train.lr must be a number >= 0, got 'abc'"),
    ("--train.log_every=0", r"train.log_every must be a whole number >= 1, got 0"),
    ("--train.batch_size=2.5", r"train.batch_size must be a whole number >= 1, got 2.5"),
    ("--stages.0.warmup=-1", r"stage 1 \('caption_pretraining'\): warmup must be a whole number >= 0, got -1"),
    ("--model.preset=tinny", r"model: unknown preset 'tinny'"),
    ("--model.overrides.roi_grd=4", r"model: .*unexpected keyword argument 'roi_grd'"),
    ("--stages.1.stage=multitsk", r"stage 2 \('multitask'\): stage must be one of scratch, .*got 'multitsk'"),
    ("--export.dtype=float61", r"export.dtype must be one of float32, float16, bfloat16, got 'float61'"),
])
def test_a_setting_of_the_wrong_kind_is_one_line_before_any_work(tmp_path, override, match):
    """A value the trainer cannot use was a traceback once the data was generated (a typo'd preset or override,
    `lr: abc`), at the first step (`log_every: 0`: ZeroDivisionError), when the typo'd stage began after the
    stages before it had trained, or, for `export.dtype`, after the whole run (`AttributeError: module 'torch' has
    no attribute 'float61'`, exit 1)."""
    from training.train import main

    config = _config(tmp_path, (1, 1))
    with pytest.raises(SystemExit, match=match):
        main(["--config", str(config), override])
    assert not (tmp_path / "data").exists() and not (tmp_path / "run").exists()


def test_numbers_yaml_reads_as_text_are_still_numbers(tmp_path):
    """YAML reads `--train.lr=1e-4` as the text "1e-4" (no dot); the trainer's float() takes it, so the check does."""
    from training.train import check_config, load_config

    config = _config(tmp_path, (1, 1))
    cfg = load_config(config, ["--train.lr=1e-4", "--stages.0.lr=3e-4"])
    assert cfg["train"]["lr"] == "1e-4"
    check_config(cfg, config)
    for shipped in sorted((ROOT / "training" / "configs").glob("*.yaml")):
        check_config(load_config(shipped, []), shipped)


def test_section_keys_are_the_settings_the_trainer_reads():
    """As TRAIN_KEYS: every stage / data / model / export setting main() reads is in SECTION_KEYS (a missing one
    would refuse every config that sets it)."""
    import inspect

    import pixelllm.model_card as model_card
    import training.run_folder as run_folder
    import training.train as train

    source = inspect.getsource(train) + inspect.getsource(model_card) + inspect.getsource(run_folder)
    for section, pattern in (("stage", r'stage(?:\.get\(|\[)"([a-z_]+)"'),
                             ("data", r'cfg\["data"\](?:\.get\(|\[)"([a-z_]+)"'),
                             ("model", r'(?:mcfg|cfg\["model"\])(?:\.get\(|\[)"([a-z_]+)"'),
                             ("export", r'(?:export|cfg\["export"\])\.get\("([a-z_]+)"')):
        assert set(re.findall(pattern, source)) == set(train.SECTION_KEYS[section]), section


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


class _Parsed(Exception):
    """Raised in place of running a command once argparse has taken all of its arguments."""


@pytest.mark.parametrize(("module", "argv", "refused"), [
    ("training.export", ["--out", "o", "--stat", "accepted"], "unrecognized arguments: --stat accepted"),
    ("training.average", ["--checkpoints", "a", "--out", "o", "--dt", "float32"], "unrecognized arguments: --dt"),
    ("training.data.shapes.splits", ["--out", "o", "--split", "s", "--num", "1", "--seed", "1", "--hold"],
     "unrecognized arguments: --hold"),
    ("training.evaluate", ["--checkpoint", "c", "--data", "d", "--lim", "3"], "unrecognized arguments: --lim 3"),
    ("training.simulate_annotators", ["--step", "1"], "unrecognized arguments: --step 1"),
    ("training.finetune", ["--out", "o", "--step", "1"], "unrecognized arguments: --step 1"),
    ("training.convert", ["vg", "--regions", "r", "--out", "o", "--max-reg", "3"],
     "unrecognized arguments: --max-reg 3"),
    ("training.train", ["--conf", "c.yaml"], "the following arguments are required: --config"),
    ("pixelllm.bench.run", ["--qui"], "unrecognized arguments: --qui"),
    ("app", ["--conc", "3"], "unrecognized arguments: --conc 3"),
])
def test_every_command_refuses_an_abbreviated_flag(module, argv, refused, monkeypatch, capsys):
    """argparse took any unambiguous prefix for a flag (`--step 1` for `--steps 1`): a half-remembered flag set
    another one silently, and a flag added later could change what an old command meant. Every command refuses
    it now (exit 2). argparse is spied on so that a command that takes its arguments stops there, doing nothing."""
    import argparse
    import importlib

    real = argparse.ArgumentParser.parse_known_args

    def parse_known_args(self, args=None, namespace=None):
        parsed, extras = real(self, args, namespace)
        if not extras:
            raise _Parsed(parsed)
        return parsed, extras

    command = importlib.import_module(module)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", parse_known_args)
    with pytest.raises(SystemExit) as exited:
        (command.parse_args if module == "app" else command.main)(argv)
    assert exited.value.code == 2 and refused in capsys.readouterr().err


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


class _Built(Exception):
    """Raised in place of building the model, carrying what build_pixelllm was given."""


def test_overrides_reach_a_model_built_from_a_preset_and_are_refused_for_a_checkpoint(tmp_path, monkeypatch):
    """`model.init: <preset>` built the preset by name, so `model.overrides` were silently dropped (the run trained
    the preset's defaults); a checkpoint folder brings its own config, so overrides there are refused up front."""
    import training.train as train

    config = _config(tmp_path, (1, 1))
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["init"] = "tiny"
    config.write_text(yaml.safe_dump(cfg))

    def build(what, **components):
        raise _Built(what)

    monkeypatch.setattr(train, "build_pixelllm", build)
    with pytest.raises(_Built) as built:
        train.main(["--config", str(config)])
    for key, value in SMALL_OVERRIDES.items():
        if not isinstance(value, dict):
            assert getattr(built.value.args[0], key) == value, key

    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    cfg["model"]["init"] = str(checkpoint)
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit, match="overrides apply to init: scratch or a preset, not to the checkpoint"):
        train.main(["--config", str(config)])


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
