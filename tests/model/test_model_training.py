"""The model library's training contracts (issue: PixelLLM model library): trainable sets per stage, overfitting
four examples, and rows grouped by image training as the flat batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pixelllm.modeling.pixel_llm import PixelLLM
from pixelllm.tokenizer import encode_text
from tests.helpers import small_model
from tests.model.conftest import _decode


def _full_batch(model: PixelLLM, b: int = 2, t: int = 6) -> dict:
    gen = torch.Generator().manual_seed(0)
    s = model.config.image_size
    labels = torch.randint(5, 200, (b, t), generator=gen)
    labels[:, -1] = model.config.eos_token_id
    return {
        "images": torch.rand(b, 3, s, s, generator=gen) * 255,
        "prompt_boxes": torch.tensor([[0.1, 0.1, 0.7, 0.8]] * b),
        "labels": labels,
        "token_boxes": torch.rand(b, t, 4, generator=gen).sort(-1).values,
        "token_box_mask": torch.ones(b, t, dtype=torch.bool),
        "refer_boxes": torch.tensor([[0.2, 0.2, 0.5, 0.6]] * b),
        "refer_valid": torch.ones(b, dtype=torch.bool),
        "masks": (torch.rand(b, s, s, generator=gen) > 0.5).float(),
        "mask_valid": torch.ones(b, dtype=torch.bool),
        "gt_boxes": torch.tensor([[[0.2, 0.2, 0.5, 0.6]]] * b),
        "gt_valid": torch.ones(b, 1, dtype=torch.bool),
    }


@pytest.mark.parametrize("stage, keys", [
    ("ln", ["labels", "token_boxes", "token_box_mask"]),
    ("multitask", None),
    ("finetune", ["labels", "token_boxes", "token_box_mask"]),
])
def test_gradients_reach_exactly_the_stage_parameters(stage, keys):
    model = small_model(seed=3).train()
    model.add_adapter("stage")
    with torch.no_grad():  # LoRA B starts at zero, which would hide gradients flowing into A
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    trainable = set(model.set_stage(stage))
    batch = _full_batch(model)
    if keys is not None:
        batch = {k: v for k, v in batch.items() if k in keys or k in ("images", "prompt_boxes")}
    model(batch)["loss"].backward()
    reached = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert reached == trainable, (sorted(trainable - reached)[:5], sorted(reached - trainable)[:5])
    groups = model.parameter_groups()
    frozen = set(groups["sam_encoder"] + groups["prompt_encoder"] + groups["mask_decoder"] + groups["language_model"])
    assert not (trainable & frozen)
    assert set(groups["lora"]) <= trainable
    if stage == "ln":
        assert set(groups["extractor"]) | set(groups["loc_head"]) <= trainable


@pytest.mark.slow
def test_tiny_model_overfits_four_examples():
    """300 CPU steps on 4 (image, caption, per-token boxes) examples: greedy decoding then reproduces every
    caption exactly, and the per-token box error is below 0.02 (mean absolute error per coordinate)."""
    from pixelllm.tokenizer import encode_text

    torch.manual_seed(0)
    model = small_model(seed=0).train()
    model.set_stage("scratch")
    tok = model.tokenizer
    captions = ["a large red circle on the left.", "a small blue star.", "the green square on the right",
                "orange triangle in the centre"]
    s = model.config.image_size
    images = torch.rand(4, 3, s, s, generator=torch.Generator().manual_seed(1)) * 255
    seqs = [encode_text(tok, c, eos=True) for c in captions]
    length = max(map(len, seqs))
    labels = torch.full((4, length), -100)
    boxes = torch.zeros(4, length, 4)
    rng = np.random.default_rng(0)
    for i, seq in enumerate(seqs):
        labels[i, : len(seq)] = torch.tensor(seq)
        for j in range(len(seq)):
            x0, y0 = rng.uniform(0, 0.6, 2)
            boxes[i, j] = torch.tensor([x0, y0, x0 + rng.uniform(0.1, 0.4), y0 + rng.uniform(0.1, 0.4)])
    batch = {"images": images, "labels": labels, "token_boxes": boxes, "token_box_mask": labels != -100}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    model.config.loc_loss_weight = 1.0  # the overfit target is the boxes too; lambda only balances real data
    for _ in range(300):
        loss = model(batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    errors = []
    with torch.no_grad():
        feats = model.encode_image(images)
        for i, seq in enumerate(seqs):
            prefix = model.encode_prefix(feats.index(i))
            tokens, pred = _decode(model, prefix, n=length + 4)
            assert tokens == seq, (captions[i], tok.decode(tokens))
            errors.append((pred - boxes[i, : len(seq)]).abs().mean())
    assert float(torch.stack(errors).mean()) < 0.02, errors


def test_expressions_grouped_by_image_train_as_the_flat_batch():
    """`image_index` (the `refer_image` task): two images encoded once for four expressions give the same referring
    losses — caption, EOS box, attention supervision, SAM mask — as the four rows with their images repeated."""
    model = small_model(seed=2, roi_grid=4, roi_position="sine", refer_prompt="refer:").train()
    model.config.attn_supervision_weight = 1.0
    s = model.config.image_size
    gen = torch.Generator().manual_seed(5)
    images = torch.rand(2, 3, s, s, generator=gen) * 255
    tok = model.tokenizer
    seqs = [encode_text(tok, w, eos=True) for w in ["the green square", "orange triangle", "a large red circle",
                                                      "the small blue star"]]
    labels = torch.full((4, max(map(len, seqs))), -100)
    for i, seq in enumerate(seqs):
        labels[i, : len(seq)] = torch.tensor(seq)
    image_index = torch.tensor([0, 0, 1, 1])
    targets = {
        "labels": labels,
        "refer_boxes": torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.2, 0.9, 0.6], [0.0, 0.5, 0.5, 1.0],
                                     [0.6, 0.6, 0.8, 0.9]]),
        "refer_valid": torch.ones(4, dtype=torch.bool),
        "masks": (torch.rand(4, s, s, generator=gen) > 0.7).float(),
        "mask_valid": torch.tensor([True, False, True, True]),
    }
    gt = torch.tensor([[[0.1, 0.1, 0.4, 0.5], [0.5, 0.2, 0.9, 0.6]], [[0.0, 0.5, 0.5, 1.0], [0.6, 0.6, 0.8, 0.9]]])
    grouped = {**targets, "images": images, "image_index": image_index, "gt_boxes": gt,
               "gt_valid": torch.ones(2, 2, dtype=torch.bool)}
    flat = {**targets, "images": images[image_index], "gt_boxes": gt[image_index],
            "gt_valid": torch.ones(4, 2, dtype=torch.bool)}
    a, b = model(grouped), model(flat)
    for name in ("caption", "eos_l1", "eos_giou", "attn_cells", "mask_focal", "mask_dice", "mask_iou"):
        assert torch.allclose(a[name], b[name], atol=1e-5), (name, a[name], b[name])
    # the encoder pass is shared: gradients reach the image encoder from every row, once per image
    a["loss"].backward()
    assert model.image_encoder.sam_encoder.patch_embed.proj.weight.grad.abs().sum() > 0

    with pytest.raises(ValueError, match="need 4 rows, one per target row"):  # a prompt per image is refused
        model({**grouped, "prompt_boxes": targets["refer_boxes"][:2]})


def test_region_rows_grouped_by_image_train_as_the_flat_batch():
    """`image_index` with per-row box prompts (the `region_image` task): two images encoded once for four boxes give
    the same caption, trace and attention losses as the four rows with their images repeated, and the image encoder
    gets the gradient of every row."""
    model = small_model(seed=3, roi_grid=4, roi_position="sine").train()
    model.config.attn_supervision_weight = 1.0
    s = model.config.image_size
    images = torch.rand(2, 3, s, s, generator=torch.Generator().manual_seed(6)) * 255
    boxes = torch.tensor([[0.1, 0.1, 0.4, 0.5], [0.5, 0.2, 0.9, 0.6], [0.0, 0.5, 0.5, 1.0], [0.6, 0.6, 0.8, 0.9]])
    seqs = [encode_text(model.tokenizer, w, eos=True) for w in ["large green square", "small orange triangle",
                                                                "large red circle", "small blue star"]]
    labels = torch.full((4, max(map(len, seqs))), -100)
    for i, seq in enumerate(seqs):
        labels[i, : len(seq)] = torch.tensor(seq)
    image_index = torch.tensor([0, 0, 1, 1])
    targets = {"labels": labels, "prompt_boxes": boxes, "token_boxes": boxes[:, None].expand(4, labels.shape[1], 4),
               "token_box_mask": labels != -100}
    grouped = {**targets, "images": images, "image_index": image_index}
    flat = {**targets, "images": images[image_index]}
    a, b = model(grouped), model(flat)
    for name in ("caption", "location", "attn_cells"):
        assert torch.allclose(a[name], b[name], atol=1e-5), (name, a[name], b[name])
    # swapping the rows' images changes the losses: each row reads its own image's features
    swapped = model({**grouped, "image_index": torch.tensor([1, 1, 0, 0])})
    assert not torch.allclose(swapped["caption"], a["caption"], atol=1e-4)
    a["loss"].backward()
    grad_grouped = model.image_encoder.sam_encoder.patch_embed.proj.weight.grad.clone()
    model.zero_grad()
    b["loss"].backward()
    assert torch.allclose(grad_grouped, model.image_encoder.sam_encoder.patch_embed.proj.weight.grad, atol=1e-5)
