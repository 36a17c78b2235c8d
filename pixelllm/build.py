"""Build a PixelLLM: by preset name, from a complete checkpoint, or from public component weights.

`base` and `paper` start from component weights (DESIGN §2): an official SAM checkpoint (`sam_vit_b_01ec64.pth`,
`sam_vit_h_4b8939.pth`: a plain state dict read with `weights_only=True`, never unpickled blindly), a Flan-T5
directory (`config.json`, `model.safetensors`, tokenizer) and, for `paper`, an optional second backbone as a
safetensors state dict of the SAM-style ViT that stands in EVA02's role (EVA02's own weights do not fit it: SwiGLU
MLPs, RoPE, no neck). Components load strictly: a missing or misshapen tensor is an error naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from pixelllm.config import PRESETS, PixelLLMConfig, get_config
from pixelllm.modeling.pixel_llm import PixelLLM

# Official SAM checkpoint prefixes -> where those modules live in PixelLLM
SAM_PREFIXES = {
    "image_encoder.": "image_encoder.sam_encoder",
    "prompt_encoder.": "prompt_extractor.prompt_encoder",
    "mask_decoder.": "mask_head.mask_decoder",
}


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from .safetensors, or from a PyTorch file with `weights_only=True` (tensors only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises UnpicklingError for anything but plain tensors
        raise ValueError(f"{path} is not a plain tensor state dict (refused with weights_only=True): {err}") from err
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict")
    return state


def load_module_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    if missing or unexpected or wrong:
        detail = "; ".join(f"{label}: {items[:3]}" for label, items in
                           (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if items)
        raise ValueError(f"{what} does not match the configured architecture ({detail})")
    module.load_state_dict(state, strict=True)


def load_sam_weights(model: PixelLLM, path: str | Path) -> None:
    """Load an official SAM checkpoint into the image encoder, prompt encoder and mask decoder."""
    state = read_state_dict(path)
    for prefix, target in SAM_PREFIXES.items():
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        load_module_strict(model.get_submodule(target), part, f"SAM checkpoint {path} [{prefix[:-1]}]")


def t5_settings_from_dir(t5_dir: str | Path) -> dict[str, Any]:
    from transformers import T5Config

    cfg = T5Config.from_pretrained(str(t5_dir))
    return {
        "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.d_kv, "d_ff": cfg.d_ff,
        "num_layers": cfg.num_layers, "num_decoder_layers": cfg.num_decoder_layers, "num_heads": cfg.num_heads,
        "feed_forward_proj": cfg.feed_forward_proj, "dropout_rate": cfg.dropout_rate,
        "tie_word_embeddings": bool(cfg.scale_decoder_outputs),
        "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
        "relative_attention_max_distance": cfg.relative_attention_max_distance,
    }


def load_t5_weights(model: PixelLLM, t5_dir: str | Path) -> None:
    from transformers import AutoTokenizer, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration.from_pretrained(str(t5_dir))
    load_module_strict(model.language_model, t5.state_dict(), f"T5 directory {t5_dir}")
    model.tokenizer = AutoTokenizer.from_pretrained(str(t5_dir))


def build_pixelllm(name_or_config: str | PixelLLMConfig, *, sam_checkpoint: str | Path | None = None,
                   t5_dir: str | Path | None = None, semantic_checkpoint: str | Path | None = None,
                   tokenizer: Any = None) -> PixelLLM:
    """Build a PixelLLM.

    name_or_config: a preset name ("tiny", "base", "paper"), a `PixelLLMConfig`, or a checkpoint folder / hub id
    (then loaded with `PixelLLM.from_pretrained` and the component arguments must be omitted).
    sam_checkpoint / t5_dir / semantic_checkpoint: component weights for base/paper. With `t5_dir`, the LM
    architecture is read from that directory, so the config follows the weights.
    """
    if isinstance(name_or_config, str) and name_or_config not in PRESETS:
        if sam_checkpoint or t5_dir or semantic_checkpoint:
            raise ValueError("component weights apply to presets/configs, not to a complete checkpoint")
        return PixelLLM.from_pretrained(name_or_config)
    config = get_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    if t5_dir is not None:
        config = config.replace(t5=type(config.t5)(**t5_settings_from_dir(t5_dir)))
    model = PixelLLM(config)
    if sam_checkpoint is not None:
        load_sam_weights(model, sam_checkpoint)
    if t5_dir is not None:
        load_t5_weights(model, t5_dir)
    if semantic_checkpoint is not None:
        if model.image_encoder.semantic_encoder is None:
            raise ValueError("semantic_checkpoint given but the config has no semantic_encoder")
        load_module_strict(model.image_encoder.semantic_encoder, read_state_dict(semantic_checkpoint),
                           f"semantic backbone {semantic_checkpoint}")
    if tokenizer is not None:
        model.tokenizer = tokenizer
    return model


def count_parameters(config: PixelLLMConfig) -> int:
    """Parameter count of a config, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = PixelLLM(config)
    return sum(p.numel() for p in model.parameters())
