"""Cross-attention supervision (docs/referring.md): a loss that teaches the decoder to look where the location
head must point — the last decoder layer's cross-attention (mean over heads) on the RoI cells whose centre lies in a
token's target box. Its inputs are captured by a hook during the training pass, so the attention map is recomputed
here and the model's attention keeps its fast (SDPA) implementation."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import T5ForConditionalGeneration

from pixelllm.modeling.language_model import Prefix

if TYPE_CHECKING:
    from pixelllm.modeling.pixel_llm import PixelLLM


def _last_cross_attention(lm: T5ForConditionalGeneration) -> nn.Module:
    return lm.decoder.block[-1].layer[1].EncDecAttention


@contextlib.contextmanager
def capture_cross_attention(lm: T5ForConditionalGeneration, active: bool) -> Iterator[dict[str, torch.Tensor]]:
    """While active, records the inputs of the last decoder layer's cross-attention (its layer-normed queries and
    the encoder states) in the yielded dict; the last pass run inside the block is the one kept."""
    captured: dict[str, torch.Tensor] = {}
    if not active:
        yield captured
        return

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured["queries"] = args[0] if args else kwargs["hidden_states"]
        captured["keys"] = kwargs["key_value_states"]

    handle = _last_cross_attention(lm).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield captured
    finally:
        handle.remove()


def attention_supervision_loss(model: PixelLLM, batch: dict[str, Any], prefix: Prefix,
                               captured: dict[str, torch.Tensor]) -> torch.Tensor:
    """-log of the captured cross-attention's mass on the RoI cells inside each supervised token's target box (the
    nearest cell when none is inside), averaged over supervised positions: the trace tokens (`token_box_mask`) and
    the EOS of referring expressions (`refer_boxes`)."""
    labels = batch["labels"]
    rows, length = labels.shape
    attention = _last_cross_attention(model.language_model)
    heads, dim = attention.n_heads, attention.key_value_proj_dim
    q = attention.q(captured["queries"]).view(rows, length, heads, dim).transpose(1, 2)
    k = attention.k(captured["keys"]).view(rows, -1, heads, dim).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)).float()  # T5 does not scale by sqrt(d)
    scores = scores.masked_fill(prefix.mask[:, None, None, :] == 0, torch.finfo(scores.dtype).min)
    probs = scores.softmax(-1).mean(1)  # B x T x S
    extractor = model.prompt_extractor
    first = model.config.num_query_tokens
    boxes, points = batch.get("prompt_boxes"), batch.get("prompt_points")
    grid = model.roi_grid_for(boxes, points)
    cells = probs[..., first:first + grid ** 2]  # B x T x g*g
    regions = extractor.region_of(boxes, points, batch.get("point_labels"), rows, labels.device)
    centres = extractor.cell_centres(regions, grid)  # B x g*g x 2
    targets = torch.zeros(rows, length, 4, device=labels.device)
    valid = torch.zeros(rows, length, dtype=torch.bool, device=labels.device)
    if "token_boxes" in batch:
        targets = batch["token_boxes"].float().clone()
        valid = batch["token_box_mask"] & (labels != -100)
    if "refer_boxes" in batch:
        eos = (labels == model.config.eos_token_id).int().argmax(dim=1)
        index = torch.arange(rows, device=labels.device)
        targets[index, eos] = batch["refer_boxes"].float()
        valid[index, eos] = batch["refer_valid"]
    if not bool(valid.any()):
        return probs.sum() * 0.0
    box = targets[:, :, None, :]  # B x T x 1 x 4
    cx, cy = centres[:, None, :, 0], centres[:, None, :, 1]  # B x 1 x g*g
    inside = (cx >= box[..., 0]) & (cx <= box[..., 2]) & (cy >= box[..., 1]) & (cy <= box[..., 3])
    middle = (box[..., :2] + box[..., 2:]) / 2  # B x T x 1 x 2
    nearest = ((centres[:, None] - middle) ** 2).sum(-1).argmin(-1)  # B x T
    inside = inside | F.one_hot(nearest, cells.shape[-1]).bool() & ~inside.any(-1, keepdim=True)
    mass = (cells * inside).sum(-1)
    return -torch.log(mass[valid] + 1e-6).mean()
