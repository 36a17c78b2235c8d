"""Performance benchmark (DESIGN §7): `python -m pixelllm.bench [--checkpoint DIR] [--device cpu|cuda]
[--json OUT] [--quick] [--no-fail]`.

Every figure is a ratio of two things measured side by side in one run: the two arms alternate (A B, B A, ...),
warm-up runs are excluded, the figure is the ratio of the medians, and torch's intra-op threads are pinned.

1. location-head overhead   our streaming decode (`PixelLLM.stream`, with boxes) / transformers `generate()`
                            (greedy, KV cache, `encoder_outputs=` the same prefix), same LM weights, same number
                            of new tokens (EOS is not a stop on either side), target <= 1.10
2. prompt reuse             first call on a new image (image encoding included) / a second prompt on an image
                            already encoded (embedding-cache hit), same caption length, target >= 5
3. batched dense captioning 16 single `caption_boxes` calls / the same 16 boxes in one batched call, target >= 4
4. flat per-token cost      time of decoding step 40 / step 5 in one decode (KV cache), target <= 1.3
5. app overhead             a gradio_client `/caption` call against the app running in this process (with an
                            annotation store, as deployed) / the predictor's streamed caption alone; the greedy
                            global caption of an example image, 20 words on both sides (EOS banned so that a
                            model with shorter captions still writes 20 words), target <= 1.5
6. training scale-out       samples/s of `torchrun --nproc_per_node=2 -m training.train` / one process, CPU,
                            small generated config (read from the runs' metrics.jsonl), target >= 1.3

Absolute figures (machine described): time to first streamed word on a cached image, words per second, peak RSS
of `app.py` serving the checkpoint (a subprocess, psutil + VmHWM), and the `paper` preset's parameter count and
bf16 weight memory (built on the meta device). With `--device cuda` the model runs on the GPU in bfloat16; the
training scale-out is a CPU measurement in every case (gloo, two processes).

Exit status 1 when a target is missed (unless --no-fail); rows that cannot run here are "n/a" with the reason.
`--quick` shrinks sizes and repetitions for a CI smoke run: its timings are not meaningful.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pixelllm import image as imaging
from pixelllm.build import build_pixelllm, count_parameters
from pixelllm.config import get_config
from pixelllm.modeling.pixel_llm import PixelLLM
from pixelllm.predictor import PixelLLMPredictor

ROOT = Path(__file__).resolve().parents[1]
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
        self.images = _bench_images(workdir)

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


def _median_ms(values: list[float]) -> float:
    return round(1000 * statistics.median(values), 3)


def _ratio(num: list[float], den: list[float]) -> float:
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


def _bench_images(workdir: Path) -> list[np.ndarray]:
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


def _grid_boxes(width: int, height: int, n: int) -> list[list[float]]:
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


# ---------------------------------------------------------------------------------------------- 1. location head

def bench_location_head(b: Bench) -> Ratio:
    from transformers import GenerationConfig
    from transformers.modeling_outputs import BaseModelOutput

    ratio = Ratio("location_head_overhead", "location-head overhead: stream+boxes / generate()", 1.10, "<=")
    n = b.settings.gen_tokens
    prefix = b.prefix()
    lm = b.model.language_model
    # eos_token_id=[]: generate() never stops early (None would fall back to the model's EOS id).
    config = GenerationConfig(max_new_tokens=n, do_sample=False, num_beams=1, use_cache=True,
                              decoder_start_token_id=b.model.config.pad_token_id,
                              pad_token_id=b.model.config.pad_token_id, eos_token_id=[])
    out: dict[str, Any] = {}

    def generate() -> None:
        with torch.inference_mode():
            enc = BaseModelOutput(last_hidden_state=prefix.hidden)
            out["generate"] = lm.generate(encoder_outputs=enc, attention_mask=prefix.mask, generation_config=config)

    def stream(with_boxes: bool) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():
                steps = [(s.tokens, box) for s, box in b.model.stream(prefix, max_new_tokens=n, with_boxes=with_boxes)]
            out["stream" if with_boxes else "loop"] = steps
        return run

    with fixed_length(b.model):
        times = b.interleave({"stream": stream(True), "generate": generate, "loop": stream(False)})
    ours = [int(t[0]) for t, _ in out["stream"]]
    theirs = out["generate"][0, 1:].tolist()
    if len(ours) != n or len(theirs) != n:
        raise RuntimeError(f"decodes did not run {n} steps (ours {len(ours)}, generate {len(theirs)})")
    ratio.value = _ratio(times["stream"], times["generate"])
    ratio.detail = {"new_tokens": n, "stream_with_boxes_ms": _median_ms(times["stream"]),
                    "generate_ms": _median_ms(times["generate"]), "stream_without_boxes_ms": _median_ms(times["loop"]),
                    "loop_vs_generate": round(_ratio(times["loop"], times["generate"]), 4),
                    "same_tokens": ours == theirs}
    return ratio


# ---------------------------------------------------------------------------------------------- 2. prompt reuse

def bench_prompt_reuse(b: Bench) -> Ratio:
    ratio = Ratio("prompt_reuse_speedup", "prompt reuse: first call / cached image", 5.0, ">=")
    ratio.value, ratio.detail = _reuse_measure(b)
    preset = b.settings.reuse_preset
    if preset:
        # The embedded model's encoder is a small part of a call, which bounds its ratio (the "ceiling" above).
        # The same measurement on a randomly initialised `base` preset (SAM ViT-B at 1024 px + T5-base) shows
        # what the cache buys with an encoder of the size the paper's presets use.
        config = get_config(preset)
        config = config.replace(t5=dataclasses.replace(config.t5, vocab_size=b.model.config.t5.vocab_size))
        torch.manual_seed(0)
        model = build_pixelllm(config, tokenizer=b.model.tokenizer).eval()
        predictor = PixelLLMPredictor(model, device=b.predictor.device, dtype=b.model.dtype)
        quick = dataclasses.replace(b.settings, warmup=1, reps=3)
        value, detail = _reuse_measure(Bench(predictor, quick, b.workdir))
        ratio.detail.update({f"{preset}_preset_speedup": round(value, 3),
                             **{f"{preset}_preset_{k}": detail[k] for k in ("first_call_ms", "cached_call_ms",
                                                                             "encode_image_ms")}})
        del model, predictor
    return ratio


def _reuse_measure(b: Bench) -> tuple[float, dict[str, Any]]:
    """(first call / cached call, details) for the bench's model: a caption on a never-seen image against a
    caption for another box on an image already in the embedding cache, same length, interleaved."""
    s = b.settings
    pred = b.predictor
    base = b.images[0]
    h, w = base.shape[:2]
    first_box = [0.05 * w, 0.05 * h, 0.6 * w, 0.6 * h]
    second_box = [0.4 * w, 0.4 * h, 0.95 * w, 0.95 * h]

    def fresh_images() -> Iterator[np.ndarray]:  # a new hash every time: a counter in the first 8 bytes
        for k in itertools.count(1):
            arr = base.copy()
            arr.reshape(-1)[:8] = np.frombuffer(k.to_bytes(8, "little"), dtype=np.uint8)
            yield arr

    fresh = fresh_images()
    pending = [next(fresh) for _ in range(s.warmup + s.reps)]  # copies made outside the timed region
    warm = base
    pred.set_image(warm)

    def first_call() -> None:
        pred.caption(pred.set_image(pending.pop()), box=first_box, max_new_tokens=s.reuse_tokens)

    def cached_call() -> None:
        pred.caption(pred.set_image(warm), box=second_box, max_new_tokens=s.reuse_tokens)

    misses, hits = pred.cache_misses, pred.cache_hits
    with fixed_length(b.model):
        times = b.interleave({"first": first_call, "cached": cached_call})
    misses, hits = pred.cache_misses - misses, pred.cache_hits - hits
    calls = s.warmup + s.reps
    if misses != calls or hits != calls:
        raise RuntimeError(f"embedding cache did not behave as planned: {misses} misses, {hits} hits for {calls}")
    # Image encoding alone, for the record (what the cache saves).
    enc_times = []
    for _ in range(max(3, s.reps // 3)):
        pixels = imaging.to_model_input(next(fresh), b.model.config.image_size).unsqueeze(0).to(pred.device)
        with torch.inference_mode():
            b.sync()
            start = time.perf_counter()
            b.model.encode_image(pixels.to(b.model.dtype))
            b.sync()
            enc_times.append(time.perf_counter() - start)
    cached = statistics.median(times["cached"])
    # What the cache saves is the image encoding: (encode + cached call) / cached call bounds the ratio, so it
    # exceeds 5 only where encoding an image costs more than four captions.
    detail = {"caption_tokens": s.reuse_tokens, "first_call_ms": _median_ms(times["first"]),
              "cached_call_ms": _median_ms(times["cached"]), "encode_image_ms": _median_ms(enc_times),
              "ceiling": round((statistics.median(enc_times) + cached) / cached, 3),
              "cache_misses": misses, "cache_hits": hits}
    return _ratio(times["first"], times["cached"]), detail


# ---------------------------------------------------------------------------------------------- 3. dense captioning

def bench_dense(b: Bench) -> Ratio:
    ratio = Ratio("batched_dense_speedup", f"batched dense captioning: {b.settings.dense_boxes} singles / 1 batch",
                  4.0, ">=")
    s = b.settings
    pred = b.predictor
    state = pred.set_image(b.images[0])
    boxes = _grid_boxes(state.width, state.height, s.dense_boxes)
    out: dict[str, Any] = {}

    def batched() -> None:
        out["batched"] = pred.caption_boxes(state, boxes, max_new_tokens=s.dense_tokens)

    def singles() -> None:
        out["singles"] = [pred.caption_boxes(state, [box], max_new_tokens=s.dense_tokens)[0] for box in boxes]

    times = b.interleave({"batched": batched, "singles": singles})
    words = [len(c.words) for c in out["batched"]]
    same = sum(a.text == c.text for a, c in zip(out["batched"], out["singles"]))
    ratio.value = _ratio(times["singles"], times["batched"])
    ratio.detail = {"boxes": len(boxes), "max_new_tokens": s.dense_tokens, "batched_ms": _median_ms(times["batched"]),
                    "singles_ms": _median_ms(times["singles"]), "words_per_caption": words,
                    "captions_identical": f"{same}/{len(boxes)}"}
    return ratio


# ---------------------------------------------------------------------------------------------- 4. per-token cost

def bench_per_token(b: Bench) -> Ratio:
    early, late = b.settings.flat_steps
    ratio = Ratio("per_token_cost_ratio", f"flat per-token cost: step {late} / step {early}", 1.3, "<=")
    n = max(b.settings.gen_tokens, late + 1)
    prefix = b.prefix()
    profiles: list[list[float]] = []
    with fixed_length(b.model), torch.inference_mode():
        for rep in range(b.settings.warmup + b.settings.flat_reps):
            steps: list[float] = []
            b.sync()
            last = time.perf_counter()
            for _step, _boxes in b.model.stream(prefix, max_new_tokens=n):
                b.sync()
                now = time.perf_counter()
                steps.append(now - last)
                last = now
            if rep >= b.settings.warmup:
                profiles.append(steps)
    per_step = [statistics.median(p[i] for p in profiles) for i in range(n)]  # index i = step i + 1
    ratio.value = per_step[late - 1] / per_step[early - 1]
    marks = sorted({1, early, 10, 20, 30, late, n} & set(range(1, n + 1)))
    ratio.detail = {"new_tokens": n, "decodes": len(profiles), f"step_{early}_ms": round(1000 * per_step[early - 1], 3),
                    f"step_{late}_ms": round(1000 * per_step[late - 1], 3),
                    "median_step_ms": {str(k): round(1000 * per_step[k - 1], 4) for k in marks}}
    return ratio


# ---------------------------------------------------------------------------------------------- 5. app overhead

def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def predictor_stream(pred: PixelLLMPredictor, array: np.ndarray, words: int) -> tuple[int, float]:
    """The predictor's part of an app caption (same decoding budget as the app's /caption): set_image (cached)
    and stream until `words` words. Returns (words, seconds to the first word)."""
    start = time.perf_counter()
    first = math.nan
    count = 0
    stream = pred.stream_caption(pred.set_image(array), max_new_tokens=min(512, 4 * words + 8))
    with contextlib.closing(stream):
        for count, _word in enumerate(stream, start=1):
            if count == 1:
                first = time.perf_counter() - start
            if count >= words:
                break
    return count, first


def bench_app(b: Bench, absolute: dict[str, Any]) -> Ratio:
    s = b.settings
    ratio = Ratio("app_overhead", f"app overhead: /caption via gradio_client / predictor ({s.app_words} words)",
                  1.5, "<=")
    pred = b.predictor
    path = b.workdir / "bench_0.png"
    array = imaging.load_image(path)
    pred.set_image(array)
    stats: dict[str, list] = {"words": [], "first": []}

    def alone() -> None:
        count, first = predictor_stream(pred, array, s.app_words)
        stats["words"].append(count)
        stats["first"].append(first)

    with ban_eos(b.model):  # the app shares this model: both sides write the same app_words-word caption
        try:
            from pixelllm.ui import build_demo
        except ImportError as err:
            ratio.reason = f"app missing ({err})"
            times = b.interleave({"predictor": alone}, reps=s.app_reps)
        else:
            times = _app_times(b, build_demo, path, alone, ratio)
    pred_s = statistics.median(times["predictor"])
    words = statistics.median(stats["words"])
    firsts = [x for x in stats["first"] if math.isfinite(x)]
    absolute["time_to_first_word_ms"] = round(1000 * statistics.median(firsts), 2) if firsts else None
    absolute["words_per_s"] = round(words / pred_s, 2)
    absolute["stream_words"] = words
    if "app" in times:
        ratio.value = _ratio(times["app"], times["predictor"])
        ratio.detail.update(app_ms=_median_ms(times["app"]))
    ratio.detail.update(predictor_ms=_median_ms(times["predictor"]), predictor_words=words, image=path.name)
    return ratio


def _app_times(b: Bench, build_demo: Callable, path: Path, alone: Callable[[], None],
               ratio: Ratio) -> dict[str, list[float]]:
    import httpx
    from gradio_client import Client, handle_file

    from pixelllm.store import AnnotationStore
    from pixelllm.ui import callbacks

    s = b.settings
    store = AnnotationStore(b.workdir / "annotations.db")  # the app logs every generation, as in production
    demo = build_demo(b.predictor, store, checkpoint="bench", examples=[])
    port = _free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True, ssr_mode=False)
    floor_demo = _noop_demo()
    floor_port = _free_port()
    floor_demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=floor_port, quiet=True,
                      ssr_mode=False)
    try:
        client = Client(f"http://127.0.0.1:{port}/", download_files=False, verbose=False)
        endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
        if "/caption" not in endpoints:
            ratio.reason = "app has no /caption endpoint"
            return b.interleave({"predictor": alone}, reps=s.app_reps)
        # The /caption contract: image file, prompts JSON, text prompt, decoding options -> words + boxes.
        args = {"prompts": "", "text": "", "max_words": s.app_words, "do_sample": False, "temperature": 1.0,
                "top_p": 1.0, "seed": -1}
        order = [p["parameter_name"] for p in endpoints["/caption"]["parameters"]]
        app_words: dict[str, list[int]] = {"app": [], "http": [], "callback": []}

        def via_app() -> None:
            result = client.predict(image=handle_file(str(path)), **args, api_name="/caption")
            app_words["app"].append(len(result["words"]))

        http = httpx.Client(base_url=f"http://127.0.0.1:{port}/gradio_api/", timeout=300)

        def via_http() -> None:  # the same endpoint through Gradio's HTTP call API, as curl or a browser would
            with open(path, "rb") as handle:
                uploaded = http.post("upload", files={"files": (path.name, handle, "image/png")}).json()[0]
            image = {"path": uploaded, "meta": {"_type": "gradio.FileData"}}
            data = [image if name == "image" else args[name] for name in order]
            event = http.post("call/caption", json={"data": data}).json()["event_id"]
            app_words["http"].append(len(_sse_result(http, f"call/caption/{event}")[0]["words"]))

        def via_callback() -> None:  # the app's handler without Gradio: file read, decode, caption, store log
            result = callbacks.api_caption(demo.studio, str(path), **args)
            app_words["callback"].append(len(result["words"]))

        # gradio_client's own floor: the same upload, queue and event stream to an endpoint that does nothing.
        floor_client = Client(f"http://127.0.0.1:{floor_port}/", download_files=False, verbose=False)

        def via_floor() -> None:
            floor_client.predict(handle_file(str(path)), api_name="/noop")

        times = b.interleave({"app": via_app, "predictor": alone, "http": via_http, "callback": via_callback,
                              "client_floor": via_floor}, reps=s.app_reps)
        pred = statistics.median(times["predictor"])
        floor = statistics.median(times["client_floor"])
        ratio.detail.update(
            client_floor_ms=round(1000 * floor, 1),
            app_minus_floor_ratio=round((statistics.median(times["app"]) - floor) / pred, 3),
            app_words=statistics.median(app_words["app"]),
            http_api_ms=_median_ms(times["http"]), http_api_ratio=round(statistics.median(times["http"]) / pred, 3),
            callback_ms=_median_ms(times["callback"]),
            callback_ratio=round(statistics.median(times["callback"]) / pred, 3),
            gradio_client_extra_ms=round(1000 * (statistics.median(times["app"]) - statistics.median(times["http"])), 1))
        http.close()
        return times
    finally:
        with contextlib.redirect_stdout(sys.stderr):  # gradio prints "Closing server..." on stdout
            demo.close()
            floor_demo.close()
        store.close()


def _noop_demo() -> Any:
    """A Gradio app whose one queued endpoint takes a file like /caption does and returns at once."""
    import gradio as gr

    with gr.Blocks() as floor:
        file = gr.File(type="filepath")
        out = gr.JSON()
        gr.Button().click(lambda _path: {"words": []}, file, out, api_name="noop")
    floor.queue()
    return floor


def _sse_result(http: Any, url: str) -> Any:
    """Read a Gradio call-API event stream to its end; return the `complete` event's data."""
    event = None
    with http.stream("GET", url) as resp:
        for line in resp.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                if event == "error":
                    raise RuntimeError(f"/caption failed through the HTTP API: {line[5:].strip()}")
                return json.loads(line[5:])
    raise RuntimeError("/caption: the event stream ended without a result")


