"""Prompt encoder P and prompt feature extractor E (DESIGN §1; Scenic's `prompt_adapter.py`).

P is SAM's `PromptEncoder` (sine-cosine/random-Fourier position embedding + learned type embeddings).
E is a 2-layer `TwoWayTransformer` whose queries are `[P(b), q]` — the prompt tokens followed by 32 learnable
tokens — and whose keys are the image features; its output is the learnable tokens of the last layer, projected
to the language model's width. These tokens are the visual prefix f_l of the PrefixLM.

Deviation (config `roi_grid`, 0 = the paper's design; the tiny preset uses 4): the prefix also carries the image
features inside the prompt's region, RoI-aligned (torchvision) to a g x g grid with a learned per-cell position
embedding, GPT4RoI-style. Trained from scratch on Shapes, the 32 tokens learned where the prompt box is but not
what is in it: a linear probe reads the object's colour from them at chance (0.20, majority 0.20) while the mean
image feature in the box gives 0.73 (README, "The embedded model").

`roi_position="sine"` gives each RoI token SAM's Fourier code of its cell centre in *image* coordinates (so a
cell of a box prompt knows where it is in the image, which is the frame of the location head), projected and
LayerNormed, added after the token's own projection: an attended RoI value then carries its position at the
same strength as its content. The learned per-cell embedding is added before a LayerNorm, where it is small next
to the feature (norm 0.78 against 9.5) — docs/referring.md.

`forward(..., grid=)` reads the region through another grid than `roi_grid` (sine code only): the model's config
`global_roi_grid` gives the unprompted prefix, whose region is the whole image, one cell per ViT patch
(docs/referring.md §9).
"""

from __future__ import annotations

import torch
from segment_anything.modeling import PromptEncoder, TwoWayTransformer
from torch import nn
from torchvision.ops import roi_align


