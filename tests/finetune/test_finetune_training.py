"""What finetuning trains: correction samples follow the generation's prompt and skip box supervision on
non-visual words; LoRA tensors only are trained (every base weight bit-identical, in memory and on disk), the saved
adapter loads into a fresh model and changes its outputs; replay batches (joint, grouped, a custom rank); the
default extra targets on a base whose location head already has an adapter.

The rest of tests/finetune/: the run's record and output folder: test_finetune_runs.py; the command line:
test_finetune_cli.py; training.simulate_annotators: test_finetune_simulate.py. Fixtures: conftest.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pixelllm import PixelLLM
from pixelllm.adapters import base_state_dict
from tests.finetune.conftest import H, W, settings
from tests.helpers import save_small_checkpoint
from training import corrections
from training import finetune as ft


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