def app_peak_rss(checkpoint: str, device: str, workdir: Path, calls: int) -> dict[str, Any]:
    """Start `app.py` with the checkpoint as a subprocess, make a few /caption and /dense calls, and read its
    peak resident memory (VmHWM on Linux; otherwise the largest RSS psutil sampled)."""
    import psutil
    from gradio_client import Client, handle_file

    app = ROOT / "app.py"
    if not app.is_file():
        return {"app_peak_rss_mb": None, "reason": "app missing (no app.py)"}
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_TEMP_DIR": str(workdir / "gradio-app")}
    cmd = [sys.executable, str(app), "--checkpoint", checkpoint, "--device", device, "--port", str(port),
           "--host", "127.0.0.1", "--db", str(workdir / "app.db")]
    log = open(workdir / "app.log", "wb")
    proc = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=log, stderr=subprocess.STDOUT)
    peak = {"rss": 0}
    stop = threading.Event()

    def sample() -> None:
        ps = psutil.Process(proc.pid)
        while not stop.wait(0.05):
            try:
                peak["rss"] = max(peak["rss"], ps.memory_info().rss)
            except psutil.Error:
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        url = f"http://127.0.0.1:{port}/"
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                tail = (workdir / "app.log").read_text(errors="replace")[-2000:]
                return {"app_peak_rss_mb": None, "reason": f"app.py exited with {proc.returncode}: {tail}"}
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if time.time() > deadline:
                    return {"app_peak_rss_mb": None, "reason": "app.py did not start within 300 s"}
                time.sleep(0.5)
        client = Client(url, download_files=False, verbose=False)
        image = handle_file(str(workdir / "bench_0.png"))
        for _ in range(calls):
            client.predict(image=image, prompts="", text="", max_words=40, do_sample=False, temperature=1.0,
                           top_p=1.0, seed=-1, api_name="/caption")
        client.predict(image=image, score_threshold=0.3, max_regions=16, api_name="/dense")
        hwm = _vm_hwm(proc.pid)
        stop.set()
        sampler.join()
        rss = hwm if hwm is not None else peak["rss"]
        return {"app_peak_rss_mb": round(rss / 2**20, 1), "app_rss_source": "VmHWM" if hwm else "psutil samples",
                "app_calls": f"{calls} x /caption (40 words) + 1 x /dense"}
    finally:
        stop.set()
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _vm_hwm(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# ---------------------------------------------------------------------------------------------- 6. training

def _train_config(s: Settings, workdir: Path, threads: int, batch: int | None = None) -> Path:
    stage = {"name": "bench", "stage": "scratch", "steps": s.train_steps, "warmup": 2,
             "tasks": {"narrative": 3, "sentence": 1, "region_box": 2, "region_points": 1, "refer": 3}}
    cfg = {
        "model": {"preset": "tiny", "init": "scratch", "overrides": s.train_model},
        "data": {"root": str(workdir / "shapes"), "train_split": "bench",
                 "generate": {"bench": {"num": s.train_images, "seed": 7}}},
        "train": {"out": str(workdir / "train"), "batch_size": batch or s.train_batch, "lr": 5e-4, "seed": 0,
                  "threads": threads, "max_tokens": 96, "log_every": s.train_log_every,
                  "checkpoint_every": 10**9},
        "stages": [stage],
    }
    path = workdir / f"train_bench_{threads}t_{batch or s.train_batch}b.json"
    path.write_text(json.dumps(cfg, indent=2))
    return path


def _train_cmd(config: Path, out: Path, nproc: int) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    return [*launcher, "-m", "training.train", "--config", str(config), f"--train.out={out}"]


def _train_runs(runs: list[tuple[Path, Path, int, Path]]) -> list[list[float]]:
    """Training runs (config, out, nproc, log) started together; returns each run's samples/s per log window
    (the first window, which pays for start-up, dropped)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}  # a CPU measurement
    started: list[tuple[list[str], Path, subprocess.Popen]] = []
    with contextlib.ExitStack() as stack:
        try:
            for config, out, nproc, log in runs:
                cmd = _train_cmd(config, out, nproc)
                handle = stack.enter_context(open(log, "wb"))
                started.append((cmd, log, subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=handle,
                                                           stderr=subprocess.STDOUT)))
            for cmd, log, proc in started:
                if proc.wait() != 0:
                    raise RuntimeError(f"training run failed ({' '.join(cmd)}): "
                                       f"{log.read_text(errors='replace')[-2000:]}")
        finally:
            for _, _, proc in started:  # a failed run does not leave its partner running
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    return [_window_rates(out) for _, out, _, _ in runs]


def _train_run(config: Path, out: Path, nproc: int, log: Path) -> list[float]:
    return _train_runs([(config, out, nproc, log)])[0]


def _window_rates(out: Path) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    by_step = {r["step"]: r["samples_per_s"] for r in rows}  # one row per task, same samples_per_s
    values = [by_step[k] for k in sorted(by_step)]
    return values[1:] if len(values) > 1 else values


def bench_training(s: Settings, workdir: Path, threads: int) -> Ratio:
    ratio = Ratio("train_scaleout", "training scale-out: 2 processes / 1 process (CPU)", 1.3, ">=")
    if not (ROOT / "training" / "train.py").is_file():
        ratio.reason = "training package missing"
        return ratio
    config = _train_config(s, workdir, threads)
    runs: dict[int, list[float]] = {1: [], 2: []}
    order = [1, 2, 2, 1] * ((s.train_rounds + 1) // 2)
    for i, nproc in enumerate(order[: 2 * s.train_rounds]):
        out = workdir / f"train_{i}_{nproc}p"
        runs[nproc] += _train_run(config, out, nproc, workdir / f"train_{i}_{nproc}p.log")
    ratio.value = statistics.median(runs[2]) / statistics.median(runs[1])
    ratio.detail = {"one_process_samples_per_s": round(statistics.median(runs[1]), 3),
                    "two_processes_samples_per_s": round(statistics.median(runs[2]), 3),
                    "steps_per_run": s.train_steps, "global_batch": s.train_batch, "runs_each": s.train_rounds,
                    "threads": f"train.threads={threads} divided by world size"}
    if s.train_one_thread and threads > 1:
        # Two processes of one thread can at best double one process of one thread: that bounds this ratio at
        # 2 * rate(1 thread) / rate(threads), however good the DDP implementation is.
        single = statistics.median(_train_run(_train_config(s, workdir, 1), workdir / "train_1thread", 1,
                                              workdir / "train_1thread.log"))
        # Two cores are not two machines: two independent one-thread runs at once share caches and memory
        # bandwidth. Their summed rate (each at a DDP rank's batch) is what this machine can give two processes
        # with no communication at all.
        config1 = _train_config(s, workdir, 1, batch=s.train_batch // 2)
        pair = _train_runs([(config1, workdir / f"train_pair_{k}", 1, workdir / f"train_pair_{k}.log")
                            for k in range(2)])
        pair_rate = sum(statistics.median(r) for r in pair)
        ratio.detail.update(one_process_one_thread_samples_per_s=round(single, 3),
                            ddp_efficiency=round(statistics.median(runs[2]) / (2 * single), 3),
                            ceiling=round(2 * single / statistics.median(runs[1]), 3),
                            independent_pair_samples_per_s=round(pair_rate, 3),
                            ddp_vs_independent_pair=round(statistics.median(runs[2]) / pair_rate, 3),
                            machine_ceiling=round(pair_rate / statistics.median(runs[1]), 3))
    return ratio


# ---------------------------------------------------------------------------------------------- report

def machine(device: torch.device, threads: int) -> dict[str, Any]:
    import psutil
    import transformers

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {"cpu": cpu, "logical_cores": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
            "torch_threads": threads, "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": str(device),
            "load_avg_at_start": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def paper_preset() -> dict[str, Any]:
    params = count_parameters(get_config("paper"))
    return {"paper_parameters": params, "paper_bf16_weights_gb": round(params * 2 / 1e9, 2)}


def render(ratios: list[Ratio], absolute: dict[str, Any], info: dict[str, Any]) -> str:
    lines = ["machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), ""]
    width = max(len(r.label) for r in ratios)
    lines.append(f"{'ratio':<{width}}  {'measured':>9}  {'target':>8}  result")
    lines.append("-" * (width + 32))
    for r in ratios:
        value = f"{r.value:.3f}" if r.status != "n/a" else "n/a"
        note = f"  ({r.reason})" if r.status == "n/a" and r.reason else ""
        lines.append(f"{r.label:<{width}}  {value:>9}  {r.op + ' ' + format(r.target, 'g'):>8}  {r.status}{note}")
    lines.append("")
    lines.append("absolute: " + ", ".join(f"{k}={v}" for k, v in absolute.items()))
    lines.append("")
    for r in ratios:  # the measurements behind each ratio (all of them are in --json)
        shown = {k: v for k, v in r.detail.items() if not isinstance(v, (list, dict))}
        lines.append(f"{r.key}: " + ", ".join(f"{k}={v}" for k, v in shown.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="PixelLLM checkpoint folder or hub id")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="cuda runs in bfloat16")
    parser.add_argument("--json", type=Path, help="write every figure and its details here")
    parser.add_argument("--quick", action="store_true", help="small sizes and repetitions (CI smoke run)")
    parser.add_argument("--no-fail", action="store_true", help="exit 0 even when a target is missed")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch intra-op threads")
    parser.add_argument("--only", help="comma-separated subset to run (ratio keys, app_peak_rss); for diagnosis")
    args = parser.parse_args(argv)

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    checkpoint = args.checkpoint
    if not Path(checkpoint).is_absolute() and not Path(checkpoint).exists() and (ROOT / checkpoint).exists():
        checkpoint = str(ROOT / checkpoint)
    try:
        model = PixelLLM.from_pretrained(checkpoint)
    except (FileNotFoundError, ValueError) as err:
        print(f"cannot load the checkpoint {checkpoint}: {err}", file=sys.stderr)
        return 2
    settings = QUICK if args.quick else Settings()
    predictor = PixelLLMPredictor(model, device=device, dtype=torch.bfloat16 if device.type == "cuda" else None)
    info = machine(device, args.threads)
    info["dtype"] = str(predictor.model.dtype).replace("torch.", "")
    info["checkpoint"] = checkpoint
    absolute: dict[str, Any] = {}
    ratios: list[Ratio] = []
    only = set(args.only.split(",")) if args.only else None

    def write_json(complete: bool) -> None:  # after every measurement: a killed run keeps what it measured
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({
                "machine": info, "quick": args.quick, "complete": complete, "settings": asdict(settings),
                "ratios": {r.key: {"label": r.label, "value": r.value, "target": r.target, "op": r.op,
                                   "status": r.status, "reason": r.reason, "detail": r.detail} for r in ratios},
                "absolute": absolute, "failed": [r.key for r in ratios if r.status == "FAIL"],
            }, indent=2, default=str))

    absolute.update(paper_preset())
    with tempfile.TemporaryDirectory(prefix="pixelllm-bench-") as tmp:
        workdir = Path(tmp)
        os.environ.setdefault("GRADIO_TEMP_DIR", str(workdir / "gradio"))
        bench = Bench(predictor, settings, workdir)
        steps: list[tuple[str, Callable[[], Ratio | None]]] = [
            ("location_head_overhead", lambda: bench_location_head(bench)),
            ("prompt_reuse_speedup", lambda: bench_prompt_reuse(bench)),
            ("batched_dense_speedup", lambda: bench_dense(bench)),
            ("per_token_cost_ratio", lambda: bench_per_token(bench)),
            ("app_overhead", lambda: bench_app(bench, absolute)),
            ("app_peak_rss", lambda: absolute.update(app_peak_rss(checkpoint, args.device, workdir,
                                                                  settings.rss_calls))),
            ("train_scaleout", lambda: bench_training(settings, workdir, args.threads)),
        ]
        for key, run in steps:
            if only is not None and key not in only:
                continue
            print(f"... {key}", file=sys.stderr, flush=True)
            result = run()
            if isinstance(result, Ratio):
                ratios.append(result)
                print(f"    {result.value if result.value is None else round(result.value, 3)} "
                      f"({result.op} {result.target:g}) {result.status}", file=sys.stderr, flush=True)
            write_json(complete=False)
    if hasattr(os, "getloadavg"):  # other work on the machine skews every figure: say how busy it was
        info["load_avg_at_end"] = round(os.getloadavg()[0], 2)
    print(render(ratios, absolute, info))
    write_json(complete=True)
    failed = [r.key for r in ratios if r.status == "FAIL"]
    return 1 if failed and not args.no_fail else 0


if __name__ == "__main__":
    raise SystemExit(main())
