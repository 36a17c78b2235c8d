"""Checkpoint directories: `config.json` (written by huggingface_hub's mixin), `model.safetensors`, tokenizer
files, optional `adapters/<name>/` (peft) and `adapters.json` naming the active adapter. Safetensors only:
pickle weights are refused, never unpickled.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate.utils import find_tied_parameters, retie_parameters
from safetensors import SafetensorError, safe_open

from pixelllm import adapters as lora
from pixelllm.config import PixelLLMConfig
from pixelllm.files import save_safetensors

if TYPE_CHECKING:
    from pixelllm.modeling.pixel_llm import PixelLLM

WEIGHTS = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_source(source: str | Path) -> None:
    """A checkpoint is an existing folder or a hub id ('user/model'). Anything else is a clear error here, not an
    obscure hub lookup failure later."""
    text = str(source)
    if Path(text).expanduser().is_dir():
        return
    if isinstance(source, Path) or not _HUB_ID.match(text):
        raise FileNotFoundError(f"checkpoint directory not found: {text} (give a folder with config.json and "
                                f"{WEIGHTS}, or a hub id like 'user/model')")


def check_source_offline(source: str) -> None:
    """`check_source`, and with the hub offline (`HF_HUB_OFFLINE=1`) a hub id must be in the local hub cache
    (default cache and revision, as `from_pretrained(source)` reads it): FileNotFoundError saying so, for a caller
    to check before its expensive work (huggingface_hub's LocalEntryNotFoundError came when the model was loaded).
    Online nothing more is checked: `from_pretrained` downloads it then."""
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    check_source(source)
    if Path(source).expanduser().is_dir() or not constants.is_offline_mode():
        return
    try:
        _resolve(source, revision=None, cache_dir=None, token=None, local_files_only=True)
    except LocalEntryNotFoundError:  # also an incomplete cached snapshot
        raise FileNotFoundError(f"{source} is not a folder and the hub is offline (HF_HUB_OFFLINE=1) with no copy of "
                                "it in the local hub cache: give a checkpoint folder, or download it once with the hub "
                                "online (HF_HUB_OFFLINE unset)") from None


def _dedupe_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Keep one name per shared storage (T5 ties its embeddings); return the kept tensors and alias -> name."""
    kept: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, value in state.items():
        ident = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape))
        if ident in seen:
            aliases[key] = seen[ident]
        else:
            seen[ident] = key
            kept[key] = value
    return kept, aliases


def save_checkpoint_files(model: PixelLLM, directory: Path, dtype: torch.dtype | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    dtype = dtype or getattr(model, "_save_dtype", None)
    state, _ = _dedupe_shared(lora.base_state_dict(model))
    tensors = {}
    for key, value in state.items():
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.contiguous()
    save_safetensors(tensors, directory / WEIGHTS, metadata={"format": "pt", "preset": model.config.preset})
    (directory / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2, sort_keys=True))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(str(directory))
    # The folder holds this model's adapters only: a previous save's would be loaded (and activated) with it
    shutil.rmtree(directory / "adapters", ignore_errors=True)
    (directory / "adapters.json").unlink(missing_ok=True)
    names = lora.list_adapters(model)
    for name in names:
        lora.save_adapter(model, name, directory / "adapters" / name, model.adapter_configs[name])
    if names:
        (directory / "adapters.json").write_text(json.dumps({"active": lora.active_adapter(model)}, indent=2))


def file_fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _resolve(model_id: str, *, revision: str | None, cache_dir: Any, token: Any, local_files_only: bool) -> Path:
    if Path(model_id).expanduser().is_dir():
        return Path(model_id).expanduser()
    from huggingface_hub import snapshot_download

    # Only what a checkpoint needs, and never pickle files.
    path = snapshot_download(model_id, revision=revision, cache_dir=cache_dir, token=token,
                             local_files_only=local_files_only,
                             allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "adapters/**"])
    return Path(path)


def refuse_pickle(directory: Path) -> None:
    if (directory / WEIGHTS).is_file():
        return
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"refusing to load pickle weights {pickles} from {directory}: PixelLLM loads "
                         f"safetensors only ({WEIGHTS}); pickle files can run arbitrary code")
    raise FileNotFoundError(f"no {WEIGHTS} in {directory}")


_HEAD, _SHARED = "language_model.lm_head.weight", "language_model.shared.weight"