class PromptFeatureExtractor(nn.Module):
    def __init__(self, *, prompt_encoder: PromptEncoder, transformer: TwoWayTransformer, num_queries: int,
                 embed_dim: int, lm_dim: int, roi_grid: int = 0, roi_position: str = "learned") -> None:
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.transformer = transformer
        self.queries = nn.Parameter(torch.randn(num_queries, embed_dim) * 0.02)
        self.proj = nn.Linear(embed_dim, lm_dim)
        self.roi_grid = roi_grid
        if roi_position not in ("learned", "sine"):
            raise ValueError(f"roi_position must be 'learned' or 'sine', got {roi_position!r}")
        self.roi_position = roi_position
        if roi_grid:
            if roi_position == "learned":
                self.roi_pos = nn.Parameter(torch.randn(roi_grid * roi_grid, embed_dim) * 0.02)
            else:
                self.roi_pos_proj = nn.Linear(embed_dim, lm_dim)
                self.roi_pos_norm = nn.LayerNorm(lm_dim)
            self.roi_norm = nn.LayerNorm(embed_dim)
            self.roi_proj = nn.Linear(embed_dim, lm_dim)

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

    @staticmethod
    def region_of(boxes: torch.Tensor | None, points: torch.Tensor | None, point_labels: torch.Tensor | None,
                  batch: int, device: torch.device, pad: float = 0.1) -> torch.Tensor:
        """The region the RoI tokens read, Bx4 normalised: the box; else the positive points' bounding box
        grown by `pad` on each side; else the whole image."""
        if boxes is not None:
            return boxes.float().expand(batch, 4)
        if points is None:
            return torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=device).expand(batch, 4)
        pts = points.float()
        keep = (point_labels == 1) if point_labels is not None else torch.ones(pts.shape[:2], dtype=torch.bool,
                                                                               device=pts.device)
        keep = keep | ~keep.any(dim=1, keepdim=True)  # no positive point: use all of them
        big = torch.finfo(pts.dtype).max
        low = torch.where(keep[..., None], pts, big).amin(dim=1)
        high = torch.where(keep[..., None], pts, -big).amax(dim=1)
        return torch.cat([low - pad, high + pad], dim=1).clamp(0.0, 1.0).expand(batch, 4)

    def grid_for(self, boxes: torch.Tensor | None, points: torch.Tensor | None, global_grid: int = 0) -> int:
        """The RoI grid of a prompt batch: `global_grid` (if set) for the unprompted prefix, whose one region
        is the whole image, else `roi_grid`. Another grid than `roi_grid` needs the sine position code (a learned
        per-cell embedding has one size)."""
        if global_grid < 0:
            raise ValueError(f"global_roi_grid must be >= 0 (0 = roi_grid), got {global_grid}")
        if not global_grid or global_grid == self.roi_grid or boxes is not None or points is not None:
            return self.roi_grid
        if not self.roi_grid or self.roi_position != "sine":
            raise ValueError(f"global_roi_grid={global_grid} needs roi_grid > 0 and roi_position='sine'; got "
                             f"roi_grid={self.roi_grid}, roi_position={self.roi_position!r}")
        return global_grid

    def cell_centres(self, regions: torch.Tensor, grid: int | None = None) -> torch.Tensor:
        """regions: Bx4 normalised -> B x g*g x 2, the (x, y) image coordinates of the RoI cells' centres in
        the row-major order of the RoI tokens (g = `grid`, default `roi_grid`)."""
        g = grid or self.roi_grid
        steps = (torch.arange(g, device=regions.device, dtype=torch.float32) + 0.5) / g
        x0, y0, x1, y1 = regions.float().unbind(-1)
        xs = x0[:, None] + steps[None] * (x1 - x0)[:, None]  # B x g
        ys = y0[:, None] + steps[None] * (y1 - y0)[:, None]
        return torch.stack([xs[:, None, :].expand(-1, g, -1), ys[:, :, None].expand(-1, -1, g)], -1).flatten(1, 2)

    def forward(self, image_embeddings: torch.Tensor, prompt_tokens: torch.Tensor,
                regions: torch.Tensor | None = None, grid: int | None = None) -> torch.Tensor:
        """image_embeddings: BxCxhxw, or 1xCxhxw shared by all B prompts; prompt_tokens: BxKxC; regions: Bx4
        normalised, the RoI tokens' regions (default: the whole image); grid: their g (default `roi_grid`).
        Returns the visual prefix, B x (num_queries [+ g^2]) x D_lm."""
        batch = prompt_tokens.shape[0]
        image = image_embeddings.expand(batch, -1, -1, -1)
        image_pe = self.prompt_encoder.get_dense_pe().to(image.dtype).expand(batch, -1, -1, -1)
        queries = self.queries.unsqueeze(0).expand(batch, -1, -1)
        tokens = torch.cat([prompt_tokens, queries], dim=1)
        out, _ = self.transformer(image, image_pe, tokens)
        prefix = self.proj(out[:, -queries.shape[1]:])
        if not self.roi_grid:
            return prefix
        grid = grid or self.roi_grid
        if regions is None:
            regions = self.region_of(None, None, None, batch, image.device)
        # Pool from the un-expanded features: K prompts on one image all read row 0 (no K-fold copy).
        rows = torch.arange(batch, device=regions.device) if image_embeddings.shape[0] == batch else \
            torch.zeros(batch, device=regions.device)
        rois = torch.cat([rows.float()[:, None], regions.float() * image.shape[-1]], dim=1)
        pooled = roi_align(image_embeddings.float(), rois, output_size=grid, spatial_scale=1.0,
                           sampling_ratio=2, aligned=True)  # B x C x g x g
        pooled = pooled.flatten(2).transpose(1, 2).to(prefix.dtype)
        if self.roi_position == "learned":
            return torch.cat([prefix, self.roi_proj(self.roi_norm(pooled + self.roi_pos))], dim=1)
        size = self.input_size
        code = self.prompt_encoder.pe_layer.forward_with_coords(self.cell_centres(regions, grid) * size, (size, size))
        code = code.to(prefix.dtype)
        roi = self.roi_proj(self.roi_norm(pooled)) + self.roi_pos_norm(self.roi_pos_proj(code))
        return torch.cat([prefix, roi], dim=1)
