"""Pieces of training/train.py tested alone, without a run: the LM's own learning rate, the RoI tokens'
region, the task stream's shards, bfloat16 autocast, the tokenizer's corpus, and the checkpoint folder's renames.

The rest of tests/training/: whole runs, resumed and on DDP: test_train_resume.py; a config's checks before any work:
test_train_config_checks.py; the run folder, the export, a full disk and Ctrl+C: test_train_run_folder.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from training.data.sampling import TaskStream


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


def test_task_stream_shards_are_disjoint_and_cover_the_data():
    streams = [TaskStream(size=10, batch_size=2, seed=3, rank=r, world=2) for r in range(2)]
    seen = [[i for _ in range(2) for i in s.next_batch()] for s in streams]  # 4 of each rank's 5 items
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 8
    # state round trip continues with the same next batch
    twin = TaskStream(size=10, batch_size=2, seed=3, rank=0, world=2)
    twin.load_state(streams[0].state())
    assert twin.next_batch() == streams[0].next_batch()


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


def test_a_decoding_default_added_to_a_run_without_overrides_still_resumes(tmp_path):
    """A run started without a `model.overrides` section, resumed with only a decoding default added, was refused:
    the missing section differed from the new one as a whole ("model.overrides")."""
    from training.run_folder import check_same_run

    (tmp_path / "config.resolved.json").write_text(json.dumps({"model": {"preset": "tiny", "init": "scratch"}}))
    check_same_run(tmp_path, {"model": {"preset": "tiny", "init": "scratch",
                                        "overrides": {"repetition_penalty": 1.2, "max_new_tokens": 40}}})
    with pytest.raises(SystemExit, match=r"model: section: model.overrides.roi_grid\)"):
        check_same_run(tmp_path, {"model": {"preset": "tiny", "init": "scratch", "overrides": {"roi_grid": 2}}})


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
