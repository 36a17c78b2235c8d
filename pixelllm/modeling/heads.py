"""Prediction heads: per-token location (Scenic `point_predictor.py`), referring mask (`mask_adapter.py`),
and the CenterNet-style proposal head for dense captioning (`box_decoder.py`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling import MaskDecoder, PromptEncoder
from torch import nn
from torchvision.ops import nms


class LocationHead(nn.Module):
    """Per-token MLP on the decoder feature *before* the vocabulary layer: two points that tightly bound the
    token's trace. Output is sigmoid-normalised (x_a, y_a, x_b, y_b) in [0, 1] of the image; it is never fed back
    into decoding. `as_box` orders the two points into (x0, y0, x1, y1)."""

    def __init__(self, in_dim: int, hidden_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [4]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: ...xD (unscaled last decoder hidden state). Returns ...x4 in [0, 1]."""
        x = hidden
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.gelu(x)
        return torch.sigmoid(x)

    @staticmethod
    def as_box(points: torch.Tensor) -> torch.Tensor:
        """...x4 two points -> ...x4 box (x0, y0, x1, y1) with x0 <= x1, y0 <= y1."""
        xa, ya, xb, yb = points.unbind(-1)
        return torch.stack([torch.minimum(xa, xb), torch.minimum(ya, yb),
                            torch.maximum(xa, xb), torch.maximum(ya, yb)], dim=-1)


class ReferringMaskHead(nn.Module):
    """SAM's mask decoder on the prompt embedding of a box, plus one learnable embedding appended to the sparse
    prompt tokens (the paper's finetuning handle when the SAM decoder stays frozen)."""

    def __init__(self, *, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder, embed_dim: int) -> None:
        super().__init__()
        self.prompt_encoder = prompt_encoder  # shared with the prompt feature extractor
        self.mask_decoder = mask_decoder
        self.mask_embedding = nn.Parameter(torch.zeros(1, 1, embed_dim))

    def forward(self, sam_features: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """sam_features: 1xCxhxw (one image); boxes: Kx4 normalised (x0, y0, x1, y1).

        Returns mask logits Kx1x(4h)x(4w) over the model input frame and predicted IoU Kx1.
        """
        scale = float(self.prompt_encoder.input_image_size[0])
        sparse, dense = self.prompt_encoder(points=None, boxes=boxes.float() * scale, masks=None)
        sparse = torch.cat([sparse.to(sam_features.dtype), self.mask_embedding.expand(sparse.shape[0], -1, -1)], dim=1)
        return self.mask_decoder(
            image_embeddings=sam_features,
            image_pe=self.prompt_encoder.get_dense_pe().to(sam_features.dtype),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )


class ProposalHead(nn.Module):
    """Simple Feature Pyramid (one level, upsampled from the ViT grid) + CenterNet heads: an objectness heatmap,
    box size (w, h) and centre offset, all normalised to the image."""

    def __init__(self, in_chans: int, channels: int, upsample: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_chans, channels, 1)]
        for _ in range(max(0, upsample.bit_length() - 1)):
            layers += [nn.ConvTranspose2d(channels, channels, 2, stride=2), nn.GroupNorm(8, channels), nn.GELU()]
        self.pyramid = nn.Sequential(*layers)

        def head(out: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GELU(), nn.Conv2d(channels, out, 1))

        self.heatmap = head(1)
        self.size = head(2)
        self.offset = head(2)
        nn.init.constant_(self.heatmap[-1].bias, -2.19)  # prior 0.1, CenterNet's initialisation

    def forward(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """features: BxCxhxw. Returns heatmap logits Bx1xHxW, size Bx2xHxW (sigmoid, normalised w, h) and offset
        Bx2xHxW (sigmoid, in cells)."""
        x = self.pyramid(features)
        return {"heatmap": self.heatmap(x), "size": torch.sigmoid(self.size(x)),
                "offset": torch.sigmoid(self.offset(x))}

    @staticmethod
    def decode(out: dict[str, torch.Tensor], *, top_k: int = 50, score_threshold: float = 0.05,
               nms_iou: float = 0.5) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Peaks of the heatmap (3x3 max-pool) -> boxes -> NMS. Returns per image (boxes Kx4 normalised
        (x0, y0, x1, y1), scores K), sorted by score."""
        heat = torch.sigmoid(out["heatmap"].float())  # decode in float32 whatever the model's dtype
        batch, _, height, width = heat.shape
        peaks = heat * (F.max_pool2d(heat, 3, stride=1, padding=1) == heat)
        results = []
        for b in range(batch):
            scores, idx = peaks[b, 0].flatten().topk(min(top_k, height * width))
            keep = scores >= score_threshold
            scores, idx = scores[keep], idx[keep]
            ys, xs = (idx // width).float(), (idx % width).float()
            off = out["offset"][b].flatten(1)[:, idx].float()
            size = out["size"][b].flatten(1)[:, idx].float()
            cx, cy = (xs + off[0]) / width, (ys + off[1]) / height
            boxes = torch.stack([cx - size[0] / 2, cy - size[1] / 2, cx + size[0] / 2, cy + size[1] / 2], -1)
            boxes = boxes.clamp(0.0, 1.0)
            keep = nms(boxes, scores, nms_iou)
            results.append((boxes[keep], scores[keep]))
        return results
