"""`PixelLLMConfig` and the model presets of DESIGN §2 (no torch import: the store and tools read it too).

The config is a tree of plain dataclasses so that `config.json` is plain JSON (huggingface_hub's mixin drops
non-JSON values silently). Nested dicts read back from JSON are turned into their dataclasses in
`__post_init__`, and tuples come back as lists — nothing here depends on the difference.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ViTConfig:
    """A SAM-style `ImageEncoderViT` (segment_anything.modeling.image_encoder)."""

    img_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 14
    global_attn_indexes: list[int] = field(default_factory=lambda: [2, 5, 8, 11])
    use_rel_pos: bool = True

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size


@dataclass
class T5Settings:
    """The fields of `transformers.T5Config` we set; the rest keep transformers' defaults."""

    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 12
    num_decoder_layers: int = 12
    num_heads: int = 12
    feed_forward_proj: str = "gated-gelu"
    dropout_rate: float = 0.1
    tie_word_embeddings: bool = False  # False = Flan-T5 (no d_model**-0.5 rescaling before lm_head)
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128


@dataclass
class LoraSettings:
    """LoRA on the language model (DESIGN §1: rank 32 on q and v of self-attention)."""

    r: int = 32
    alpha: int = 32
    dropout: float = 0.05
    # Regex over module names. The paper says "query and value projection layers of self-attention blocks":
    # T5 names self-attention `SelfAttention` and cross-attention `EncDecAttention`, so this excludes the latter
    # (peft's plain ["q", "v"] would also hit cross-attention — see APIS.md).
    target_modules: str = r".*language_model\..*\.SelfAttention\.(q|v)$"


@dataclass
class PixelLLMConfig:
    """Everything needed to build a `PixelLLM` from scratch (no weights, no downloads).

    Coordinates inside the model are normalised to [0, 1] of the image, boxes (x0, y0, x1, y1).
    """

    preset: str = "tiny"
    image_encoder: ViTConfig = field(default_factory=ViTConfig)
    # Optional second ("semantic") backbone, concatenated on channels after resizing to the SAM grid; in the
    # paper this is EVA02 ViT-L. We build it as a SAM-style ViT of the same size (see build.py for loading).
    semantic_encoder: ViTConfig | None = None
    prompt_embed_dim: int = 256  # SAM's neck width C: prompt encoder, extractor and mask decoder work in it
    num_query_tokens: int = 32
    roi_grid: int = 0  # > 0: also g*g RoI-aligned region tokens in the prefix (our deviation; prompt_extractor.py)
    # How a RoI token knows where it is: "learned" (a per-cell embedding added before the LayerNorm) or "sine"
    # (SAM's Fourier code of the cell centre in image coordinates, projected and LayerNormed, added after the
    # token's projection so it arrives at full strength in the attended value; docs/referring.md).
    roi_position: str = "learned"
    # RoI grid of the unprompted (global-box) prefix, 0 = roi_grid. The whole image through roi_grid cells pools
    # 2 x 2 ViT patches per cell at the tiny preset (roi_grid 8, 16 x 16 patches); the narrative names every
    # object from these cells (docs/referring.md §9). Needs roi_position "sine" (its code is per position).
    global_roi_grid: int = 0
    extractor_depth: int = 2
    extractor_heads: int = 8
    extractor_mlp_dim: int = 2048
    mask_decoder_depth: int = 2
    mask_decoder_heads: int = 8
    mask_decoder_mlp_dim: int = 2048
    t5: T5Settings = field(default_factory=T5Settings)
    lora: LoraSettings = field(default_factory=LoraSettings)
    loc_head_hidden: int = 256
    loc_head_layers: int = 3
    proposal_channels: int = 128
    proposal_upsample: int = 2  # simple feature pyramid: one level, `proposal_upsample`x finer than the ViT grid
    pixel_mean: list[float] = field(default_factory=lambda: [123.675, 116.28, 103.53])
    pixel_std: list[float] = field(default_factory=lambda: [58.395, 57.12, 57.375])
    # Loss weights (DESIGN §1, Eq. 4: label smoothing 0.1, lambda = 0.1)
    label_smoothing: float = 0.1
    loc_loss_weight: float = 0.1
    eos_l1_weight: float = 1.0
    eos_giou_weight: float = 1.0
    mask_focal_weight: float = 20.0  # SAM's 20:1 focal:dice ratio
    mask_dice_weight: float = 1.0
    mask_iou_weight: float = 1.0
    # Text prompt (encoder side) that marks the referring task, "" = none (the paper). Without it a model trained
    # from scratch on referring expressions and narratives under the same global-box prompt answers "describe the
    # image" with an expression ("the large purple circle"), since both start from the same input (README).
    refer_prompt: str = ""
    # Training-only auxiliary (0 = off, the paper's loss): -log of the last decoder layer's cross-attention mass
    # (mean over heads) on the RoI cells inside each supervised token's target box (docs/referring.md).
    attn_supervision_weight: float = 0.0
    # Training-only (0 = off: pure teacher forcing, the paper): parallel scheduled sampling (Duckworth et al.
    # 2019) on generated-caption batches. Each decoder input token is, with this probability, replaced by the
    # model's own greedy prediction at that position from a first, gradient-free teacher-forced pass; the
    # targets stay the reference's. The decoder learns to continue a narrative after its own slips instead of
    # only after perfect prefixes. Referring batches are never mixed: their words are the given query.
    scheduled_sampling: float = 0.0
    proposal_weight: float = 1.0
    # Special token ids (T5 convention: pad = decoder start = 0, eos = 1, unk = 2)
    pad_token_id: int = 0
    eos_token_id: int = 1
    max_new_tokens: int = 96
    # Decoding default of every caption the predictor decodes (1 = none): CTRL's penalty on tokens already
    # generated (transformers' RepetitionPenaltyLogitsProcessor). The embedded model names one object twice in about
    # 3 % of its narrative mentions; 1.1, chosen on a validation split, cut that (docs/referring.md §18).
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        for name, kind in (("image_encoder", ViTConfig), ("semantic_encoder", ViTConfig), ("t5", T5Settings),
                           ("lora", LoraSettings)):
            value = getattr(self, name)
            if isinstance(value, dict):
                unknown = sorted(set(value) - {f.name for f in dataclasses.fields(kind)})
                if unknown:  # a field this version does not know would build another architecture
                    raise ValueError(f"config {name} has unknown keys {unknown} (a checkpoint of a newer version?)")
                setattr(self, name, kind(**value))
        if not 1.0 <= float(self.repetition_penalty) <= 2.0:  # the predictor's range for a call's own penalty
            raise ValueError(f"repetition_penalty must be between 1 and 2, got {self.repetition_penalty}")

    @property
    def image_size(self) -> int:
        return self.image_encoder.img_size

    @property
    def grid_size(self) -> int:
        return self.image_encoder.grid_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PixelLLMConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def replace(self, **changes: Any) -> PixelLLMConfig:
        return dataclasses.replace(self, **changes)


