"""Small models for tests: built from configs through the real code, never downloaded."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import torch

from pixelllm.config import PixelLLMConfig, T5Settings, ViTConfig, get_config
from pixelllm.modeling.pixel_llm import PixelLLM
from pixelllm.tokenizer import train_tokenizer

CORPUS = [
    "In this picture we can see a large red circle on the left.",
    "Beside it there is a small blue star.",
    "At the bottom we can see a small yellow hexagon.",
    "the green square on the right",
    "a large purple diamond at the top. The background is light grey.",
    "orange triangle in the centre",
]


ROOT = Path(__file__).resolve().parents[1]

_FILE_SIZE_LIMITED = """
import importlib, resource, signal, sys
main = importlib.import_module(sys.argv[1]).main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as a full disk would
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]),) * 2)
raise SystemExit(main(sys.argv[3:]))
"""


def run_with_file_size_limit(module: str, limit: int, *args: str) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` in a child process that cannot write a file past `limit` bytes: its writes
    really fail (EFBIG), as on a full disk, without needing a small file system."""
    return subprocess.run([sys.executable, "-c", _FILE_SIZE_LIMITED, module, str(limit), *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))


def png_claiming(width: int, height: int) -> bytes:
    """A ~100-byte PNG whose IHDR claims width x height (8-bit RGB): a decompression bomb that costs nothing to
    make. Decoding it for real would need width * height * 3 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def small_tokenizer(vocab_size: int = 400):
    return train_tokenizer(CORPUS * 20, vocab_size=vocab_size)


def small_config(vocab_size: int, **overrides) -> PixelLLMConfig:
    """A few-hundred-thousand-parameter PixelLLM with the tiny preset's structure."""
    fields = dict(
        image_encoder=ViTConfig(img_size=64, patch_size=8, embed_dim=32, depth=2, num_heads=2, window_size=4,
                                global_attn_indexes=[1]),
        prompt_embed_dim=32, num_query_tokens=8, extractor_heads=2, extractor_mlp_dim=64,
        mask_decoder_heads=2, mask_decoder_mlp_dim=64,
        t5=T5Settings(vocab_size=vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                      num_heads=4, dropout_rate=0.0, tie_word_embeddings=True),
        loc_head_hidden=64, proposal_channels=16,
    )
    return get_config("tiny", **{**fields, **overrides})


def small_model(seed: int = 0, **overrides) -> PixelLLM:
    tok = small_tokenizer()
    torch.manual_seed(seed)
    model = PixelLLM(small_config(len(tok), **overrides))
    model.tokenizer = tok
    return model.eval()


def random_image(seed: int, height: int = 48, width: int = 80) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def save_small_checkpoint(directory: Path, seed: int = 0) -> Path:
    small_model(seed).save_pretrained(directory)
    return directory


def make_prompt_sensitive(model: PixelLLM) -> PixelLLM:
    """A freshly initialised T5 ignores its (small) visual prefix and emits the same token everywhere; amplify
    the prefix projection and silence the pad embedding so that different prompts give different captions."""
    with torch.no_grad():
        model.prompt_extractor.proj.weight.mul_(30)
        model.language_model.shared.weight[model.config.pad_token_id].zero_()
    return model


def set_slider(page, elem_id: str, value: str, attempts: int = 5) -> None:
    """Type `value` into a Gradio slider's number box and wait until the range input shows it.

    A fill made while the component is still settling can be overwritten (CI once ran dense captioning
    with the default 0.3 after `fill("0")` + Enter), so the value is re-typed until the slider agrees."""
    from playwright.sync_api import expect

    number = page.locator(f"#{elem_id} input[type=number]")
    slider = page.locator(f"#{elem_id} input[type=range]")
    for attempt in range(attempts):
        number.fill(value)
        number.press("Enter")
        try:
            expect(slider).to_have_value(value, timeout=2000)
            return
        except AssertionError:
            if attempt == attempts - 1:
                raise
