"""PixelLLM: Pixel-Aligned Language Models in PyTorch.

Public API (imported lazily so that `pixelllm.config` and `pixelllm.store` stay free of torch):
`PixelLLMConfig`, `get_config`, `PixelLLM`, `build_pixelllm`, `PixelLLMPredictor`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PixelLLMConfig", "get_config", "PixelLLM", "build_pixelllm", "PixelLLMPredictor"]

_LAZY = {
    "PixelLLMConfig": "pixelllm.config",
    "get_config": "pixelllm.config",
    "PixelLLM": "pixelllm.modeling.pixel_llm",
    "build_pixelllm": "pixelllm.build",
    "PixelLLMPredictor": "pixelllm.predictor",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'pixelllm' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_LAZY[name]), name)
