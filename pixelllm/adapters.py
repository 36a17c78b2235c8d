"""LoRA adapters through peft, injected into the whole `PixelLLM` module.

Adapters live in a checkpoint under `adapters/<name>/` (peft's `adapter_config.json` +
`adapter_model.safetensors`) and can be switched at runtime. Switching mutates the shared model: callers that
serve requests concurrently must serialise switches against running requests (the predictor does).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file
from torch import nn

from pixelllm.config import LoraSettings
from pixelllm.files import save_safetensors

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_adapter_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise ValueError(f"adapter name {name!r} must be 1-64 letters, digits, '_', '-' or '.', not a path")
    return name


def lora_config(settings: LoraSettings, extra_targets: tuple[str, ...] = ()) -> LoraConfig:
    """A peft LoraConfig from the model config. `extra_targets` are more regex alternatives (for example the
    location head's linear layers when finetuning traces)."""
    pattern = settings.target_modules
    if extra_targets:
        pattern = "|".join([f"(?:{pattern})"] + [f"(?:{t})" for t in extra_targets])
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=pattern, bias="none")


def tuner_layers(model: nn.Module) -> list[BaseTunerLayer]:
    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def list_adapters(model: nn.Module) -> list[str]:
    names: set[str] = set()
    for layer in tuner_layers(model):
        names.update(layer.lora_A.keys())
    return sorted(names)


def active_adapter(model: nn.Module) -> str | None:
    layers = tuner_layers(model)
    if not layers or layers[0].disable_adapters:
        return None
    return layers[0].active_adapters[0]


def add_adapter(model: nn.Module, name: str, config: LoraConfig) -> None:
    """Inject a new, freshly initialised LoRA adapter and make it the active one."""
    check_adapter_name(name)
    if name in list_adapters(model):
        raise ValueError(f"adapter {name!r} already exists")
    inject_adapter_in_model(config, model, adapter_name=name)
    set_active_adapter(model, name)


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Activate one adapter, or none (`None`: the base model)."""
    layers = tuner_layers(model)
    if name is None:
        for layer in layers:
            layer.enable_adapters(False)
        return
    if name not in list_adapters(model):
        raise ValueError(f"unknown adapter {name!r}; loaded: {list_adapters(model)}")
    for layer in layers:
        layer.enable_adapters(True)
        # set_adapter also flips requires_grad on; the caller decides what trains
        layer.set_adapter(name)


def save_adapter(model: nn.Module, name: str, directory: Path, config: LoraConfig) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(model, adapter_name=name)
    save_safetensors({k: v.detach().contiguous().cpu() for k, v in state.items()}, directory / ADAPTER_WEIGHTS)
    config.save_pretrained(str(directory))


def load_adapter(model: nn.Module, directory: Path, name: str) -> LoraConfig:
    """Load `directory` (adapter_config.json + adapter_model.safetensors) as adapter `name`."""
    check_adapter_name(name)
    weights = directory / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"no {ADAPTER_WEIGHTS} in adapter folder {directory}")
    config = LoraConfig.from_pretrained(str(directory))
    if name not in list_adapters(model):
        inject_adapter_in_model(config, model, adapter_name=name)
    result = set_peft_model_state_dict(model, load_file(str(weights)), adapter_name=name)
    missing = [k for k in result.missing_keys if "lora_" in k and f".{name}." in k]
    if missing:
        raise ValueError(f"adapter {directory} is missing weights for {len(missing)} LoRA tensors, e.g. {missing[0]}")
    return config


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's own weights without LoRA tensors, under the names of an un-injected model."""
    state = {}
    for key, value in model.state_dict().items():
        if "lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value
    return state


def adapter_manifest(directory: Path) -> dict:
    path = directory / "adapters.json"
    return json.loads(path.read_text()) if path.is_file() else {}