def load_weights(model: torch.nn.Module, path: Path, map_location: str = "cpu") -> None:
    """Strict load: the file must hold exactly the model's (de-duplicated) tensors with matching shapes. The
    tensors are copied into the model's own one at a time (cast to its dtype), so loading needs the model and one
    tensor in memory, not the model and a second copy of the file.

    One exception: a Flan-T5-style model (its own lm_head) saved before that head was untied (2026-12-07) has no
    lm_head in its file, since the head was the input embeddings; it loads with the head set to them, as it was
    trained, and a warning."""
    expected, aliases = _dedupe_shared(lora.base_state_dict(model))
    try:  # a file cut short (an interrupted copy, download or save) fails here, as a ValueError naming it
        opened = safe_open(str(path), framework="pt", device=str(map_location))
    except SafetensorError as err:
        raise ValueError(f"{path} is not a readable safetensors file (truncated or corrupt: {err})") from None
    with opened as handle:
        keys = set(handle.keys())
        missing, unexpected = sorted(set(expected) - keys), sorted(keys - set(expected))
        tied_before = missing == [_HEAD] and not unexpected and aliases.get(_SHARED, _SHARED) in keys
        if (missing or unexpected) and not tied_before:
            raise ValueError(f"{path} does not match the model: {len(missing)} missing (e.g. {missing[:3]}), "
                             f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        source = {key: key if key in keys else aliases.get(_SHARED, _SHARED) for key in expected}  # the file's name
        for key, target in expected.items():  # shapes first: a mismatch leaves the model untouched
            shape = tuple(handle.get_slice(source[key]).get_shape())
            if shape != tuple(target.shape):
                raise ValueError(f"{path}: {key} has shape {shape}, model expects {tuple(target.shape)}")
        if tied_before:
            warnings.warn(f"{path} holds no {_HEAD}: saved when Flan-T5's output head was tied to its input "
                          "embeddings; the head starts as those embeddings, as this checkpoint was trained",
                          stacklevel=3)
        with torch.no_grad():
            for key, target in expected.items():  # aliases share their storage with one of these
                target.copy_(handle.get_tensor(source[key]))


def empty_model(cls: type[PixelLLM], config: PixelLLMConfig, device: str | torch.device,
                dtype: torch.dtype | None = None) -> PixelLLM:
    """The model with storage for its weights (in `dtype` when given) on `device` and nothing computed: no random
    initialisation of weights the checkpoint overwrites (minutes and a float32 copy for the paper preset). Every
    tensor is then read from the checkpoint (`load_weights` is strict) but the constants no file holds, which are
    set again here."""
    with torch.device("meta"):
        model = cls(config)
    if dtype is not None:
        model.to(dtype)
    tied = find_tied_parameters(model)  # T5's shared embeddings: to_empty gives each place a Parameter of its own
    model.to_empty(device=device)
    retie_parameters(model, tied)
    model.reset_constants()
    return model


def load_tokenizer(directory: Path) -> Any:
    from transformers import AutoTokenizer

    if not (directory / "tokenizer.json").is_file() and not (directory / "spiece.model").is_file():
        return None
    return AutoTokenizer.from_pretrained(str(directory))


def load_checkpoint(cls: type[PixelLLM], model_id: str, *, config: Any = None, map_location: str = "cpu",
                    revision: str | None = None, cache_dir: Any = None, token: Any = None,
                    local_files_only: bool = False, load_adapters: bool = True,
                    dtype: torch.dtype | None = None) -> PixelLLM:
    directory = _resolve(model_id, revision=revision, cache_dir=cache_dir, token=token,
                         local_files_only=local_files_only)
    refuse_pickle(directory)
    if not isinstance(config, PixelLLMConfig):
        config = PixelLLMConfig.from_dict(json.loads((directory / "config.json").read_text()))
    model = empty_model(cls, config, map_location, dtype)
    load_weights(model, directory / WEIGHTS, map_location)
    model.tokenizer = load_tokenizer(directory)
    model.version = file_fingerprint(directory / WEIGHTS)
    model.source = str(model_id)
    model.directory = str(directory)
    adapter_root = directory / "adapters"
    if load_adapters and adapter_root.is_dir():
        for sub in sorted(p for p in adapter_root.iterdir() if p.is_dir()):
            model.load_adapter(sub, sub.name, activate=False)
        lora.set_active_adapter(model, lora.adapter_manifest(directory).get("active"))
    return model.eval()