def _tiny() -> PixelLLMConfig:
    return PixelLLMConfig(
        preset="tiny",
        image_encoder=ViTConfig(
            img_size=128, patch_size=8, embed_dim=128, depth=4, num_heads=4, window_size=8,
            global_attn_indexes=[1, 3],
        ),
        prompt_embed_dim=128,
        extractor_heads=4,
        extractor_mlp_dim=512,
        mask_decoder_heads=4,
        mask_decoder_mlp_dim=512,
        t5=T5Settings(
            vocab_size=1024, d_model=256, d_kv=32, d_ff=768, num_layers=3, num_decoder_layers=3, num_heads=8,
            dropout_rate=0.0, tie_word_embeddings=True,  # procedural data is plentiful; dropout costs ~10% CPU
        ),
        lora=LoraSettings(r=8, alpha=16, target_modules=LoraSettings().target_modules),
        loc_head_hidden=256,
        proposal_channels=64,
        roi_grid=4,
    )


def _base() -> PixelLLMConfig:
    # SAM ViT-B + Flan-T5-base
    return PixelLLMConfig(
        preset="base",
        image_encoder=ViTConfig(),
        t5=T5Settings(),
        lora=LoraSettings(r=32, alpha=32),
        loc_head_hidden=768,
    )


def _paper() -> PixelLLMConfig:
    # SAM ViT-H || EVA02 ViT-L (as a SAM-style ViT-L at 448 px, patch 14) + Flan-T5-XL, LoRA r = 32 on q, v.
    return PixelLLMConfig(
        preset="paper",
        image_encoder=ViTConfig(
            img_size=1024, patch_size=16, embed_dim=1280, depth=32, num_heads=16, window_size=14,
            global_attn_indexes=[7, 15, 23, 31],
        ),
        semantic_encoder=ViTConfig(
            img_size=448, patch_size=14, embed_dim=1024, depth=24, num_heads=16, window_size=0,
            global_attn_indexes=[], use_rel_pos=False,
        ),
        t5=T5Settings(d_model=2048, d_kv=64, d_ff=5120, num_layers=24, num_decoder_layers=24, num_heads=32),
        lora=LoraSettings(r=32, alpha=32),
        loc_head_hidden=2048,
    )


PRESETS = {"tiny": _tiny, "base": _base, "paper": _paper}


def get_config(preset: str, **overrides: Any) -> PixelLLMConfig:
    """Return a fresh config for a preset name, with top-level fields overridden."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]().replace(**overrides)
