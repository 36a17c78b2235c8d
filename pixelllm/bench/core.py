"""What every benchmark measurement shares: sizes (`Settings`), result rows (`Ratio`), the interleaved
timer (`Bench`) and the decoding switches that make two arms do the same work."""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pixelllm import image as imaging
from pixelllm.modeling.pixel_llm import PixelLLM
from pixelllm.predictor import PixelLLMPredictor

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CHECKPOINT = "assets/checkpoints/shapes-tiny"
EXAMPLES = ROOT / "assets" / "examples"


@dataclass
class Settings:
    """Sizes and repetitions. `full` is the real benchmark; `quick` only checks that everything runs."""

    warmup: int = 2
    reps: int = 15             # interleaved pairs for ratios 1-3
    gen_tokens: int = 48       # ratio 1 and 4: new tokens per decode
    flat_reps: int = 30        # ratio 4: decodes timed step by step
    flat_steps: tuple[int, int] = (5, 40)
    reuse_tokens: int = 24     # ratio 2: caption length (tokens) on both sides
    dense_boxes: int = 16
    dense_tokens: int = 24     # ratio 3: max new tokens (the predictor's dense-captioning default)
    app_reps: int = 10
    app_words: int = 20
    rss_calls: int = 3
    train_steps: int = 40
    train_log_every: int = 4
    train_batch: int = 32
    train_images: int = 128
    train_rounds: int = 2      # single, ddp, ddp, single
    train_one_thread: bool = True  # also one process with one thread: the per-core rate DDP can at best double
    train_model: dict = field(default_factory=dict)  # PixelLLMConfig overrides for the training runs
    reuse_preset: str | None = "base"  # ratio 2 also on this preset, randomly initialised (None: skip)


QUICK = Settings(warmup=1, reps=3, gen_tokens=41, flat_reps=3, reuse_tokens=8, dense_tokens=8, app_reps=2,
                 app_words=5, rss_calls=1, train_steps=4, train_log_every=2, train_batch=4, train_images=8,
                 train_rounds=1, train_one_thread=True, reuse_preset="tiny",
                 train_model={"image_encoder": {"img_size": 64, "patch_size": 8, "embed_dim": 32, "depth": 2,
                                                "num_heads": 2, "window_size": 4, "global_attn_indexes": [1]},
                              "prompt_embed_dim": 32, "num_query_tokens": 8, "extractor_heads": 2,
                              "extractor_mlp_dim": 64, "mask_decoder_heads": 2, "mask_decoder_mlp_dim": 64,
                              "t5": {"vocab_size": 400, "d_model": 64, "d_kv": 16, "d_ff": 128, "num_layers": 2,
                                     "num_decoder_layers": 2, "num_heads": 4, "dropout_rate": 0.0,
                                     "tie_word_embeddings": True},
                              "loc_head_hidden": 64, "proposal_channels": 16})


@dataclass
class Ratio:
    key: str
    label: str
    target: float
    op: str                    # "<=" or ">="
    value: float | None = None
    reason: str | None = None  # why the row is n/a
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        if self.value is None or not math.isfinite(self.value):
            return "n/a"
        ok = self.value <= self.target if self.op == "<=" else self.value >= self.target
        return "PASS" if ok else "FAIL"


# ---------------------------------------------------------------------------------------------- timing helpers

class Bench:
    """What every measurement shares: the predictor, the device, the settings, a scratch folder."""

    def __init__(self, predictor: PixelLLMPredictor, settings: Settings, workdir: Path) -> None:
        self.predictor = predictor
        self.model: PixelLLM = predictor.model
        self.settings = settings
        self.workdir = workdir
        self.cuda = predictor.device.type == "cuda"
        self.images = bench_images(workdir)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def interleave(self, arms: dict[str, Callable[[], Any]], reps: int | None = None) -> dict[str, list[float]]:
        """Seconds per call of each arm: warm-up calls first (discarded), then `reps` rounds, the order of the arms
        reversed every other round so that drift on a shared machine hits all arms alike."""
        reps = reps or self.settings.reps
        names = list(arms)
        for _ in range(self.settings.warmup):
            for name in names:
                arms[name]()
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(reps):
            for name in (names if r % 2 == 0 else names[::-1]):
                self.sync()
                start = time.perf_counter()
                arms[name]()
                self.sync()
                times[name].append(time.perf_counter() - start)
        return times

    def prefix(self, box: list[float] | None = None):
        """The PrefixLM encoder output for the first bench image (global box unless `box`, normalised)."""
        state = self.predictor.set_image(self.images[0])
        with torch.inference_mode():
            boxes = None if box is None else torch.tensor([box], device=self.predictor.device)
            return self.model.encode_prefix(state.features, boxes=boxes)


def median_ms(values: list[float]) -> float:
    return round(1000 * statistics.median(values), 3)


def ratio_of(num: list[float], den: list[float]) -> float:
    return statistics.median(num) / statistics.median(den)


@contextlib.contextmanager
def fixed_length(model: PixelLLM) -> Iterator[None]:
    """Decode exactly `max_new_tokens` steps: EOS stays a token the model may pick but no longer ends the
    sequence (its id is swapped for one no token has), so both arms of a comparison do the same work. The
    tokens chosen are unchanged: the id only serves the stop test."""
    eos = model.config.eos_token_id
    model.config.eos_token_id = -1
    try:
        yield
    finally:
        model.config.eos_token_id = eos


@contextlib.contextmanager
def ban_eos(model: PixelLLM) -> Iterator[None]:
    """Greedy decoding that cannot pick EOS or pad (their logits are -inf, as transformers' min_new_tokens
    does), so a caption runs to a requested number of words even with a model whose captions are shorter; the
    words stay the model's own (the next most likely tokens)."""
    banned = [model.config.eos_token_id, model.config.pad_token_id]  # pad would end the words just the same

    def hook(_module: torch.nn.Module, _inputs: Any, logits: torch.Tensor) -> torch.Tensor:
        logits[..., banned] = float("-inf")
        return logits

    handle = model.language_model.lm_head.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def bench_images(workdir: Path) -> list[np.ndarray]:
    """The app's example images (Shapes scenes) when present, else random pictures. Also written as PNG files
    for the app (the API takes files)."""
    paths = sorted(EXAMPLES.glob("*.png"))
    if paths:
        images = [imaging.load_image(p) for p in paths]
    else:
        rng = np.random.default_rng(0)
        images = [rng.integers(0, 256, (256, 256, 3), dtype=np.uint8) for _ in range(4)]
    for i, arr in enumerate(images):
        from PIL import Image

        Image.fromarray(arr).save(workdir / f"bench_{i}.png")
    return images


def grid_boxes(width: int, height: int, n: int) -> list[list[float]]:
    """n boxes (pixels) tiling the image in a near-square grid, each cell shrunk a little."""
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    boxes = []
    for i in range(n):
        r, c = divmod(i, cols)
        x0, y0 = c * width / cols, r * height / rows
        x1, y1 = (c + 1) * width / cols, (r + 1) * height / rows
        dx, dy = 0.1 * (x1 - x0), 0.1 * (y1 - y0)
        boxes.append([x0 + dx, y0 + dy, x1 - dx, y1 - dy])
    return boxes
