"""Tests for training.finetune and training.simulate_annotators on a small random PixelLLM (tests/helpers.py).

What is checked: finetuning trains LoRA tensors only (every base weight bit-identical, in memory and on disk), the
saved adapter loads into a fresh model and changes its outputs, `PixelLLM.from_pretrained(out)` comes back with
the adapter active, correction samples follow the generation's prompt and skip box supervision on non-visual
words, replay batches work, and the run is recorded in `finetune_runs` (finished, or failed with the error).
The simulate test is a plumbing smoke run with tiny sizes: a random model cannot learn anything in 2 steps, so it
checks that every stage runs and reports, not the acceptance numbers (those come from the real checkpoint run).
"""

from __future__ import annotations

import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pixelllm import PixelLLM
from pixelllm.adapters import base_state_dict
from pixelllm.store import AnnotationStore, StoreError
from tests.helpers import run_with_file_size_limit, save_small_checkpoint
from training import corrections
from training import finetune as ft

W, H = 80, 48


def png_bytes(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    return save_small_checkpoint(tmp_path_factory.mktemp("base"), seed=3)


def fill_store(store: AnnotationStore) -> None:
    """Four corrections covering the prompt kinds: global box, box, points + text, and a referring one."""
    prompts = [
        {"points": [], "point_labels": [], "box": None, "text": None},
        {"points": [], "point_labels": [], "box": [10.0, 5.0, 50.0, 40.0], "text": None},
        {"points": [[20.0, 20.0], [30.0, 25.0]], "point_labels": [1, 0], "box": None, "text": "In this picture"},
    ]
    for i, prompt in enumerate(prompts):
        sha = store.add_image(png_bytes(i), W, H)
        gen = store.log_generation(sha, "caption", ["a", "circle"], [[0, 0, 9, 9], [1, 1, 8, 8]], model_id="base",
                                   model_version="v", prompts=prompt)
        store.save_correction(annotator="ann", generation_id=gen, status="submitted",
                              caption="a large red circle", words=["a", "large", "red", "circle"],
                              boxes=[[0, 0, W, H], [10, 5, 50, 40], [10, 5, 50, 40], [10, 5, 50, 40]],
                              non_visual=[0])
    sha = store.add_image(png_bytes(9), W, H)
    gen = store.log_generation(sha, "refer", ["the red circle"], [[0, 0, 5, 5]], model_id="base", model_version="v",
                               prompts={"expressions": ["the red circle"]})
    store.save_correction(annotator="ann", generation_id=gen, status="submitted", words=["the red circle"],
                          boxes=[[20, 10, 60, 40]])
    draft = store.save_correction(annotator="ann", image_sha=sha, status="draft", words=["ignored"],
                                  boxes=[[0, 0, 1, 1]])
    assert draft


@pytest.fixture
def store(tmp_path):
    with AnnotationStore(tmp_path / "annotations.db") as s:
        fill_store(s)
        yield s


def settings(base_dir: Path, store: AnnotationStore, out: Path, **overrides) -> ft.FinetuneSettings:
    values = dict(db=str(store.path), base=str(base_dir), out=str(out), steps=4, batch_size=2, lr=5e-2, warmup=1,
                  log_every=2, replay_data=None)
    values.update(overrides)
    return ft.FinetuneSettings(**values)


def fixed_batch(model: PixelLLM) -> dict:
    gen = torch.Generator().manual_seed(0)
    s = model.config.image_size
    return {"images": torch.rand(2, 3, s, s, generator=gen) * 255,
            "labels": torch.tensor([[5, 6, 7, 1], [8, 9, 1, -100]]),
            "prompt_boxes": torch.tensor([[0.1, 0.1, 0.6, 0.7], [0.0, 0.0, 1.0, 1.0]])}


def outputs(model: PixelLLM, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        feats = model.encode_image(batch["images"])
        prefix = model.encode_prefix(feats, boxes=batch["prompt_boxes"])
        return model.teacher_forced(prefix, batch["labels"])


def test_correction_samples_follow_the_generation_prompt_and_skip_non_visual_words(base_dir, store):
    model = PixelLLM.from_pretrained(base_dir)
    examples, pixels, counts = corrections.correction_examples(store, model.config.image_size)
    assert counts["corrections"] == 4 and len(examples) == 4 and len(pixels) == 4
    caption = [e for e in examples if e.task == "caption"]
    assert [e.words for e in caption] == [["a", "large", "red", "circle"]] * 3
    np.testing.assert_allclose(caption[0].box, [0, 0, 1, 1])  # no prompt: the global box
    np.testing.assert_allclose(caption[1].box, [10 / W, 5 / H, 50 / W, 40 / H], atol=1e-6)
    assert caption[2].box is None and caption[2].text == "In this picture"
    np.testing.assert_allclose(caption[2].points, [[20 / W, 20 / H], [30 / W, 25 / H]], atol=1e-6)
    assert caption[2].point_labels.tolist() == [1, 0]
    assert caption[0].supervised.tolist() == [False, True, True, True]
    np.testing.assert_allclose(caption[0].word_boxes[1], [10 / W, 5 / H, 50 / W, 40 / H], atol=1e-6)
    [refer] = [e for e in examples if e.task == "refer"]
    assert refer.words == ["the red circle"]
    np.testing.assert_allclose(refer.word_boxes[0], [20 / W, 10 / H, 60 / W, 40 / H], atol=1e-6)

    bank = corrections.FeatureBank(model, pixels)
    collate = corrections.FinetuneCollator(None, model.tokenizer, model.config.image_size, replay_bank=None,
                                  correction_bank=bank, max_tokens=32)
    batch = collate.corrections([caption[2]])
    assert "prompt_points" in batch and batch["point_labels"].tolist() == [[1, 0]] and "prompt_ids" in batch
    n_first = len(model.tokenizer("a", add_special_tokens=False)["input_ids"])
    assert not batch["token_box_mask"][0, :n_first].any() and batch["token_box_mask"][0, n_first]
    assert set(model(batch)) >= {"loss", "caption", "location"}
    refer_batch = collate.corrections([refer])
    assert "refer_boxes" in refer_batch and "eos_l1" in model(refer_batch)


def test_finetune_trains_only_lora_and_the_adapter_changes_outputs(base_dir, store, tmp_path):
    base = PixelLLM.from_pretrained(base_dir)
    base_state = {k: v.clone() for k, v in base_state_dict(base).items()}
    batch = fixed_batch(base)
    logits_before, points_before = outputs(base, batch)

    out = tmp_path / "runs" / "fix-1"
    summary = ft.finetune(settings(base_dir, store, out), store=store, progress=False)
    assert summary["steps"] == 4 and summary["adapter"] == "fix-1"
    adapter_dir = out / "adapters" / "fix-1"
    assert (adapter_dir / "adapter_model.safetensors").is_file() and (adapter_dir / "adapter_config.json").is_file()
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert "loc_head" in config["target_modules"]
    card = (out / "README.md").read_text()  # the model card says what the folder is
    assert f"`{base_dir}` plus the LoRA adapter `fix-1`" in card and f"{summary['examples']} stored corrections" in card

    # on disk: the run's checkpoint holds the base weights bit for bit, plus LoRA tensors that moved
    reloaded = PixelLLM.from_pretrained(out)
    assert reloaded.active_adapter == "fix-1"
    for key, value in base_state_dict(reloaded).items():
        assert torch.equal(value, base_state[key]), key
    lora_b = {k: v for k, v in reloaded.state_dict().items() if "lora_B" in k}
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b.values())  # B starts at zero: it was trained
    assert any("loc_head" in k for k in lora_b)

    # a fresh base model + the adapter folder (what the running app does) changes the outputs
    fresh = PixelLLM.from_pretrained(base_dir)
    fresh.load_adapter(adapter_dir, "fix-1")
    logits_after, points_after = outputs(fresh, batch)
    assert not torch.allclose(logits_after, logits_before, atol=1e-4)
    assert not torch.allclose(points_after, points_before, atol=1e-4)
    fresh.set_adapter(None)
    assert torch.equal(outputs(fresh, batch)[0], logits_before)
    reloaded_logits, _ = outputs(reloaded, batch)
    torch.testing.assert_close(reloaded_logits, logits_after)

    [run] = store.list_finetune_runs()
    assert run["status"] == "finished" and run["name"] == "fix-1" and run["num_corrections"] == 4
    assert run["adapter_path"] == str(adapter_dir.resolve()) and run["metrics"]["steps"] == 4
    assert run["params"]["examples"] == 4 and run["finished_at"]
    assert json.loads((out / "finetune.json").read_text())["run_id"] == run["id"]


def test_finetune_with_replay_and_a_custom_rank(base_dir, store, tmp_path):
    from training.data.shapes import generate_split

    data = tmp_path / "shapes"
    generate_split(data, "train", 3, seed=5, size=64)
    out = tmp_path / "runs" / "replay"
    summary = ft.finetune(settings(base_dir, store, out, replay_data=str(data), replay_ratio=0.75, steps=6, rank=2,
                                   replay_mode="alternate"),
                          store=store, progress=False)
    assert summary["replay_images"] == 3
    kinds = {k for row in summary["history"] for k in row if k.startswith("loss_replay")}
    assert kinds, summary["history"]
    assert json.loads((out / "adapters" / "replay" / "adapter_config.json").read_text())["r"] == 2
    assert json.loads((out / "config.json").read_text())["lora"] == json.loads(
        (base_dir / "config.json").read_text())["lora"]


def test_joint_replay_trains_on_corrections_and_replay_every_step(base_dir, store, tmp_path):
    from training.data.shapes import generate_split

    data = tmp_path / "shapes"
    generate_split(data, "train", 3, seed=5, size=64)
    joint = settings(base_dir, store, tmp_path / "runs" / "joint", replay_data=str(data), replay_ratio=0.85,
                     replay_mode="joint", steps=4, log_every=1)
    summary = ft.finetune(joint, store=store, progress=False)
    assert len(summary["history"]) == 4
    for row in summary["history"]:  # one logged row per step: both kinds in every one
        kinds = {k.split("_")[1] for k in row if k.startswith("loss_") and k != "loss_all"}
        assert kinds == {"corrections", "replay"}, row
        parts = [v for k, v in row.items() if k.startswith("loss_") and k != "loss_all"]
        weighted = 0.15 * next(v for k, v in row.items() if k.startswith("loss_corrections")) + \
            0.85 * next(v for k, v in row.items() if k.startswith("loss_replay"))
        assert len(parts) == 2 and row["loss_all"] == pytest.approx(weighted, rel=1e-3)
    with pytest.raises(ValueError, match="replay mode"):
        ft.finetune(settings(base_dir, store, tmp_path / "runs" / "x", replay_mode="mixed"), store=store,
                    progress=False)
    runs = len(store.list_finetune_runs())
    with pytest.raises(ValueError, match="log every must be at least 1"):  # was a run failed at its first step
        ft.finetune(settings(base_dir, store, tmp_path / "runs" / "y", log_every=0), store=store, progress=False)
    assert len(store.list_finetune_runs()) == runs  # refused before a run is recorded


def test_grouped_replay_batches_have_about_batch_size_rows(base_dir, store, tmp_path, monkeypatch):
    """A grouped replay item is an image with up to 8 rows: a batch takes batch_size // 8 images, not batch_size."""
    from training.data.shapes import generate_split

    data = tmp_path / "shapes"
    generate_split(data, "train", 12, seed=5, size=64)
    seen = []
    collate = corrections.FinetuneCollator.__call__

    def spy(self, task, indices, rng):
        batch = collate(self, task, indices, rng)
        seen.append((task, len(indices), int(batch["image_index"].max()) + 1, batch["labels"].shape[0]))
        return batch

    monkeypatch.setattr(corrections.FinetuneCollator, "__call__", spy)
    summary = ft.finetune(settings(base_dir, store, tmp_path / "runs" / "grouped", replay_data=str(data), steps=6,
                                   batch_size=16, replay_tasks={"refer_image": 1.0, "region_image": 1.0}),
                          store=store, progress=False)
    assert {task for task, *_ in seen} == {"refer_image", "region_image"}, seen
    for _task, images, indexed, rows in seen:
        assert images == indexed == 2, seen  # 16 // 8 images, every one of them with rows
        assert 2 <= rows <= 16, seen
    assert all(np.isfinite(row["loss_all"]) for row in summary["history"])


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


def test_settings_take_paths(base_dir, store, tmp_path):
    made = ft.FinetuneSettings(db=store.path, base=base_dir, out=tmp_path / "o", replay_data=tmp_path)
    assert all(isinstance(v, str) for v in (made.db, made.base, made.out, made.replay_data))


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


def test_cli_runs_and_refuses_a_missing_store(base_dir, store, tmp_path, capsys):
    out = tmp_path / "runs" / "cli"
    code = ft.main(["--db", str(store.path), "--base", str(base_dir), "--out", str(out), "--steps", "2",
                    "--batch-size", "2", "--log-every", "1"])
    assert code == 0 and f"python app.py --checkpoint {out}" in capsys.readouterr().out
    assert (out / "adapters" / "cli" / "adapter_model.safetensors").is_file()
    assert ft.main(["--db", str(tmp_path / "nope.db"), "--out", str(out)]) == 2


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


def test_corrections_are_learned_teacher_forced_whatever_the_base_trained_with(tmp_path):
    """A base whose last training stage used scheduled sampling saves it in config.json; finetuning on
    corrections must not inherit it (each corrected word is the exact target)."""
    model = PixelLLM.from_pretrained(str(save_small_checkpoint(tmp_path / "src", seed=3)))
    model.config.scheduled_sampling = 0.5
    model.save_pretrained(tmp_path / "base")
    assert PixelLLM.from_pretrained(str(tmp_path / "base")).config.scheduled_sampling == 0.5
    settings = ft.FinetuneSettings(db=str(tmp_path / "db.sqlite"), base=str(tmp_path / "base"), out=str(tmp_path / "o"))
    tuned, _ = ft.load_base_with_adapter(settings, "fix")
    assert tuned.config.scheduled_sampling == 0.0


def test_simulation_report_prints_a_change_that_rounds_to_zero_as_zero():
    from training.simulate_annotators import _points

    assert str(_points(0.8421, 0.8420)) == "0.0"  # was "-0.0" in the report
    assert _points(0.5, 0.4) == -10.0 and _points(None, 0.4) is None


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


def test_the_default_extra_targets_pass_on_a_base_whose_loc_head_already_has_an_adapter(base_dir, store, tmp_path):
    """A base that is itself a finetune's checkpoint (its loc_head layers are peft LoRA wrappers around the Linear
    ones) takes a second adapter with the default --extra-targets; only the name must differ."""
    model = PixelLLM.from_pretrained(base_dir)
    model.add_adapter("first", extra_targets=ft.LOC_HEAD_TARGETS)
    ft.check_extra_targets(model, ft.LOC_HEAD_TARGETS, "b")  # was: "... (Linear) ...: Linear layers only"
    stacked = tmp_path / "stacked"
    model.save_pretrained(stacked)
    summary = ft.finetune(settings(stacked, store, tmp_path / "second", name="second", steps=1))
    assert summary["steps"] == 1 and summary["adapter"] == "second"
