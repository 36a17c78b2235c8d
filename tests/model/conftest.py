"""Helpers of the model library's tests (this folder only), on a small random PixelLLM (tests/helpers.py):
`_prefix` (a random image's prefix, optionally for a box prompt) and `_decode` (greedy-decode one prefix, giving its
tokens and per-token boxes). The test modules import them from here. Torch is held to two threads."""

from __future__ import annotations

import torch

from pixelllm.modeling.language_model import Prefix
from pixelllm.modeling.pixel_llm import PixelLLM

torch.set_num_threads(2)


def _prefix(model: PixelLLM, seed: int = 0, box=None) -> Prefix:
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(1, 3, model.config.image_size, model.config.image_size, generator=gen) * 255
    with torch.no_grad():
        feats = model.encode_image(images)
        return model.encode_prefix(feats, boxes=None if box is None else torch.tensor([box]))


def _decode(model: PixelLLM, prefix: Prefix, n: int = 24, **kw) -> tuple[list[int], torch.Tensor | None]:
    tokens, boxes = [], []
    with torch.no_grad():
        for step, box in model.stream(prefix, max_new_tokens=n, **kw):
            tokens.append(int(step.tokens[0]))
            boxes.append(None if box is None else box[0])
    return tokens, (torch.stack(boxes) if boxes[0] is not None else None)
