"""Image encoder V (DESIGN §1): SAM's `ImageEncoderViT`, optionally concatenated with a second backbone.

In the paper V = SAM ViT-H (frozen) || EVA02 ViT-L (tunable), features concatenated on channels. Here the second
("semantic") backbone is optional; its features are resized to the SAM grid, concatenated on channels and mixed
back to C channels by a linear (1x1) layer. The SAM-only features are kept too: the mask decoder is SAM's and
expects them.

SAM's ViT attention is computed with `F.scaled_dot_product_attention` (`SDPAAttention`, swapped in by `build_vit`
without forking segment-anything): same parameters and state-dict keys, same outputs and gradients up to float
rounding (tests/test_inference_optimisations.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling import image_encoder as sam_vit
from torch import nn

from pixelllm.config import ViTConfig


def _rel_pos_bias(q: torch.Tensor, rel_pos_h: torch.Tensor, rel_pos_w: torch.Tensor,
                  size: tuple[int, int]) -> torch.Tensor:
    """segment_anything's `add_decomposed_rel_pos` as an additive attention mask. q: (B*heads) x (h*w) x C
    (unscaled). Returns (B*heads) x (h*w) x (h*w)."""
    h, w = size
    rh = sam_vit.get_rel_pos(h, h, rel_pos_h)
    rw = sam_vit.get_rel_pos(w, w, rel_pos_w)
    r_q = q.reshape(q.shape[0], h, w, q.shape[-1])
    rel_h = torch.einsum("bhwc,hkc->bhwk", r_q, rh)
    rel_w = torch.einsum("bhwc,wkc->bhwk", r_q, rw)
    return (rel_h[:, :, :, :, None] + rel_w[:, :, :, None, :]).reshape(q.shape[0], h * w, h * w)


class SDPAAttention(sam_vit.Attention):
    """segment_anything's ViT `Attention` computed by `F.scaled_dot_product_attention`, the decomposed
    relative-position terms passed as its additive mask: a fused kernel (memory-efficient on CUDA, the fused CPU
    kernel) instead of softmax(q k^T) materialised step by step. Parameters are SAM's, untouched."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: B x H x W x C -> B x H x W x C (as segment_anything's Attention.forward)."""
        b, h, w, _ = x.shape
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, b * self.num_heads, h * w, -1).unbind(0)
        bias = _rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w)) if self.use_rel_pos else None
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        x = x.view(b, self.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
        return self.proj(x)


def use_sdpa(vit: ImageEncoderViT) -> ImageEncoderViT:
    """Swap every block's attention for `SDPAAttention` in place (the class only: modules, parameters and
    state-dict keys stay segment_anything's, so official SAM checkpoints load unchanged)."""
    for block in vit.blocks:
        if type(block.attn) is sam_vit.Attention:
            block.attn.__class__ = SDPAAttention
    return vit


def build_vit(cfg: ViTConfig, out_chans: int) -> ImageEncoderViT:
    """A SAM-style ViT with SAM's neck projecting to `out_chans`; attention through SDPA (`use_sdpa`)."""
    return use_sdpa(ImageEncoderViT(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        mlp_ratio=cfg.mlp_ratio,
        out_chans=out_chans,
        qkv_bias=True,
        norm_layer=lambda d: nn.LayerNorm(d, eps=1e-6),
        use_rel_pos=cfg.use_rel_pos,
        rel_pos_zero_init=True,
        window_size=cfg.window_size,
        global_attn_indexes=tuple(cfg.global_attn_indexes),
    ))


@dataclass
class ImageFeatures:
    """Image embeddings, cached per image by the predictor.

    fused: Bx C x h x w, what the prompt feature extractor and the proposal head read.
    sam:   Bx C x h x w, SAM's own features, what the mask decoder reads (same tensor without a 2nd backbone).
    """

    fused: torch.Tensor
    sam: torch.Tensor

    def to(self, device: torch.device | str) -> ImageFeatures:
        return ImageFeatures(self.fused.to(device), self.sam.to(device))

    def index(self, idx: torch.Tensor | slice | int) -> ImageFeatures:
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return ImageFeatures(self.fused[idx], self.sam[idx])

    def expand(self, n: int) -> ImageFeatures:
        """Repeat a single image's features n times (for K prompts on one image)."""
        return ImageFeatures(self.fused.expand(n, -1, -1, -1), self.sam.expand(n, -1, -1, -1))


class PixelImageEncoder(nn.Module):
    def __init__(self, *, sam_encoder: ImageEncoderViT, semantic_encoder: ImageEncoderViT | None,
                 semantic_img_size: int | None, out_chans: int) -> None:
        super().__init__()
        self.sam_encoder = sam_encoder
        self.semantic_encoder = semantic_encoder
        self.semantic_img_size = semantic_img_size
        self.fuse = nn.Linear(2 * out_chans, out_chans) if semantic_encoder is not None else None

    def forward(self, images: torch.Tensor) -> ImageFeatures:
        """images: Bx3xSxS, normalised with the config's pixel mean/std, S = SAM encoder input size."""
        sam = self.sam_encoder(images)
        if self.semantic_encoder is None:
            return ImageFeatures(fused=sam, sam=sam)
        size = self.semantic_img_size
        sem_in = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        sem = self.semantic_encoder(sem_in)
        sem = F.interpolate(sem, size=sam.shape[-2:], mode="bilinear", align_corners=False)
        fused = self.fuse(torch.cat([sam, sem], dim=1).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return ImageFeatures(fused=fused, sam=sam)
