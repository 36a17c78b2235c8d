"""Prompt encoder P and prompt feature extractor E (DESIGN §1; Scenic's `prompt_adapter.py`).

P is SAM's `PromptEncoder` (sine-cosine/random-Fourier position embedding + learned type embeddings).
E is a 2-layer `TwoWayTransformer` whose queries are `[P(b), q]` — the prompt tokens followed by 32 learnable
tokens — and whose keys are the image features; its output is the learnable tokens of the last layer, projected
to the language model's width. These tokens are the visual prefix f_l of the PrefixLM.
"""

from __future__ import annotations

import torch
from segment_anything.modeling import PromptEncoder, TwoWayTransformer
from torch import nn


class PromptFeatureExtractor(nn.Module):
    def __init__(self, *, prompt_encoder: PromptEncoder, transformer: TwoWayTransformer, num_queries: int,
                 embed_dim: int, lm_dim: int) -> None:
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.transformer = transformer
        self.queries = nn.Parameter(torch.randn(num_queries, embed_dim) * 0.02)
        self.proj = nn.Linear(embed_dim, lm_dim)

    @property
    def input_size(self) -> int:
        return self.prompt_encoder.input_image_size[0]

    def embed_prompt(self, boxes: torch.Tensor | None = None, points: torch.Tensor | None = None,
                     point_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Sparse prompt tokens P(.).

        boxes: Bx4, (x0, y0, x1, y1) normalised to [0, 1] of the image.
        points: BxNx2, (x, y) normalised; point_labels: BxN, 1 positive, 0 negative, -1 padding.
        Returns BxKxC. With neither, the prompt is the global box (0, 0, 1, 1) — the paper's convention.
        """
        scale = float(self.input_size)
        if boxes is None and points is None:
            batch = 1 if point_labels is None else point_labels.shape[0]
            boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=self.queries.device).expand(batch, 4)
        pts = None
        if points is not None:
            if point_labels is None:
                point_labels = torch.ones(points.shape[:2], dtype=torch.long, device=points.device)
            pts = (points.float() * scale, point_labels)  # float32 coordinates: bf16 would round pixels
        box_px = boxes.float() * scale if boxes is not None else None
        sparse, _ = self.prompt_encoder(points=pts, boxes=box_px, masks=None)
        return sparse.to(self.queries.dtype)  # float32 from SAM's position encoding (see PixelLLM._apply)

    def forward(self, image_embeddings: torch.Tensor, prompt_tokens: torch.Tensor) -> torch.Tensor:
        """image_embeddings: BxCxhxw; prompt_tokens: BxKxC. Returns the visual prefix, B x num_queries x D_lm."""
        batch = image_embeddings.shape[0]
        image_pe = self.prompt_encoder.get_dense_pe().to(image_embeddings.dtype).expand(batch, -1, -1, -1)
        queries = self.queries.unsqueeze(0).expand(batch, -1, -1)
        tokens = torch.cat([prompt_tokens, queries], dim=1)
        out, _ = self.transformer(image_embeddings, image_pe, tokens)
        return self.proj(out[:, -queries.shape[1]:])
